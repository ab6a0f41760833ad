"""DuoAttention views: what the duo page, its report section and the notebook show.

Every function takes a saved :class:`~analyses.runstore.Run` or the
:class:`~analyses.base.AnalysisResult` that :func:`analyses.duo.run_duo` returns (so a notebook can
draw a result before saving it) and returns a figure, a small table or sentences; the page and the
report only arrange them. The tables they read are described in docs/analyses/duo.md.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.base import AnalysisResult
from analyses.duo import kv_ratio
from analyses.duo.summary import loaded_gates_text
from dashboard.core import common, figures

Source = common.Source
Metric = Literal["recall", "recalled"]
METRICS: tuple[Metric, ...] = ("recall", "recalled")
METRIC_LABELS: dict[Metric, str] = {
    "recall": "mean ROUGE-1 recall",
    "recalled": "share of tests recalled (above the gate)",
}
REQUIRED_TABLES = frozenset({"heads", "gates", "loss", "accuracy", "memory", "agreement"})
SELECTIONS = ("duo", "retrieval_score", "random")  # the ways of choosing the retrieval heads
SELECTION_LABELS = {
    "full": "full model",
    "duo": "Duo gates",
    "retrieval_score": "retrieval score",
    "random": "random heads",
}
COLOURS = {
    "full": "#5b6475",
    "duo": "#d73027",
    "retrieval_score": "#1a9850",
    "random": "#4575b4",
}
SYMBOLS = {"duo": "circle", "retrieval_score": "square", "random": "diamond"}
SHARE_COLOURS = ("#d73027", "#fc8d59", "#4575b4", "#1a9850", "#984ea3", "#a65628")
RING_COLOUR = "#e4572e"
SLIDING_COLOUR = "#7a7a7a"
CURVE_POINTS = 80


# ---------------------------------------------------------------------------------------- access


def table(source: Source, name: str) -> pd.DataFrame:
    """Table ``name`` of a saved run or of an unsaved result (a copy either way)."""
    return common.table(source, name, kind="duo")


def is_duo(source: Source) -> bool:
    """Whether the source has the duo tables this module draws."""
    return common.has_tables(source, REQUIRED_TABLES)


def model_info(source: Source) -> dict[str, Any]:
    """What the run recorded about the model (name, layers, context, sliding window...)."""
    if isinstance(source, AnalysisResult):
        return dict(source.model_info)
    return dict(source.manifest.model)


def timings(source: Source) -> dict[str, Any]:
    if isinstance(source, AnalysisResult):
        return dict(source.timings)
    return dict(source.manifest.timings)


def shares(source: Source) -> list[float]:
    """The retrieval shares the run evaluated, in the config's order."""
    return [float(s) for s in source.config.shares]


def gates_table(source: Source) -> pd.DataFrame:
    """The gates table sorted by (layer, kv_head)."""
    return table(source, "gates").sort_values(["layer", "kv_head"]).reset_index(drop=True)


def n_kv_total(source: Source) -> int:
    """The number of KV heads that were gated (every layer's)."""
    return len(table(source, "gates"))


def gate_matrix(source: Source) -> np.ndarray:
    """``[n_layers, n_kv_heads]``: the trained (or loaded) gates."""
    gates = gates_table(source)
    return gates.pivot(index="layer", columns="kv_head", values="gate").to_numpy(dtype=float)


def sliding_layers(source: Source) -> list[int]:
    """The layers whose type is a sliding window (none on models without them)."""
    gates = gates_table(source)
    per_layer = gates.groupby("layer")["layer_type"].first()
    return [int(layer) for layer, kind in per_layer.items() if "sliding" in str(kind)]


def top_k(source: Source, share: float) -> int:
    """The KV heads kept whole at ``share``: the run's own count (its memory table), else the rule
    of :func:`analyses.duo.n_retrieval`."""
    from analyses.duo import n_retrieval

    memory = table(source, "memory")
    rows = memory[np.isclose(memory["share"].astype(float), float(share))]
    if len(rows):
        return int(rows["k"].iloc[0])
    return n_retrieval(float(share), n_kv_total(source))


def retrieval_heads(source: Source, share: float) -> list[tuple[int, int]]:
    """(layer, kv_head) of the top :func:`top_k` KV heads by gate (the gates table's ``rank``)."""
    gates = gates_table(source)
    kept = gates[gates["rank"] <= top_k(source, share)]
    return [(int(r.layer), int(r.kv_head)) for r in kept.itertuples(index=False)]


def _list(values: Any) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def settings_line(source: Source) -> str:
    """The run's window, training and evaluation settings in one line (plain text)."""
    cfg = source.config
    notes = source.notes
    if notes.get("gates_from"):
        trained = loaded_gates_text(notes)
    else:
        trained = (
            f"gates trained {cfg.steps} steps (lr {cfg.lr:g}, lam {cfg.lam:g}) on {cfg.n_passkeys}-needle "
            f"contexts of {_list(cfg.train_lengths)} tokens"
        )
    score = (
        f"retrieval score on {_list(cfg.score_lengths)} tokens × depths {_list(cfg.score_depths)} × "
        f"{cfg.score_needles} needles"
        if cfg.retrieval_score
        else "no retrieval score"
    )
    return (
        f"{source.model_name}: streaming heads keep sink {cfg.sink} + recent {cfg.recent} keys; {trained}; "
        f"needle grid {_list(cfg.lengths)} tokens × depths {_list(cfg.depths)} × {cfg.n_needles} needles "
        f"({cfg.protocol} protocol, gate {cfg.rouge_gate:g}); shares {_list(cfg.shares)} of "
        f"{n_kv_total(source)} KV heads; {cfg.random_seeds} random draws per share; {score}; "
        f"{cfg.n_boot} bootstrap resamples"
    )


# ----------------------------------------------------------------------------------------- gates


def _layer_label(layer: int, sliding: set[int]) -> str:
    return f"{layer} (sliding)" if layer in sliding else str(layer)


def gate_map(source: Source, share: float | None = None) -> go.Figure:
    """Layer x KV head map of the gates, coloured from the lowest to the highest (a short training
    leaves them all near 1, their ranking in small differences), the retrieval heads at ``share``
    ringed (None: the run's first share); sliding-window layers are labelled and outlined."""
    gates = gates_table(source)
    z = gate_matrix(source)
    n_layers, n_kv = z.shape
    sliding = set(sliding_layers(source))
    ys = [_layer_label(layer, sliding) for layer in range(n_layers)]
    xs = [str(h) for h in range(n_kv)]
    info = gates.pivot(index="layer", columns="kv_head", values="rank").to_numpy(dtype=float)
    score = gates.pivot(index="layer", columns="kv_head", values="retrieval_score").to_numpy(dtype=float)
    custom = np.stack([info, score], axis=-1)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=xs,
            y=ys,
            colorscale=figures.COLORSCALE,
            colorbar={"title": {"text": "gate"}},
            customdata=custom,
            hovertemplate="layer %{y}, KV head %{x}<br>gate %{z:.3f}, rank %{customdata[0]:.0f}"
            "<br>retrieval score %{customdata[1]:.3f}<extra></extra>",
        )
    )
    chosen = shares(source)[0] if share is None else float(share)
    marks = retrieval_heads(source, chosen)
    fig.add_trace(
        go.Scatter(
            x=[str(h) for _, h in marks],
            y=[_layer_label(layer, sliding) for layer, _ in marks],
            mode="markers",
            name="retrieval head",
            marker={"symbol": "circle-open", "size": 13, "color": RING_COLOUR, "line": {"width": 2.5}},
            hovertemplate=f"layer %{{y}}, KV head %{{x}}: kept whole at share {chosen:g}<extra></extra>",
        )
    )
    for layer in sorted(sliding):
        fig.add_shape(
            type="rect",
            xref="x",
            yref="y",
            x0=-0.5,
            x1=n_kv - 0.5,
            y0=layer - 0.5,
            y1=layer + 0.5,
            line={"color": SLIDING_COLOUR, "width": 1.5, "dash": "dot"},
            fillcolor="rgba(0,0,0,0)",
        )
    window = model_info(source).get("sliding_window")
    sliding_note = (
        f"; dotted rows: sliding-window layers (window {window}), where the gate weighs sinks + recent "
        "keys against the window"
        if sliding
        else ""
    )
    subtitle = (
        f"ringed: the top {len(marks)} of {z.size} KV heads at share {chosen:g} (retrieval heads); "
        f"gate 1 = full attention, 0 = streaming; gates {z.min():.2f} to {z.max():.2f}{sliding_note}"
    )
    return figures.head_grid_layout(fig, "Trained gate per KV head", subtitle, n_layers).update_layout(
        xaxis={"title": {"text": "KV head"}}
    )


def loss_figure(source: Source) -> go.Figure:
    """The distillation term (left axis) and the regulariser lam · mean|gate| (right axis) per step;
    a message when the gates were loaded rather than trained."""
    loss = table(source, "loss")
    if loss.empty:
        loaded = source.notes.get("gates_from")
        why = f"the gates were loaded from {loaded}" if loaded else "the run trained no step"
        return figures.message_figure(f"No training loss: {why}.")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=loss["step"],
            y=loss["distill"],
            mode="lines+markers" if len(loss) <= 50 else "lines",
            name="distillation (MSE)",
            line={"color": COLOURS["duo"]},
            customdata=loss["length"],
            hovertemplate="step %{x} (%{customdata} tokens)<br>distillation %{y:.4g}<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=loss["step"],
            y=loss["reg"],
            mode="lines+markers" if len(loss) <= 50 else "lines",
            name="regulariser (lam · mean|gate|)",
            line={"color": COLOURS["random"], "dash": "dash"},
            hovertemplate="step %{x}<br>regulariser %{y:.4g}<extra></extra>",
        ),
        secondary_y=True,
    )
    lam = float(source.config.lam)
    fig.update_layout(
        title=figures.titled(
            "Gate training loss",
            f"{len(loss)} steps; the regulariser is lam · mean|gate| with lam = {lam:g} (right axis)",
        ),
        xaxis={"title": {"text": "step"}},
        height=380,
        margin={"l": 60, "r": 60, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.2},
        plot_bgcolor="#ffffff",
    )
    if len(loss) <= 12:
        fig.update_xaxes(tick0=0, dtick=1)  # whole steps, not 0.5
    fig.update_xaxes(gridcolor="#eeeeee")
    fig.update_yaxes(
        title_text="distillation",
        rangemode="tozero",
        gridcolor="#eeeeee",
        tickformat=".2g",
        secondary_y=False,
    )
    fig.update_yaxes(
        title_text="regulariser", rangemode="tozero", showgrid=False, tickformat=".2g", secondary_y=True
    )
    return fig


# -------------------------------------------------------------------------------------- accuracy


def lengths(source: Source) -> list[int]:
    """The evaluated context lengths (tokens asked for), 0 first: every length pooled."""
    accuracy = table(source, "accuracy")
    return [0, *sorted(int(n) for n in accuracy["length"].unique() if int(n) != 0)]


def length_label(length: int) -> str:
    return "every length pooled" if length == 0 else f"{length} tokens"


def accuracy_points(source: Source, metric: Metric = "recall", length: int = 0) -> pd.DataFrame:
    """One row per (selection, share): ``value`` of ``metric`` at ``length`` (0: pooled) with
    ``low``/``high``: the 95 % bootstrap interval over the tests, or for ``random`` the mean over the
    draws with the lowest and the highest draw; ``n`` tests or draws; ``x``: the share kept, k / n."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    accuracy = table(source, "accuracy")
    part = accuracy[accuracy["length"] == int(length)]
    if part.empty:
        raise KeyError(f"the run evaluated no context of {length} tokens; it has {lengths(source)[1:]}")
    n = n_kv_total(source)
    rows = []
    for (selection, share), group in part.groupby(["selection", "share"], sort=False):
        values = group[metric].astype(float)
        first = group.iloc[0]
        if selection == "random":
            value, low, high, count = values.mean(), values.min(), values.max(), len(group)
        else:
            value, low, high = (
                float(first[metric]),
                float(first[f"{metric}_low"]),
                float(first[f"{metric}_high"]),
            )
            count = int(first["n_tests"])
        rows.append(
            {
                "selection": str(selection),
                "share": float(share),
                "k": int(first["k"]),
                "x": int(first["k"]) / n,
                "value": float(value),
                "low": float(low),
                "high": float(high),
                "n": int(count),
                "n_tests": int(first["n_tests"]),
            }
        )
    return pd.DataFrame(rows)


def accuracy_figure(source: Source, metric: Metric = "recall", length: int = 0) -> go.Figure:
    """``metric`` against the share of KV heads kept whole, for Duo's gates, the retrieval score and
    random heads, with the full model as a reference line and its interval as a band."""
    points = accuracy_points(source, metric, length)
    n = n_kv_total(source)
    fig = go.Figure()
    full = points[points["selection"] == "full"]
    chosen = points[points["selection"] != "full"]
    xs = [0.0, 1.0]  # the reference spans every share
    if len(full):
        f = full.iloc[0]
        fig.add_trace(
            go.Scatter(
                x=[xs[0], xs[1], xs[1], xs[0]],
                y=[f["low"], f["low"], f["high"], f["high"]],
                fill="toself",
                fillcolor="rgba(91,100,117,0.15)",
                line={"width": 0},
                mode="lines",
                name="full model, 95% interval",
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[f["value"], f["value"]],
                mode="lines",
                name=SELECTION_LABELS["full"],
                line={"color": COLOURS["full"], "dash": "dot", "width": 2},
                hovertemplate=f"full model: {f['value']:.2f} [{f['low']:.2f}, {f['high']:.2f}] over "
                f"{int(f['n'])} tests<extra></extra>",
            )
        )
    for selection in SELECTIONS:
        part = chosen[chosen["selection"] == selection].sort_values("x")
        if part.empty:
            continue
        values = part["value"].to_numpy(dtype=float)
        spread = "lowest to highest draw" if selection == "random" else "95% bootstrap interval"
        count = "draws" if selection == "random" else "tests"
        fig.add_trace(
            go.Scatter(
                x=part["x"],
                y=values,
                mode="lines+markers",
                name=SELECTION_LABELS[selection]
                + (f" (mean of {int(part['n'].max())} draws)" if selection == "random" else ""),
                line={"color": COLOURS[selection], "dash": "dash" if selection == "random" else "solid"},
                marker={"symbol": SYMBOLS[selection], "size": 9},
                error_y=figures.error_bars(values, part["low"], part["high"], clip=True, width=5),
                customdata=np.stack(
                    [part["k"], part["low"], part["high"], part["n"], part["share"]], axis=-1
                ),
                hovertemplate=SELECTION_LABELS[selection]
                + ", share %{customdata[4]:g} (k = %{customdata[0]:.0f} of "
                + str(n)
                + ")<br>"
                + METRIC_LABELS[metric]
                + " %{y:.2f}<br>"
                + spread
                + " [%{customdata[1]:.2f}, %{customdata[2]:.2f}] over %{customdata[3]:.0f} "
                + count
                + "<extra></extra>",
            )
        )
    n_tests = int(points["n_tests"].max())
    random = chosen[chosen["selection"] == "random"]
    random_note = (
        f"; random: mean of {int(random['n'].max())} draws, bar from the lowest to the highest"
        if len(random)
        else ""
    )
    fig.update_layout(
        title=figures.titled(
            f"Needle test: {METRIC_LABELS[metric]} against the share of retrieval heads",
            f"{n_tests} tests ({length_label(length)}); bars: 95% bootstrap intervals over the tests"
            f"{random_note}; dotted: the full model, its interval shaded",
        ),
        xaxis={"title": {"text": f"share of the {n} KV heads kept whole (k / n)"}, "tickformat": ".0%"},
        yaxis={"title": {"text": METRIC_LABELS[metric]}, "range": [-0.03, 1.05]},
        height=440,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.22},
        plot_bgcolor="#ffffff",
    )
    fig.update_xaxes(range=[xs[0] - 0.02, xs[1] + 0.02], gridcolor="#eeeeee", zeroline=False)
    fig.update_yaxes(gridcolor="#eeeeee", zeroline=False)
    return fig


def accuracy_rows(source: Source) -> pd.DataFrame:
    """Every length pooled, one row per (selection, share): k, tests, recall and share recalled with
    their intervals (random: the mean over the draws with the lowest and highest draw)."""
    recall = accuracy_points(source, "recall", 0)
    recalled = accuracy_points(source, "recalled", 0)
    out = recall[["selection", "share", "k", "n_tests", "n"]].copy()
    out["recall"], out["recall_low"], out["recall_high"] = recall["value"], recall["low"], recall["high"]
    out["recalled"], out["recalled_low"], out["recalled_high"] = (
        recalled["value"],
        recalled["low"],
        recalled["high"],
    )
    out["draws"] = np.where(out["selection"] == "random", out["n"], 1)
    order = {s: i for i, s in enumerate(["full", *SELECTIONS])}
    out = out.sort_values(["share", "selection"], key=lambda c: c.map(order) if c.name == "selection" else c)
    return out.drop(columns="n").reset_index(drop=True)


def interval_text(value: float, low: float, high: float, *, random: bool = False) -> str:
    """``0.59 [0.18, 1.00]``; for random draws ``0.28 (draws 0.10–0.40)``."""
    if random:
        return f"{value:.2f} (draws {low:.2f}–{high:.2f})"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


# ---------------------------------------------------------------------------------------- memory


def context_range(source: Source) -> np.ndarray:
    """Context lengths N for the formula curves: from half the streaming window to the larger of
    the model's context and twice the longest test, evenly spaced on a log scale."""
    cfg = source.config
    memory = table(source, "memory")
    longest = int(memory["n_tokens"].max()) if len(memory) else max(int(n) for n in cfg.lengths)
    n_ctx = int(model_info(source).get("n_ctx") or 0)
    lo = max(8, cfg.window // 2)
    hi = max(n_ctx, 2 * longest, 4 * cfg.window)
    grid = np.geomspace(lo, hi, CURVE_POINTS).round().astype(int)
    measured = memory["n_tokens"].astype(int).tolist() if len(memory) else []
    return np.unique(np.concatenate([grid, [cfg.window], measured]))


def memory_curves(source: Source) -> pd.DataFrame:
    """Per share and N of :func:`context_range`: the formula's KV-cache ratio at r = k / n."""
    cfg = source.config
    n = n_kv_total(source)
    rows = []
    for share in shares(source):
        k = top_k(source, share)
        for length in context_range(source):
            rows.append(
                {
                    "share": share,
                    "k": k,
                    "share_kept": k / n,
                    "n_tokens": int(length),
                    "kv_ratio": kv_ratio(k / n, int(length), cfg.sink, cfg.recent),
                }
            )
    return pd.DataFrame(rows)


def has_measured(source: Source) -> bool:
    memory = table(source, "memory")
    return bool(len(memory)) and bool(memory["measured_ratio"].notna().any())


def memory_figure(source: Source) -> go.Figure:
    """The KV cache kept / the full cache against context length: the formula per share as curves,
    the ratios measured with the cut cache as points."""
    cfg = source.config
    curves = memory_curves(source)
    memory = memory_rows(source)
    n = n_kv_total(source)
    fig = go.Figure()
    for i, share in enumerate(shares(source)):
        colour = SHARE_COLOURS[i % len(SHARE_COLOURS)]
        part = curves[np.isclose(curves["share"], share)]
        k = int(part["k"].iloc[0])
        fig.add_trace(
            go.Scatter(
                x=part["n_tokens"],
                y=part["kv_ratio"],
                mode="lines",
                name=f"share {share:g} (k = {k} of {n}): formula",
                legendgroup=f"share-{share:g}",
                line={"color": colour},
                hovertemplate=f"share {share:g}, k = {k}<br>N = %{{x}}<br>formula %{{y:.3f}}<extra></extra>",
            )
        )
        measured = memory[np.isclose(memory["share"].astype(float), share) & memory["measured_ratio"].notna()]
        if len(measured):
            fig.add_trace(
                go.Scatter(
                    x=measured["n_tokens"],
                    y=measured["measured_ratio"],
                    mode="markers",
                    name=f"share {share:g}: measured",
                    legendgroup=f"share-{share:g}",
                    marker={"color": colour, "symbol": "x", "size": 11, "line": {"width": 1}},
                    customdata=measured[["kv_ratio", "kv_ratio_layers"]].to_numpy(),
                    hovertemplate=f"share {share:g}, N = %{{x}}<br>measured %{{y:.3f}} "
                    "(formula %{customdata[0]:.3f}, layer by layer %{customdata[1]:.3f})<extra></extra>",
                )
            )
    fig.add_hline(y=1.0, line_dash="dot", line_color=COLOURS["full"])
    fig.add_vline(x=cfg.window, line_dash="dot", line_color=SLIDING_COLOUR)
    fig.add_annotation(
        x=math.log10(cfg.window),
        y=0.02,
        yref="paper",
        text=f"S + R = {cfg.window}",
        showarrow=False,
        xanchor="left",
        font={"size": 11, "color": SLIDING_COLOUR},
    )
    measured_note = (
        "crosses: bytes kept / full after a prefill with the cut cache"
        if has_measured(source)
        else "not measured in this run (measure_cache off)"
    )
    sliding_note = (
        "; the formula counts sliding-window layers as full, which overstates their cache"
        if sliding_layers(source)
        else ""
    )
    fig.update_layout(
        title=figures.titled(
            "KV-cache memory against context length",
            f"kept / full cache: r + (1 − r) · min(1, (S + R) / N), r = k / n, S + R = {cfg.window}; "
            f"{measured_note}{sliding_note}",
        ),
        xaxis={"title": {"text": "context length N (tokens)"}, "type": "log"},
        yaxis={"title": {"text": "KV cache kept / full cache"}, "range": [0, 1.05]},
        height=440,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.22},
        plot_bgcolor="#ffffff",
    )
    fig.update_xaxes(gridcolor="#eeeeee")
    fig.update_yaxes(gridcolor="#eeeeee")
    return fig


def memory_rows(source: Source) -> pd.DataFrame:
    """The memory table: share, k, share kept, N, the formula, the layer-by-layer count and the
    measured ratio (``kv_ratio_layers`` is NaN for runs written before it was kept)."""
    memory = table(source, "memory")
    if "kv_ratio_layers" not in memory.columns:
        memory = memory.assign(kv_ratio_layers=np.nan)
    return memory[["share", "k", "share_kept", "n_tokens", "kv_ratio", "kv_ratio_layers", "measured_ratio"]]


# ------------------------------------------------------------------------------------- agreement


def agreement_rows(source: Source) -> pd.DataFrame:
    """Per share: the top-k overlap of Duo's gates and the retrieval score, against chance."""
    return table(source, "agreement")


def spearman(source: Source) -> float:
    """The Spearman correlation of the gates with the KV retrieval scores (NaN when there are none)."""
    agreement = agreement_rows(source)
    return float(agreement["spearman"].iloc[0]) if len(agreement) else math.nan


def agreement_note(source: Source) -> str:
    """What the agreement rests on, or why there is none (plain text)."""
    cfg = source.config
    notes = source.notes
    if not cfg.retrieval_score:
        return "The retrieval score was not computed in this run (retrieval_score off), so there is no agreement."
    passed, total = int(notes.get("score_tests_passed", 0)), int(notes.get("score_tests", 0))
    if not len(agreement_rows(source)):
        return (
            f"No test of the score grid was recalled ({passed} of {total}), so the retrieval score is "
            "undefined: no retrieval-score selection and no agreement."
        )
    rho = spearman(source)
    shown = "n/a" if math.isnan(rho) else f"{rho:.2f}"
    return (
        f"Spearman correlation of the gates with the KV heads' retrieval scores (the largest of their "
        f"query heads', over {passed} of {total} recalled score-grid tests): {shown} over "
        f"{n_kv_total(source)} KV heads. Top-k overlap: KV heads in both top-k sets; chance: k² / n, "
        "what two random k-sets share on average."
    )


# -------------------------------------------------------------------------------------- findings


def findings(source: Source) -> list[str]:
    """Plain-text sentences reading the run's numbers."""
    gates = gates_table(source)
    lines = []
    top = gates.sort_values("rank").head(5)
    lines.append(
        f"Gates: mean {gates['gate'].mean():.2f}, {int((gates['gate'] > 0.5).sum())} of {len(gates)} above "
        "0.5; highest "
        + ", ".join(f"L{r.layer} KV{r.kv_head} {r.gate:.2f}" for r in top.itertuples(index=False))
        + "."
    )
    rows = accuracy_rows(source)
    full = rows[rows["selection"] == "full"]
    if len(full):
        f = full.iloc[0]
        lines.append(
            f"Full model: recall {interval_text(f.recall, f.recall_low, f.recall_high)} over {int(f.n_tests)} tests."
        )
    for share, part in rows[rows["selection"] != "full"].groupby("share", sort=True):
        cells = []
        for r in part.itertuples(index=False):
            random = r.selection == "random"
            cells.append(
                f"{SELECTION_LABELS[str(r.selection)]} {interval_text(r.recall, r.recall_low, r.recall_high, random=random)}"
            )
        lines.append(
            f"Share {float(share):g} (k = {int(part['k'].iloc[0])}): recall " + "; ".join(cells) + "."
        )
    agreement = agreement_rows(source)
    if len(agreement):
        overlaps = ", ".join(
            f"{r.overlap} of {r.k} at share {r.share:g} (chance {r.chance:.1f})"
            for r in agreement.itertuples(index=False)
        )
        rho = spearman(source)
        lines.append(
            f"Duo's gates against the retrieval score: Spearman {'n/a' if math.isnan(rho) else f'{rho:.2f}'}; "
            f"top-k overlap {overlaps}."
        )
    else:
        lines.append(agreement_note(source))
    memory = memory_rows(source)
    if len(memory):
        longest = memory[memory["n_tokens"] == memory["n_tokens"].max()]
        ratios = ", ".join(
            f"{r.kv_ratio:.2f} at share {r.share:g}"
            + ("" if math.isnan(r.kv_ratio_layers) else f" (layer by layer {r.kv_ratio_layers:.2f})")
            + ("" if math.isnan(r.measured_ratio) else f" (measured {r.measured_ratio:.2f})")
            for r in longest.itertuples(index=False)
        )
        lines.append(f"KV cache kept at N = {int(longest['n_tokens'].iloc[0])} tokens: {ratios}.")
    return lines
