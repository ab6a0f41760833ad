"""Figures of the model training headlab does itself (scene-llava's projector): the loss curves."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go


def loss_figure(record: Mapping[str, Any]) -> go.Figure:
    """The training loss (and the held-out loss) against the step, from a training record (the JSON
    written beside the projector file)."""
    fig = go.Figure()
    curve = record.get("loss_curve") or []
    fig.add_trace(
        go.Scatter(
            x=[p["step"] for p in curve], y=[p["loss"] for p in curve], mode="lines", name="training loss"
        )
    )
    held_out = record.get("eval_loss_curve") or []
    if held_out:
        fig.add_trace(
            go.Scatter(
                x=[p["step"] for p in held_out],
                y=[p["eval_loss"] for p in held_out],
                mode="lines+markers",
                name="held-out loss",
            )
        )
    fig.update_layout(
        title=f"{record.get('model', 'model')}: projector training",
        xaxis_title="step",
        yaxis_title="cross-entropy (nats; see loss_weighting)",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


def write_loss_figure(record_path: str | Path) -> Path:
    """Write ``<stem>.loss.plotly.json`` (``plotly.io.read_json`` reads it) beside the training
    record ``<stem>.json``; returns its path."""
    record_path = Path(record_path)
    figure = record_path.with_name(f"{record_path.stem}.loss.plotly.json")
    loss_figure(json.loads(record_path.read_text())).write_json(str(figure))
    return figure
