"""VHD / T-VHD / VHR views: what the VHD page and the vhd / vhr report sections show.

Background
----------
A ``vhd`` or ``vhr`` run (:mod:`analyses.vision_heads`, He et al., ACL 2025) holds ``heads`` (per
(layer, head): ``vhd_mean``, ``vhd_first``, ``text_norm_first``; a ``vhr`` run adds
``selected_share``, ``outlier_share`` and ``in_vhr_layers`` for its main VHR setting), ``captions``
(CHAIR's columns per (setting, scene)), ``tokens`` (the baseline captions token by token with T-VHD,
the object word a token starts and whether it is hallucinated), ``words`` (the object words),
``tvhd_test`` (hallucinated vs correct words: counts, means, medians, Mann–Whitney p, AUROC),
``pope``, ``summary`` (CHAIR and POPE per VHR setting with bootstrap intervals), ``deltas`` (paired
changes against the baseline), ``scenes``, ``settings`` (empty for ``vhd`` runs) and the arrays
``vhd`` ``[scenes, steps, layers, heads]`` and ``images`` (the first ``n_display`` evaluated images).

Every function takes a saved :class:`~analyses.runstore.Run` or the unsaved
:class:`~analyses.base.AnalysisResult` alike, so a notebook draws a result before saving it. Tiny or
random models may name no object at all: empty ``words``, NaN in ``tvhd_test`` and NaN CHAIR_I are
drawn as messages, never as errors.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.core import common, figures
from dashboard.core.common import Source, config, table_names
from dashboard.core.common import table as _table

ANALYSES: tuple[str, ...] = ("vhd", "vhr")
BASELINE = "baseline"  # analyses.vision_heads.BASELINE: the setting without reinforcement
REQUIRED_TABLES = frozenset({"heads", "captions", "tokens", "words", "tvhd_test", "summary", "scenes"})
HEAD_METRICS: tuple[str, ...] = (
    "vhd_mean",
    "vhd_first",
    "text_norm_first",
    "selected_share",
    "outlier_share",
)
METRIC_NAMES = {
    "vhd_mean": "VHD (mean over steps)",
    "vhd_first": "VHD at the first step",
    "text_norm_first": "text-only output norm (first step)",
    "selected_share": "share of inputs reinforced by VHR",
    "outlier_share": "share of inputs set aside as outlier",
}
METRIC_NOTES = {
    "vhd_mean": "‖output with the image − without‖, mean over steps and scenes",
    "vhd_first": "‖output with the image − without‖ at the first generated token",
    "text_norm_first": "‖output without the image‖ at the first generated token",
    "selected_share": "share of inputs for which the main VHR setting scaled the head",
    "outlier_share": "share of inputs for which VHR set the head aside (VHD and norm both high)",
}
# Panels of the benchmark figures: (benchmark, metric, label); POPE panels repeat for each kind.
# CHAIR is drawn with object recall and caption length beside it: a setting whose captions name
# fewer objects, or say less, lowers CHAIR without hallucinating less.
CHAIR_PANELS: tuple[tuple[str, str], ...] = (
    ("CHAIR_S", "CHAIR_S"),
    ("CHAIR_I", "CHAIR_I"),
    ("recall", "object recall"),
    ("words", "caption length (words)"),
)
POPE_PANELS: tuple[tuple[str, str], ...] = (("F1", "F1"), ("accuracy", "accuracy"))
LOWER_IS_BETTER = frozenset({"CHAIR_S", "CHAIR_I"})
NO_DIRECTION = frozenset({"words"})  # neither longer nor shorter captions are better in themselves
# A setting is flagged when its object recall falls by more than RECALL_DROP of the baseline's, or
# its mean caption length by more than LENGTH_DROP of the baseline's.
RECALL_DROP = 0.25
LENGTH_DROP = 0.5
WARNING_COLOUR = "#b3261e"

HALLUCINATED_COLOUR = "#d62728"  # red
CORRECT_COLOUR = "#2ca02c"  # green
TOKEN_COLOUR = "#b8c4d6"  # other tokens
BASELINE_COLOUR = "#5b6475"
MAIN_COLOUR = "#31688e"
SETTING_COLOUR = "#7fa7c9"
RANDOM_COLOUR = "#e4572e"
UNCLEAR_COLOUR = "#9e9e9e"
VHR_LAYER_COLOUR = "#e4572e"


def table(source: Source, name: str) -> pd.DataFrame:
    return _table(source, name, kind="vhd/vhr")


def array(source: Source, name: str) -> np.ndarray:
    return common.array(source, name, kind="vhd/vhr")


has_array = common.has_array
model_name = common.model_name
notes = common.notes


def is_vhd(source: Source) -> bool:
    """Whether the source has the tables this module reads."""
    return common.has_tables(source, REQUIRED_TABLES)


def analysis(source: Source) -> str:
    return source.analysis


def _optional(source: Source, name: str) -> pd.DataFrame:
    return table(source, name) if name in table_names(source) else pd.DataFrame()


def num(value: object, spec: str = ".3f") -> str:
    """A number formatted with ``spec``; "n/a" for None and NaN."""
    return common.num(value, spec)


def _interval(value: object, lo: object, hi: object, spec: str = ".3f") -> str:
    text = num(value, spec)
    if text == "n/a":
        return text
    if num(lo) == "n/a" or num(hi) == "n/a":
        return text
    return f"{text} [{num(lo, spec)}, {num(hi, spec)}]"


def _split(value: object) -> list[str]:
    """A comma-separated cell of the captions table as a list ("" and NaN: none)."""
    if not isinstance(value, str) or not value:
        return []
    return [v for v in value.split(",") if v]


# ---------------------------------------------------------------------------------- settings


def settings_table(source: Source) -> pd.DataFrame:
    """The VHR settings (empty for a ``vhd`` run)."""
    return _optional(source, "settings")


def main_setting(source: Source) -> str | None:
    """The name of the main VHR setting (the first one run; None for a ``vhd`` run)."""
    s = settings_table(source)
    return str(s["name"].iloc[0]) if len(s) and "name" in s else None


def setting_order(source: Source) -> list[str]:
    """The settings in the run's order, baseline first."""
    seen: list[str] = [BASELINE]
    for name in table(source, "summary")["vhr_setting"].astype(str):
        if name not in seen:
            seen.append(name)
    s = settings_table(source)
    if len(s) and "name" in s:
        for name in s["name"].astype(str):
            if name not in seen:
                seen.append(name)
    return seen


def _setting_colours(source: Source) -> dict[str, str]:
    """The marker colour of each setting that has its own (others: :data:`SETTING_COLOUR`): the
    baseline, the main VHR setting and the settings reinforcing random heads."""
    s = settings_table(source)
    colours: dict[str, str] = {}
    if len(s) and "random" in s:
        colours = {str(n): RANDOM_COLOUR for n, r in zip(s["name"], s["random"], strict=True) if bool(r)}
    main = main_setting(source)
    if main is not None:
        colours[main] = MAIN_COLOUR
    colours[BASELINE] = BASELINE_COLOUR
    return colours


def settings_line(source: Source) -> str:
    """One line naming the run's settings (plain text)."""
    cfg = config(source)
    scenes = table(source, "scenes")
    parts = [f"{analysis(source)} run of {model_name(source)}", f"{len(scenes)} scenes"]
    if "split" in cfg:
        parts.append(f"{cfg['split']} split")
    if "noise" in cfg:
        parts.append(f"pixel noise {cfg['noise']}")
    if "max_new_tokens" in cfg:
        parts.append(f"at most {cfg['max_new_tokens']} tokens a caption")
    if "top_k" in cfg:
        parts.append(f"T-VHD over the top {cfg['top_k']} heads a layer")
    s = settings_table(source)
    if len(s):
        parts.append(f"{len(s)} VHR setting(s): " + ", ".join(str(n) for n in s["name"]))
    else:
        parts.append("no VHR settings (a vhd run: no intervention)")
    kinds = cfg.get("pope_kinds")
    if kinds:
        parts.append("POPE " + ", ".join(str(k) for k in kinds))
    if "n_boot" in cfg:
        parts.append(f"{cfg['n_boot']} bootstrap resamples")
    if "seed" in cfg:
        parts.append(f"seed {cfg['seed']}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- heads


def heads(source: Source) -> pd.DataFrame:
    return table(source, "heads")


def head_metrics(source: Source) -> list[str]:
    """The head metrics the run has (with at least one finite value)."""
    h = heads(source)
    return [m for m in HEAD_METRICS if m in h and np.isfinite(pd.to_numeric(h[m], errors="coerce")).any()]


def vhr_layers(source: Source) -> list[int]:
    """The layers of the main VHR setting (empty for a ``vhd`` run)."""
    h = heads(source)
    if "in_vhr_layers" not in h:
        return []
    flags = pd.to_numeric(h["in_vhr_layers"], errors="coerce").fillna(0).astype(bool)
    return sorted({int(v) for v in h.loc[flags, "layer"]})


def layer_ranges(values: Sequence[int]) -> str:
    """``[1, 16, 17, 18]`` → ``"1, 16–18"``."""
    out: list[str] = []
    items = sorted(values)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}–{items[j]}")
        i = j + 1
    return ", ".join(out)


def heads_figure(source: Source, metric: str = "vhd_mean") -> go.Figure:
    """Layer x head heat map of one head metric; the main VHR setting's layers are outlined and
    their tick labels marked."""
    if metric not in HEAD_METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(HEAD_METRICS)}")
    h = heads(source)
    if metric not in h:
        raise KeyError(f"this {analysis(source)} run has no head metric {metric!r} (a vhr run has it)")
    grid = h.pivot(index="layer", columns="head", values=metric).astype(float)
    z = grid.to_numpy()
    layers = [int(v) for v in grid.index]
    marked = set(vhr_layers(source))
    in_vhr = np.array([["yes" if layer in marked else "no"] * z.shape[1] for layer in layers])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in grid.columns],
            y=[str(v) for v in layers],
            customdata=in_vhr,
            colorscale=figures.COLORSCALE,
            colorbar={"title": {"text": metric}},
            hovertemplate="layer %{y}, head %{x}<br>" + metric + " = %{z:.4f}<br>in the VHR layers: "
            "%{customdata}<extra></extra>",
        )
    )
    subtitle = METRIC_NOTES[metric]
    if marked:
        subtitle += f"<br>outlined (▸): the main VHR setting's layers {layer_ranges(sorted(marked))}"
    figures.head_grid_layout(fig, f"Heads: {METRIC_NAMES[metric]}", subtitle, len(layers))
    for i, layer in enumerate(layers):
        if layer in marked:
            fig.add_shape(
                type="rect",
                xref="x domain",
                yref="y",
                x0=0,
                x1=1,
                y0=i - 0.5,
                y1=i + 0.5,
                line={"color": VHR_LAYER_COLOUR, "width": 1.5},
                fillcolor="rgba(0,0,0,0)",
            )
    fig.update_yaxes(
        tickmode="array",
        tickvals=[str(v) for v in layers],
        ticktext=[f"▸ {v}" if v in marked else str(v) for v in layers],
    )
    fig.update_layout(plot_bgcolor="#ebebeb", margin={"l": 60, "r": 20, "t": 95 if marked else 75, "b": 50})
    return fig


def top_heads(source: Source, metric: str = "vhd_mean", k: int = 8) -> pd.DataFrame:
    """The ``k`` heads with the largest ``metric`` and their other metrics."""
    h = heads(source)
    cols = ["layer", "head", *[m for m in HEAD_METRICS if m in h]]
    return h.nlargest(k, metric)[cols].reset_index(drop=True)


# ---------------------------------------------------------------------------------- captions


def tokens(source: Source) -> pd.DataFrame:
    return table(source, "tokens")


def words(source: Source) -> pd.DataFrame:
    return table(source, "words")


def caption_scenes(source: Source) -> list[int]:
    """The scenes whose baseline caption has at least one token."""
    t = tokens(source)
    return sorted({int(v) for v in t["scene"]}) if len(t) else []


def hallucinating_scenes(source: Source) -> list[int]:
    """The scenes whose baseline caption has a hallucinated object word."""
    t = tokens(source)
    if not len(t):
        return []
    hit = t[t["object"].astype(bool) & t["hallucinated"].astype(bool)]
    return sorted({int(v) for v in hit["scene"]})


def default_scene(source: Source) -> int | None:
    """The first scene with a hallucinated word, else the first captioned scene (None: no caption)."""
    bad = hallucinating_scenes(source)
    if bad:
        return bad[0]
    scenes = caption_scenes(source)
    return scenes[0] if scenes else None


def _scene_classes(source: Source) -> dict[int, str]:
    """The object classes in each scene ("a, b")."""
    sc = table(source, "scenes")
    return {
        int(scene): str(c).replace(",", ", ") for scene, c in zip(sc["scene"], sc["classes"], strict=True)
    }


def scene_options(source: Source) -> list[dict[str, Any]]:
    """The captioned scenes as dropdown options (value: the scene index), hallucinating ones marked."""
    t = tokens(source)
    classes = _scene_classes(source)
    out = []
    for scene in caption_scenes(source):
        rows = t[(t["scene"] == scene) & t["object"].astype(bool)]
        bad = sorted({str(w) for w in rows.loc[rows["hallucinated"].astype(bool), "shape"]})
        label = f"scene {scene} ({classes.get(scene, '?')})"
        if bad:
            label += f": hallucinates {', '.join(bad)}"
        out.append({"label": label, "value": scene})
    return out


def _tick(token: object) -> str:
    """A generated token as a tick label: newlines and tabs shown, HTML escaped, empty shown as ·."""
    text = str(token).replace("\n", "⏎").replace("\t", "⇥").strip()
    return html.escape(text or "·", quote=False)


def token_kind(row: Any) -> str:
    """``hallucinated``, ``correct`` (the first token of an object word) or ``other``."""
    if not bool(row["object"]):
        return "other"
    return "hallucinated" if bool(row["hallucinated"]) else "correct"


KIND_COLOURS = {"hallucinated": HALLUCINATED_COLOUR, "correct": CORRECT_COLOUR, "other": TOKEN_COLOUR}
KIND_NAMES = {
    "hallucinated": "hallucinated object word",
    "correct": "correct object word",
    "other": "other token",
}


def object_class(row: Any) -> str:
    """The class an object word names (``shape``: "crescent" for "moon"): one name per class, the
    name the scene labels and CHAIR's lists use; the word itself when the row has no class."""
    shape = row.get("shape") if hasattr(row, "get") else None
    return str(shape) if isinstance(shape, str) and shape else str(row["word"])


def object_label(row: Any) -> str:
    """An object word for hovers: its class, with the word as written when that differs
    ("crescent ('moon')")."""
    name, word = object_class(row), str(row["word"])
    return name if word.lower() in ("", name) else f"{name} ('{html.escape(word, quote=False)}')"


def caption_tokens(source: Source, scene: int) -> pd.DataFrame:
    """The baseline caption of ``scene`` token by token, with ``kind`` (see :func:`token_kind`)."""
    t = tokens(source)
    rows = t[t["scene"] == int(scene)].sort_values("step").reset_index(drop=True)
    if rows.empty:
        raise KeyError(
            f"scene {scene} has no baseline caption in this run; captioned: {caption_scenes(source)}"
        )
    rows["kind"] = [token_kind(r) for _, r in rows.iterrows()]
    return rows


def tvhd_caption_figure(source: Source, scene: int) -> go.Figure:
    """T-VHD of every token of ``scene``'s baseline caption (bars; token texts on the x axis):
    object words green when correct and red when hallucinated, the class the word names written
    over its bar (the scene's and CHAIR's name for it: "crescent" over "moon"), the tick labels in
    the same colours; the dashed line is the mean T-VHD of all tokens of the run."""
    rows = caption_tokens(source, scene)
    fig = go.Figure()
    for kind in ("other", "correct", "hallucinated"):
        part = rows[rows["kind"] == kind]
        if part.empty and kind != "other":
            continue
        fig.add_trace(
            go.Bar(
                x=part["step"].astype(int).tolist(),
                y=part["t_vhd"].astype(float).tolist(),
                name=KIND_NAMES[kind],
                marker_color=KIND_COLOURS[kind],
                width=0.8,
                text=[object_class(r) for _, r in part.iterrows()] if kind != "other" else None,
                textposition="outside" if kind != "other" else None,
                textfont={"size": 11, "color": KIND_COLOURS[kind]},
                constraintext="none",
                cliponaxis=False,
                customdata=np.column_stack(
                    [[_tick(v) for v in part["token"]], [object_label(r) for _, r in part.iterrows()]]
                )
                if len(part)
                else None,
                hovertemplate="step %{x}: %{customdata[0]}<br>T-VHD %{y:.2f}"
                + ("" if kind == "other" else f"<br>{KIND_NAMES[kind]} %{{customdata[1]}}")
                + "<extra></extra>",
            )
        )
    mean_all = float(pd.to_numeric(tokens(source)["t_vhd"], errors="coerce").mean())
    if math.isfinite(mean_all):
        steps = rows["step"].astype(int)
        fig.add_trace(
            go.Scatter(
                x=[int(steps.min()) - 0.5, int(steps.max()) + 0.5],
                y=[mean_all, mean_all],
                mode="lines",
                name=f"mean T-VHD, all tokens ({mean_all:.2f})",
                line={"dash": "dash", "color": "#555", "width": 1},
                hoverinfo="skip",
            )
        )
    ticks = []
    for _, r in rows.iterrows():
        label = _tick(r["token"])
        if r["kind"] != "other":
            label = f'<span style="color:{KIND_COLOURS[r["kind"]]}"><b>{label}</b></span>'
        ticks.append(label)
    n_bad = int((rows["kind"] == "hallucinated").sum())
    n_ok = int((rows["kind"] == "correct").sum())
    # The legend sits at the foot of the figure, under the axis title: the bottom margin holds the
    # tick labels (tokens at -60°, about 5 px a character), the axis title and two legend rows.
    longest = max((len(_tick(t)) for t in rows["token"]), default=1)
    ticks_px = int(12 + 5.2 * min(longest, 24))
    fig.update_layout(
        title=figures.titled(
            f"T-VHD along the baseline caption of scene {int(scene)}",
            f"{len(rows)} tokens: {n_ok} correct and {n_bad} hallucinated object word(s)<br>T-VHD: sum over "
            "layers of each layer's top-k VHD at the step that produced the token",
        ),
        xaxis={"title": {"text": "generated token"}, "tickmode": "array",
               "tickvals": rows["step"].astype(int).tolist(), "ticktext": ticks, "tickangle": -60,
               "tickfont": {"size": 10}},
        yaxis={"title": {"text": "T-VHD"}},
        barmode="overlay",
        height=430 + ticks_px,
        margin={"l": 60, "r": 20, "t": 105, "b": ticks_px + 80},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0},
    )  # fmt: skip
    return fig


def image_figure(source: Source, scene: int) -> go.Figure:
    """The evaluated (noisy) image of ``scene``; a message when the run did not store it."""
    scene = int(scene)
    images = array(source, "images") if has_array(source, "images") else np.empty((0, 0, 0, 3), np.uint8)
    if not 0 <= scene < len(images):
        return figures.message_figure(
            f"The image of scene {scene} was not stored (the run keeps the first {len(images)} "
            "images; raise n_display to keep more)."
        )
    noise = config(source).get("noise")
    fig = go.Figure(go.Image(source=figures.png_uri(images[scene]), hoverinfo="skip"))
    fig.update_layout(
        title=figures.titled(
            f"Scene {scene}: {_scene_classes(source).get(scene, '?')}",
            "the image the model saw" + (f" (pixel noise std {noise})" if noise else ""),
        ),
        xaxis={"visible": False},
        yaxis={"visible": False, "scaleanchor": "x"},
        height=380,
        margin={"l": 10, "r": 10, "t": 70, "b": 10},
    )
    return fig


@dataclass(frozen=True)
class Caption:
    """One caption of a scene under one setting, with CHAIR's reading of it."""

    setting: str
    text: str
    mentioned: list[str]
    hallucinated: list[str]
    missed: list[str]


def scene_captions(source: Source, scene: int) -> list[Caption]:
    """The baseline caption of ``scene`` and, in a vhr run, the caption under the main VHR setting."""
    caps = table(source, "captions")
    wanted = [BASELINE, *([m] if (m := main_setting(source)) else [])]
    out = []
    for name in wanted:
        rows = caps[(caps["setting"].astype(str) == name) & (caps["scene"] == int(scene))]
        if rows.empty:
            continue
        r = rows.iloc[0]
        out.append(
            Caption(
                setting=name,
                text=str(r["text"]) if isinstance(r["text"], str) else "",
                mentioned=_split(r.get("mentioned")),
                hallucinated=_split(r.get("hallucinated")),
                missed=_split(r.get("missed")),
            )
        )
    return out


def scene_truth(source: Source, scene: int) -> str:
    sc = table(source, "scenes")
    rows = sc[sc["scene"] == int(scene)]
    return str(rows["caption_truth"].iloc[0]) if len(rows) and "caption_truth" in rows else ""


# ---------------------------------------------------------------------------------- T-VHD test


def tvhd_test_row(source: Source) -> dict[str, float]:
    t = table(source, "tvhd_test")
    if t.empty:
        return {}
    return {str(k): float(v) for k, v in t.iloc[0].items()}


def tvhd_test_line(source: Source) -> str:
    """The hallucinated vs correct test as one sentence (NaN read as "n/a")."""
    r = tvhd_test_row(source)
    if not r:
        return "No T-VHD test in this run."
    n_h, n_c = int(r.get("n_hallucinated", 0)), int(r.get("n_correct", 0))
    line = (
        f"Hallucinated object words: n = {n_h}, mean T-VHD {num(r.get('mean_hallucinated'), '.2f')}, "
        f"median {num(r.get('median_hallucinated'), '.2f')}; correct: n = {n_c}, mean "
        f"{num(r.get('mean_correct'), '.2f')}, median {num(r.get('median_correct'), '.2f')}; "
        f"Mann–Whitney U {num(r.get('u'), '.1f')}, two-sided p = {num(r.get('p_value'), '.3g')}; "
        f"AUROC of T-VHD for 'correct' {num(r.get('auroc_correct'), '.3f')}"
    )
    if not (n_h and n_c):
        line += " (the test needs words of both kinds)"
    return line + "."


def tvhd_distribution_figure(source: Source) -> go.Figure:
    """T-VHD of hallucinated vs correct object words of the baseline captions: a box per group
    with every word drawn as a point beside it (hover: scene and word)."""
    w = words(source)
    if w.empty:
        return figures.message_figure(
            "The baseline captions name no object word, so there is no T-VHD distribution to show."
        )
    fig = go.Figure()
    labels = []
    for kind, flag in (("correct", False), ("hallucinated", True)):
        part = w[w["hallucinated"].astype(bool) == flag]
        label = f"{KIND_NAMES[kind]}s (n = {len(part)})"
        labels.append(label)
        if part.empty:
            # keep the category on the axis, and say why it is empty
            fig.add_trace(go.Scatter(x=[label], y=[None], mode="markers", showlegend=False, hoverinfo="skip"))
            fig.add_annotation(x=label, y=0.5, xref="x", yref="paper", showarrow=False,
                               text=f"no {KIND_NAMES[kind]}", font={"color": KIND_COLOURS[kind]})  # fmt: skip
            continue
        fig.add_trace(
            go.Box(
                y=part["t_vhd"].astype(float).tolist(),
                x=[label] * len(part),
                name=label,
                marker={"color": KIND_COLOURS[kind], "opacity": 0.8, "size": 7},
                line={"color": KIND_COLOURS[kind]},
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                boxmean=True,
                width=0.5,
                customdata=np.column_stack(
                    [part["scene"].astype(int), [object_label(r) for _, r in part.iterrows()]]
                ),
                hovertemplate="scene %{customdata[0]}, %{customdata[1]}<br>T-VHD %{y:.2f}<extra></extra>",
            )
        )
    r = tvhd_test_row(source)
    sub = (
        f"Mann–Whitney p = {num(r.get('p_value'), '.3g')}, AUROC (correct) {num(r.get('auroc_correct'), '.3f')}"
        if r
        else ""
    )
    fig.update_layout(
        title=figures.titled("T-VHD of object words: hallucinated vs correct", sub or "no test row"),
        yaxis={"title": {"text": "T-VHD"}},
        xaxis={
            "categoryorder": "array",
            "categoryarray": labels,
        },
        height=420,
        margin={"l": 60, "r": 20, "t": 90, "b": 50},
        showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------------- benchmarks


def summary_table(source: Source) -> pd.DataFrame:
    return table(source, "summary")


def pope_kinds(source: Source) -> list[str]:
    s = summary_table(source)
    return list(dict.fromkeys(str(k) for k in s.loc[s["benchmark"] == "POPE", "setting"]))


def benchmark_panels(source: Source) -> list[tuple[str, str, str, str]]:
    """(benchmark, setting, metric, title) of each panel the run has: CHAIR_S, CHAIR_I, then F1 and
    accuracy of each POPE kind."""
    s = summary_table(source)
    have = {
        (str(b), str(k), str(m)) for b, k, m in zip(s["benchmark"], s["setting"], s["metric"], strict=True)
    }
    panels = [
        ("CHAIR", "captions", m, label) for m, label in CHAIR_PANELS if ("CHAIR", "captions", m) in have
    ]
    for kind in pope_kinds(source):
        panels += [
            ("POPE", kind, m, f"POPE {kind}: {label}")
            for m, label in POPE_PANELS
            if ("POPE", kind, m) in have
        ]
    return panels


def _panel_grid(titles: list[str], cols: int = 2) -> tuple[go.Figure, int, int]:
    """A figure of one panel per title, ``cols`` to a row, and its (rows, cols)."""
    n = len(titles)
    rows, cols = max(1, -(-n // cols)), min(cols, max(1, n))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=titles,
        horizontal_spacing=0.1,
        vertical_spacing=min(0.5 / rows + 0.05, 0.3),
    )
    return fig, rows, cols


def _add_points(
    fig: go.Figure, i: int, cols: int, values: np.ndarray, low: Any, high: Any, **trace: Any
) -> tuple[int, int]:
    """Draw ``values`` (one per setting, ``trace["x"]``) as markers with their intervals [``low``,
    ``high``] in panel ``i`` of a :func:`_panel_grid` figure; return the panel's (row, col)."""
    row, col = i // cols + 1, i % cols + 1
    fig.add_trace(
        go.Scatter(
            y=values.tolist(),
            mode="markers",
            error_y=figures.error_bars(values, low, high, clip=True, width=5),
            **trace,
        ),
        row=row,
        col=col,
    )
    return row, col


def _panel_layout(fig: go.Figure, rows: int, title: str, subtitle: str) -> go.Figure:
    """The settings along each panel's x axis, the title, and a height for ``rows`` rows of panels;
    the top margin grows with the subtitle's lines, so that none runs into the panels' titles."""
    fig.update_xaxes(tickangle=-30, type="category")
    top = 95 + 20 * (subtitle.count("<br>") + 1)
    fig.update_layout(
        title=figures.titled(title, subtitle),
        showlegend=False,
        height=top + 15 + 290 * rows,
        margin={"l": 60, "r": 20, "t": top, "b": 90},
    )
    return fig


def benchmark_figure(source: Source) -> go.Figure:
    """CHAIR_S, CHAIR_I and POPE F1 / accuracy per setting (baseline first) with the percentile
    bootstrap intervals of ``summary``; dotted line: the baseline's value."""
    s = summary_table(source)
    panels = benchmark_panels(source)
    if not panels:
        return figures.message_figure("The run's summary has no CHAIR or POPE metric.")
    order = [n for n in setting_order(source) if n in set(s["vhr_setting"].astype(str))]
    colours = _setting_colours(source)
    fig, rows, cols = _panel_grid([p[3] for p in panels])
    for i, (bench, kind, metric, _) in enumerate(panels):
        part = s[(s["benchmark"] == bench) & (s["setting"] == kind) & (s["metric"] == metric)]
        part = part.set_index(part["vhr_setting"].astype(str)).reindex(
            [n for n in order if n in set(part["vhr_setting"])]
        )
        values = part["value"].to_numpy(float)
        row, col = _add_points(
            fig, i, cols, values, part["lo"], part["hi"],
            x=list(part.index),
            name=f"{bench} {kind} {metric}",
            marker={"size": 11, "color": [colours.get(n, SETTING_COLOUR) for n in part.index]},
            customdata=np.column_stack([part["lo"].to_numpy(float), part["hi"].to_numpy(float),
                                        part["n"].to_numpy(float)]),
            hovertemplate="%{x}: " + metric + " %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
            "<br>(95% bootstrap interval; n = %{customdata[2]})<extra></extra>",
        )  # fmt: skip
        if BASELINE in part.index and math.isfinite(float(part.loc[BASELINE, "value"])):
            fig.add_hline(y=float(part.loc[BASELINE, "value"]), line={"dash": "dot", "color": BASELINE_COLOUR,
                          "width": 1}, row=row, col=col)  # fmt: skip
            drop = {"recall": RECALL_DROP, "words": LENGTH_DROP}.get(metric) if bench == "CHAIR" else None
            if drop is not None:
                fig.add_hline(y=(1 - drop) * float(part.loc[BASELINE, "value"]),
                              line={"dash": "dash", "color": WARNING_COLOUR, "width": 1}, row=row, col=col)  # fmt: skip
        if not np.isfinite(values).any():
            fig.add_annotation(text="undefined (no object mentioned)", showarrow=False, x=0.5, y=0.5,
                               xref=f"x{i + 1 if i else ''} domain", yref=f"y{i + 1 if i else ''} domain")  # fmt: skip
    alpha = config(source).get("alpha_ci", 0.05)
    found = collapses(source)
    _flag_settings(fig, {c.setting for c in found}, order)
    subtitle = (
        f"{100 * (1 - float(alpha)):.0f}% percentile bootstrap intervals; dotted: the baseline; red dashes: "
        f"recall −{100 * RECALL_DROP:.0f}%, length −{100 * LENGTH_DROP:.0f}%<br>"
        "CHAIR (share hallucinated): lower is better, read with recall and length; POPE: higher is better"
    )
    if found:
        subtitle += "<br>" + _warning_line(found)
    return _panel_layout(fig, rows, "CHAIR, recall, caption length and POPE per setting", subtitle)


@dataclass(frozen=True)
class Collapse:
    """A setting whose captions name far fewer objects (recall) or say far less (length) than the
    baseline's: its CHAIR is low for the wrong reason."""

    setting: str
    recall: float
    base_recall: float
    words: float
    base_words: float
    recall_fell: bool
    length_fell: bool

    def message(self) -> str:
        change = f"{100 * (self.recall / self.base_recall - 1):+.0f}%" if self.base_recall > 0 else "n/a"
        what = " and ".join(
            w
            for w, hit in (
                ("object recall collapses", self.recall_fell),
                ("captions shrink", self.length_fell),
            )
            if hit
        )
        return (
            f"Under '{self.setting}' {what}: object recall {num(self.recall, '.2f')} against "
            f"{num(self.base_recall, '.2f')} for the baseline ({change}), mean caption length "
            f"{num(self.words, '.1f')} against {num(self.base_words, '.1f')} words. A lower CHAIR here comes "
            "from describing less, not from hallucinating less: read its captions before trusting it."
        )


def _chair_value(s: pd.DataFrame, setting: str, metric: str) -> float:
    row = _metric_row(s, setting, "CHAIR", "captions", metric)
    return float(row["value"]) if row is not None else math.nan


def collapses(source: Source) -> list[Collapse]:
    """The settings whose object recall falls by more than :data:`RECALL_DROP` of the baseline's, or
    whose mean caption length falls by more than :data:`LENGTH_DROP` of it (run order)."""
    s = summary_table(source)
    base_recall, base_words = _chair_value(s, BASELINE, "recall"), _chair_value(s, BASELINE, "words")
    out = []
    for name in setting_order(source):
        if name == BASELINE:
            continue
        recall, words = _chair_value(s, name, "recall"), _chair_value(s, name, "words")
        recall_fell = (
            math.isfinite(recall) and math.isfinite(base_recall) and recall < (1 - RECALL_DROP) * base_recall
        )
        length_fell = (
            math.isfinite(words) and math.isfinite(base_words) and words < (1 - LENGTH_DROP) * base_words
        )
        if recall_fell or length_fell:
            out.append(Collapse(name, recall, base_recall, words, base_words, recall_fell, length_fell))
    return out


def collapse_rule() -> str:
    """The rule :func:`collapses` applies, in words."""
    return (
        f"a setting is flagged when its object recall falls by more than {100 * RECALL_DROP:.0f}% of the "
        f"baseline's, or its mean caption length by more than {100 * LENGTH_DROP:.0f}%"
    )


def _flag_settings(fig: go.Figure, flagged: set[str], names: Sequence[str]) -> None:
    """Mark the ``flagged`` settings' tick labels (⚠, red) on every panel's x axis."""
    if not flagged:
        return
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(names),
        ticktext=[
            f'<span style="color:{WARNING_COLOUR}"><b>⚠ {html.escape(n)}</b></span>'
            if n in flagged
            else html.escape(n)
            for n in names
        ],
    )


def _warning_line(found: list[Collapse]) -> str:
    """One red line naming the flagged settings (plotly's title markup)."""
    names = html.escape(", ".join(f"{c.setting} (recall {num(c.recall, '.2f')})" for c in found))
    return f'<span style="color:{WARNING_COLOUR}"><b>⚠ recall or length collapses under {names}</b></span>'


def deltas_table(source: Source) -> pd.DataFrame:
    """The paired changes against the baseline (empty for a ``vhd`` run)."""
    return _optional(source, "deltas")


def _verdict(metric: str, lo: float, hi: float) -> str:
    """``better``, ``worse`` or ``unclear`` (the interval holds 0 or is undefined, or the metric has
    no better direction)."""
    if metric in NO_DIRECTION or not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "unclear"
    up = lo > 0
    return "worse" if up == (metric in LOWER_IS_BETTER) else "better"


VERDICT_COLOURS = {"better": CORRECT_COLOUR, "worse": HALLUCINATED_COLOUR, "unclear": UNCLEAR_COLOUR}


def deltas_figure(source: Source) -> go.Figure:
    """Paired change of each VHR setting against the baseline (scenes resampled together) with its
    interval, zero line drawn; green: the interval shows an improvement, red: a worsening, grey:
    the interval holds zero."""
    d = deltas_table(source)
    if d.empty:
        return figures.message_figure(
            "No VHR setting in this run (a vhd run), so there are no paired changes against the baseline."
        )
    panels = [p for p in benchmark_panels(source)
              if ((d["benchmark"] == p[0]) & (d["kind"] == p[1]) & (d["metric"] == p[2])).any()]  # fmt: skip
    if not panels:
        return figures.message_figure("The run's deltas have no CHAIR or POPE metric.")
    order = [n for n in setting_order(source) if n != BASELINE]
    colours = _setting_colours(source)
    fig, rows, cols = _panel_grid([f"Δ {p[3]}" for p in panels])
    for i, (bench, kind, metric, _) in enumerate(panels):
        part = d[(d["benchmark"] == bench) & (d["kind"] == kind) & (d["metric"] == metric)]
        part = part.set_index(part["setting"].astype(str))
        part = part.reindex([n for n in order if n in part.index] + [n for n in part.index if n not in order])
        values = part["delta"].to_numpy(float)
        lo, hi = part["lo"].to_numpy(float), part["hi"].to_numpy(float)
        verdicts = [_verdict(metric, a, b) for a, b in zip(lo, hi, strict=True)]
        row, col = _add_points(
            fig, i, cols, values, lo, hi,
            x=list(part.index),
            name=f"Δ {bench} {kind} {metric}",
            marker={"size": 11, "color": [VERDICT_COLOURS[v] for v in verdicts],
                    "line": {"width": 1.5, "color": [colours.get(n, SETTING_COLOUR) for n in part.index]}},
            customdata=[[float(a), float(b), v] for a, b, v in zip(lo, hi, verdicts, strict=True)],
            hovertemplate="%{x}: Δ" + metric + " %{y:+.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
            "<br>%{customdata[2]}<extra></extra>",
        )  # fmt: skip
        fig.add_hline(y=0, line={"color": "#222", "width": 1.2}, row=row, col=col)
    found = collapses(source)
    _flag_settings(fig, {c.setting for c in found}, order)
    subtitle = (
        "setting − baseline, scenes resampled together, with its interval<br>"
        "green: better, red: worse, grey: the interval holds 0"
    )
    if found:
        subtitle += "<br>" + _warning_line(found)
    return _panel_layout(fig, rows, "Paired change against the baseline", subtitle)


def summary_wide(source: Source) -> pd.DataFrame:
    """One row per setting (baseline first), one column per (benchmark, metric) as "value [lo, hi]"."""
    s = summary_table(source)
    order = [n for n in setting_order(source) if n in set(s["vhr_setting"].astype(str))]
    cols: dict[str, dict[str, str]] = {}
    for r in s.itertuples(index=False):
        key = str(r.metric) if r.benchmark == "CHAIR" else f"POPE {r.setting} {r.metric}"
        cols.setdefault(key, {})[str(r.vhr_setting)] = _interval(r.value, r.lo, r.hi)
    frame = pd.DataFrame(cols).reindex(order)
    frame.index.name = "setting"
    return frame.fillna("").reset_index()


# ---------------------------------------------------------------------------------- findings


def _metric_row(s: pd.DataFrame, setting: str, bench: str, kind: str, metric: str) -> pd.Series | None:
    """The row of ``summary`` table ``s`` for one setting and metric (None: the run has none)."""
    rows = s[(s["vhr_setting"].astype(str) == setting) & (s["benchmark"] == bench) & (s["setting"] == kind)
             & (s["metric"] == metric)]  # fmt: skip
    return rows.iloc[0] if len(rows) else None


def _delta_row(d: pd.DataFrame, setting: str, bench: str, kind: str, metric: str) -> pd.Series | None:
    """The row of ``deltas`` table ``d`` for one setting and metric (None: the run has none)."""
    if d.empty:
        return None
    rows = d[(d["setting"].astype(str) == setting) & (d["benchmark"] == bench) & (d["kind"] == kind)
             & (d["metric"] == metric)]  # fmt: skip
    return rows.iloc[0] if len(rows) else None


def _delta_phrase(row: pd.Series | None, metric: str) -> str:
    if row is None:
        return ""
    if not all(math.isfinite(float(row[c])) for c in ("delta", "lo", "hi")):
        return "no paired interval: the metric is undefined in some resamples"
    verdict = _verdict(metric, float(row["lo"]), float(row["hi"]))
    change = {"better": "an improvement", "worse": "a worsening", "unclear": "the interval holds 0"}[verdict]
    return f"Δ {num(row['delta'], '+.3f')} [{num(row['lo'], '+.3f')}, {num(row['hi'], '+.3f')}], {change}"


def findings(source: Source) -> list[str]:
    """Plain-text sentences reading the run's numbers (no number is written here that is not in
    the run's tables or notes)."""
    lines: list[str] = []
    n_scenes = len(table(source, "scenes"))
    summary, d = summary_table(source), deltas_table(source)
    agree = notes(source).get("teacher_forced_agreement")
    if agree is not None:
        lines.append(
            f"{analysis(source)} on {model_name(source)}, {n_scenes} scenes: teacher forcing reproduces "
            f"{100 * float(agree):.1f}% of the generated caption tokens (VHD is read on that pass)."
        )
    h = heads(source)
    if "vhd_mean" in h and np.isfinite(h["vhd_mean"].astype(float)).any():
        top = h.loc[h["vhd_mean"].astype(float).idxmax()]
        per_layer = h.groupby("layer")["vhd_mean"].mean()
        lines.append(
            f"The most vision-aware head is layer {int(top['layer'])}, head {int(top['head'])} (mean VHD "
            f"{float(top['vhd_mean']):.3f}); per layer, mean VHD is highest in layer {int(per_layer.idxmax())} "
            f"({float(per_layer.max()):.3f}) and lowest in layer {int(per_layer.idxmin())} "
            f"({float(per_layer.min()):.3f})."
        )
    main = main_setting(source)
    s = settings_table(source)
    if main is not None and len(s):
        r = s.iloc[0]
        layers = vhr_layers(source)
        extra = ""
        if "outlier_share" in h and layers:
            in_layers = h[h["layer"].isin(layers)]
            extra = (
                f"; {100 * float(in_layers['outlier_share'].mean()):.1f}% of the head-input pairs in those "
                "layers were set aside as outliers"
            )
        lines.append(
            f"The main VHR setting '{main}' (alpha {num(r.get('alpha'), 'g')}, layers {r.get('layers')}"
            + (f" = {layer_ranges(layers)}" if layers else "")
            + f") reinforced {num(r.get('heads_reinforced_mean'), '.1f')} heads per input on average{extra}."
        )
    w = words(source)
    test = tvhd_test_row(source)
    n_h = int(test.get("n_hallucinated", 0)) if test else 0
    n_c = int(test.get("n_correct", 0)) if test else 0
    if w.empty:
        lines.append("The baseline captions name no object word, so T-VHD cannot be compared by label.")
    elif not n_h:
        lines.append(
            f"The baseline captions hold {n_c} correct object word(s) and no hallucinated one, so T-VHD of "
            f"hallucinated and correct words cannot be compared (mean T-VHD of correct words "
            f"{num(test.get('mean_correct'), '.2f')})."
        )
    elif not n_c:
        lines.append(
            f"All {n_h} object words of the baseline captions are hallucinated; there is nothing to compare."
        )
    else:
        lower = float(test["mean_hallucinated"]) < float(test["mean_correct"])
        p = float(test.get("p_value", math.nan))
        lines.append(
            f"T-VHD of hallucinated object words (n = {n_h}, mean {num(test['mean_hallucinated'], '.2f')}, "
            f"median {num(test['median_hallucinated'], '.2f')}) is {'lower' if lower else 'not lower'} than of "
            f"correct ones (n = {n_c}, mean {num(test['mean_correct'], '.2f')}, median "
            f"{num(test['median_correct'], '.2f')}): Mann–Whitney p = {num(p, '.3g')}, AUROC of T-VHD for "
            f"'correct' {num(test.get('auroc_correct'), '.3f')} ("
            + ("the paper's direction" if lower else "against the paper's direction")
            + (", significant at 5%" if math.isfinite(p) and p < 0.05 else ", not significant at 5%")
            + ")."
        )
    for metric, label in CHAIR_PANELS:
        base = _metric_row(summary, BASELINE, "CHAIR", "captions", metric)
        if base is None:
            continue
        spec = ".1f" if metric == "words" else ".3f"
        text = f"Baseline {label} {_interval(base['value'], base['lo'], base['hi'], spec)}"
        if not math.isfinite(float(base["value"])):
            text += " (undefined: no object mentioned)"
        if main is not None:
            got = _metric_row(summary, main, "CHAIR", "captions", metric)
            if got is not None and math.isfinite(float(got["value"])):
                text += f"; under '{main}' {_interval(got['value'], got['lo'], got['hi'], spec)}"
                phrase = _delta_phrase(_delta_row(d, main, "CHAIR", "captions", metric), metric)
                text += f" ({phrase})" if phrase else ""
        lines.append(text + f" over {n_scenes} captions.")
    for kind in pope_kinds(source):
        base = _metric_row(summary, BASELINE, "POPE", kind, "F1")
        acc = _metric_row(summary, BASELINE, "POPE", kind, "accuracy")
        if base is None:
            continue
        text = f"POPE {kind}: baseline F1 {_interval(base['value'], base['lo'], base['hi'])}"
        if acc is not None:
            text += f", accuracy {_interval(acc['value'], acc['lo'], acc['hi'])}"
        if main is not None:
            got = _metric_row(summary, main, "POPE", kind, "F1")
            if got is not None:
                text += f"; under '{main}' F1 {_interval(got['value'], got['lo'], got['hi'])}"
                phrase = _delta_phrase(_delta_row(d, main, "POPE", kind, "F1"), "F1")
                text += f" ({phrase})" if phrase else ""
        lines.append(text + f" over {int(base['n'])} questions.")
    if len(d):
        chair = d[(d["benchmark"] == "CHAIR") & (d["metric"] == "CHAIR_S")]
        if len(chair) > 1:
            verdicts = {
                str(r.setting): _verdict("CHAIR_S", float(r.lo), float(r.hi)) for r in chair.itertuples()
            }
            better = [n for n, v in verdicts.items() if v == "better"]
            worse = [n for n, v in verdicts.items() if v == "worse"]
            lines.append(
                f"Across the {len(chair)} VHR settings, CHAIR_S improves clearly under "
                f"{', '.join(better) or 'none'} and worsens clearly under {', '.join(worse) or 'none'}; "
                "the others' intervals hold 0."
            )
    lines += [f"Warning: {c.message()}" for c in collapses(source)]
    base = _metric_row(summary, BASELINE, "CHAIR", "captions", "CHAIR_S")
    if n_scenes and base is not None:
        width = float(base["hi"]) - float(base["lo"])
        spread = (
            f"the baseline CHAIR_S interval alone spans {num(width, '.3f')}, so smaller differences are "
            "not resolved"
            if math.isfinite(width) and width > 0
            else f"the baseline CHAIR_S is {num(base['value'])} in every resample (an interval of no width)"
        )
        lines.append(f"Every interval is a percentile bootstrap over these {n_scenes} scenes; {spread}.")
    return lines
