"""Retrieval-head views: what the retrieval page, its report sections and the notebook show.

Every function takes a saved :class:`~analyses.runstore.Run` or the
:class:`~analyses.base.AnalysisResult` that :func:`analyses.retrieval.run_retrieval` returns (so a
notebook can draw a result before saving it) and returns a figure or a small table; the page and the
report only arrange them. Scores over few passing tests are weak evidence, so every head figure names
how many tests passed the gate. The tables they read are described in docs/analyses/retrieval.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses import retrieval
from dashboard.core import common, figures

Source = common.Source
MaskMetric = Literal["recall", "recalled"]
MASK_METRICS: tuple[MaskMetric, ...] = ("recall", "recalled")
MASK_METRIC_LABELS: dict[MaskMetric, str] = {
    "recall": "mean ROUGE-1 recall",
    "recalled": "share of tests recalled (above the gate)",
}
REQUIRED_TABLES = frozenset({"heads", "tests", "test_scores"})
WEAK_EVIDENCE = 10  # fewer passing tests than this: say that the scores are weak evidence

TOP_COLOUR = "#d73027"
RANDOM_COLOUR = "#4575b4"
NONE_COLOUR = "#5b6475"
THRESHOLD_COLOUR = "#e4572e"
RING_COLOUR = "#e4572e"


# ---------------------------------------------------------------------------------------- access


def table(source: Source, name: str) -> pd.DataFrame:
    """Table ``name`` of a saved run or of an unsaved result (a copy either way)."""
    return common.table(source, name, kind="retrieval")


def is_retrieval(source: Source) -> bool:
    """Whether the source has the retrieval tables this module draws."""
    return common.has_tables(source, REQUIRED_TABLES)


def has_masking(source: Source) -> bool:
    return "masking" in source.table_names


def threshold(source: Source) -> float:
    """The score above which a head is a retrieval head (the run's ``threshold``)."""
    return float(source.config.threshold)


def gate(source: Source) -> float:
    """The ROUGE-1 recall a test must exceed to count (the run's ``rouge_gate``)."""
    return float(source.config.rouge_gate)


def protocol(source: Source) -> str:
    """``"needle"`` (the model reproduces the whole needle; the paper's) or ``"answer"``."""
    return str(source.config.protocol)


def span_noun(source: Source) -> str:
    """What the scored span is, in words: "the needle" or "the answer"."""
    return "the needle" if source.config.scored_span == "needle" else "the answer"


def protocol_line(source: Source) -> str:
    """The run's protocol in one sentence (plain text)."""
    return retrieval.protocol_line(source.config)


def has_validation(source: Source) -> bool:
    return "validation" in source.table_names


def validation_table(source: Source) -> pd.DataFrame | None:
    """The held-out validation table, or None for a run made before the analysis validated."""
    return table(source, "validation") if has_validation(source) else None


def validation_note(source: Source) -> str:
    """What the held-out validation tested, or why it tested nothing (plain text)."""
    cfg = source.config
    if not has_validation(source):
        return "This run was made before the retrieval heads were validated on held-out tests."
    if not cfg.validation:
        return "The held-out validation was off in this run (validation=False)."
    held = table(source, "heldout") if "heldout" in source.table_names else pd.DataFrame()
    recalled = int(held["passed"].sum()) if len(held) else 0
    found = table(source, "validation")
    lead = (
        f"The retrieval heads found on the grid (score > {threshold(source):g}) attend uniformly while "
        f"the model answers {len(held)} held-out tests (new needles in new haystacks, "
        f"{cfg.heldout_tokens} tokens); {recalled} were recalled unmasked and measure the drop in "
        f"ROUGE-1 recall, against {cfg.n_null} random same-size head sets from outside them."
    )
    if not len(found):
        return lead + " No head scored above the threshold, so nothing was tested."
    if recalled == 0:
        return lead + " With no held-out test recalled there was no recall to lose: not validated."
    return lead


def heads_table(source: Source) -> pd.DataFrame:
    """The heads table sorted by (layer, head), ``is_retrieval`` as bool."""
    heads = table(source, "heads").sort_values(["layer", "head"]).reset_index(drop=True)
    heads["is_retrieval"] = heads["is_retrieval"].astype(bool)
    return heads


def tests_table(source: Source) -> pd.DataFrame:
    tests = table(source, "tests").sort_values("test").reset_index(drop=True)
    tests["passed"] = tests["passed"].astype(bool)
    return tests


def shape(source: Source) -> tuple[int, int]:
    """(layers, heads) of the model, from the heads table."""
    heads = table(source, "heads")
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


def gate_counts(source: Source) -> tuple[int, int]:
    """(tests that passed the ROUGE-1 gate, all tests)."""
    tests = tests_table(source)
    return int(tests["passed"].sum()), len(tests)


def gate_line(source: Source) -> str:
    """One sentence: how many tests passed the gate, so what the scores rest on (plain text)."""
    passed, total = gate_counts(source)
    head = f"{passed} of {total} tests passed the ROUGE-1 gate (recall > {gate(source):g})"
    if passed == 0:
        return head + ": no head has a score (nothing was recalled, so nothing can be said)."
    line = head + f"; every head score is a mean over these {passed} test{'s' if passed != 1 else ''}."
    if passed < WEAK_EVIDENCE:
        line += " Scores over so few tests are weak evidence."
    return line


def _fmt_list(values: Any) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (values or []))


def settings_line(source: Source) -> str:
    """One line naming the run's grid and scoring settings (plain text)."""
    cfg = source.config
    parts = [
        f"protocol {cfg.protocol}",
        f"lengths {_fmt_list(cfg.lengths)} tokens",
        f"depths {_fmt_list(cfg.depths)}",
        f"{cfg.n_needles} needle(s) per cell",
        f"gate ROUGE-1 recall > {gate(source):g}",
        f"retrieval head: score > {threshold(source):g}",
        f"scored span: {'whole needle' if cfg.scored_span == 'needle' else 'answer tokens'}",
    ]
    if cfg.mask_fractions:
        shares = ", ".join(f"{100 * float(f):g}%" for f in cfg.mask_fractions)
        parts.append(f"masking K = {shares} of heads, {cfg.mask_seeds} random seed(s)")
    else:
        parts.append("no masking experiment")
    if cfg.validation:
        parts.append(
            f"held-out validation on {cfg.heldout_needles} needle(s) x {len(cfg.heldout_depths)} depth(s) at "
            f"{cfg.heldout_tokens} tokens against {cfg.n_null} random head sets"
        )
    parts.append(f"seed {cfg.seed}")
    return ", ".join(parts)


def overview(source: Source) -> dict[str, Any]:
    """The headline numbers: tests, passed, heads, retrieval heads and their share, the top head."""
    heads = heads_table(source)
    passed, total = gate_counts(source)
    scored = heads["retrieval_score"].notna()
    n_ret = int((heads["is_retrieval"] & scored).sum())
    top = heads[scored].sort_values("retrieval_score", ascending=False, kind="stable")
    return {
        "tests": total,
        "tests_passed": passed,
        "heads": len(heads),
        "retrieval_heads": n_ret,
        "share_retrieval_heads": n_ret / len(heads) if passed and len(heads) else float("nan"),
        "threshold": threshold(source),
        "gate": gate(source),
        "top_head": f"L{int(top.iloc[0]['layer'])}H{int(top.iloc[0]['head'])}" if len(top) else None,
        "top_score": float(top.iloc[0]["retrieval_score"]) if len(top) else float("nan"),
    }


# ---------------------------------------------------------------------------------------- heads


def head_label(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def score_matrix(source: Source, column: str = "retrieval_score") -> np.ndarray:
    """``[L, H]`` of a heads-table column (NaN where a head has none)."""
    heads = heads_table(source)
    n_layers, n_heads = shape(source)
    z = np.full((n_layers, n_heads), np.nan)
    z[heads["layer"].to_numpy(dtype=int), heads["head"].to_numpy(dtype=int)] = heads[column].to_numpy(
        dtype=float
    )
    return z


def _zmax(z: np.ndarray) -> float:
    return float(max(1.0, np.nanmax(z))) if np.isfinite(z).any() else 1.0


def _rings(marks: list[tuple[int, int]], name: str, hover: str) -> go.Scatter:
    return figures.head_rings(marks, name, hover, color=RING_COLOUR)


def retrieval_heads(source: Source) -> list[tuple[int, int]]:
    """(layer, head) of every head scoring above the threshold."""
    heads = heads_table(source)
    part = heads[heads["is_retrieval"] & heads["retrieval_score"].notna()]
    return [(int(r.layer), int(r.head)) for r in part.itertuples(index=False)]


def score_grid(source: Source) -> go.Figure:
    """Layer x head map of the retrieval score (layer 0 at the top), retrieval heads ringed.

    Trace 0 is the score map (so :func:`dashboard.core.figures.mark_head` can outline a head on it),
    trace 1 (when any) the rings. Hover: score, activation frequency, KV head, passing tests hit.
    """
    heads = heads_table(source)
    n_layers, n_heads = shape(source)
    passed, total = gate_counts(source)
    z = score_matrix(source)
    freq = score_matrix(source, "activation_frequency")
    kv = score_matrix(source, "kv_head") if "kv_head" in heads.columns else np.full_like(z, np.nan)
    xs = [str(h) for h in range(n_heads)]
    ys = [str(layer) for layer in range(n_layers)]
    thr = threshold(source)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=xs,
            y=ys,
            name="retrieval score",
            colorscale=figures.COLORSCALE,
            zmin=0.0,
            zmax=_zmax(z),
            colorbar={"title": {"text": "retrieval score"}},
            customdata=np.stack([freq, freq * passed, kv], axis=-1),
            hovertemplate="layer %{y}, head %{x} (KV head %{customdata[2]:.0f})"
            "<br>retrieval score %{z:.3f}"
            "<br>activation frequency %{customdata[0]:.0%} (copy-pasted in %{customdata[1]:.0f} of "
            f"{passed} passing tests)<extra></extra>",
        )
    )
    marks = retrieval_heads(source)
    if marks:
        fig.add_trace(_rings(marks, "retrieval head", f"retrieval head (score > {thr:g})"))
    if passed == 0:
        subtitle = f"no test of {total} passed the gate: no head has a score"
    else:
        subtitle = (
            f"mean over the {passed} of {total} tests that passed the gate; "
            f"ringed: {len(marks)} retrieval heads (score > {thr:g})"
        )
    return figures.head_grid_layout(fig, "Retrieval score per head", subtitle, n_layers)


def score_histogram(source: Source, bin_size: float = 0.02) -> go.Figure:
    """The distribution of retrieval scores across heads, the threshold marked with the share above it.

    The y axis is logarithmic: nearly every head scores 0 and the few retrieval heads would
    otherwise be invisible bars.
    """
    heads = heads_table(source)
    scores = heads["retrieval_score"].to_numpy(dtype=float)
    scores = scores[np.isfinite(scores)]
    passed, total = gate_counts(source)
    if scores.size == 0:
        return figures.message_figure(
            f"no test of {total} passed the ROUGE-1 gate: there are no retrieval scores to show", height=360
        )
    thr = threshold(source)
    above = int((scores > thr).sum())
    top = float(max(scores.max(), thr)) + bin_size
    fig = go.Figure(
        go.Histogram(
            x=scores,
            xbins={"start": 0.0, "end": top, "size": bin_size},
            name="heads",
            marker_color="#31688e",
            hovertemplate="retrieval score %{x}<br>%{y} heads<extra></extra>",
        )
    )
    fig.add_vline(x=thr, line_dash="dash", line_color=THRESHOLD_COLOUR)
    fig.add_annotation(
        x=thr,
        y=1.0,
        xref="x",
        yref="paper",
        xanchor="left",
        yanchor="top",
        showarrow=False,
        text=f" {above} of {len(scores)} heads ({above / len(scores):.1%}) score > {thr:g}",
        font={"color": THRESHOLD_COLOUR},
    )
    fig.update_layout(
        title=figures.titled(
            "Distribution of retrieval scores",
            f"all {len(scores)} heads, scores over {passed} passing tests; dashed: threshold",
        ),
        xaxis={"title": {"text": f"retrieval score (mean copy-paste share of {span_noun(source)})"}},
        yaxis={"title": {"text": "heads (log scale)"}, "type": "log"},
        bargap=0.05,
        height=360,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
    )
    return fig


TOP_COLUMNS = {
    "rank": "rank",
    "head": "head",
    "kv_head": "KV head",
    "retrieval_score": "retrieval score",
    "activation_frequency": "activation frequency",
    "tests_hit": "passing tests hit",
    "is_retrieval": "retrieval head",
}


def top_heads(source: Source, n: int = 20) -> pd.DataFrame:
    """The ``n`` heads with the highest retrieval score: rank, label (``L3H1``), layer, head, KV head,
    score, activation frequency, how many passing tests the head copy-pasted in, retrieval flag."""
    heads = heads_table(source)
    passed, _ = gate_counts(source)
    part = heads[heads["retrieval_score"].notna()]
    part = part.sort_values(["retrieval_score", "layer", "head"], ascending=[False, True, True]).head(n)
    out = pd.DataFrame(
        {
            "rank": np.arange(1, len(part) + 1),
            "label": [head_label(r.layer, r.head) for r in part.itertuples(index=False)],
            "layer": part["layer"].to_numpy(dtype=int),
            "head": part["head"].to_numpy(dtype=int),
            "kv_head": part["kv_head"].to_numpy(dtype=int) if "kv_head" in part else -1,
            "retrieval_score": part["retrieval_score"].to_numpy(dtype=float),
            "activation_frequency": part["activation_frequency"].to_numpy(dtype=float),
            "tests_hit": np.rint(part["activation_frequency"].to_numpy(dtype=float) * passed).astype(int),
            "is_retrieval": part["is_retrieval"].to_numpy(dtype=bool),
        }
    )
    return out


def top_heads_figure(source: Source, n: int = 20) -> go.Figure:
    """Horizontal bars of the top ``n`` heads' scores (best on top), coloured by activation frequency."""
    top = top_heads(source, n)
    passed, total = gate_counts(source)
    if top.empty:
        return figures.message_figure(
            f"no test of {total} passed the ROUGE-1 gate: no head has a score", height=360
        )
    thr = threshold(source)
    fig = go.Figure(
        go.Bar(
            x=top["retrieval_score"],
            y=top["label"],
            orientation="h",
            name="retrieval score",
            marker={
                "color": top["activation_frequency"],
                "colorscale": figures.COLORSCALE,
                "cmin": 0.0,
                "cmax": 1.0,
                "colorbar": {"title": {"text": "activation<br>frequency"}, "tickformat": ".0%"},
            },
            customdata=np.column_stack([top["activation_frequency"], top["tests_hit"], top["kv_head"]]),
            hovertemplate="%{y} (KV head %{customdata[2]})<br>retrieval score %{x:.3f}"
            "<br>activation frequency %{customdata[0]:.0%} (%{customdata[1]} of "
            f"{passed} passing tests)<extra></extra>",
        )
    )
    fig.add_vline(x=thr, line_dash="dash", line_color=THRESHOLD_COLOUR)
    fig.update_layout(
        title=figures.titled(
            f"Top {len(top)} heads by retrieval score",
            f"colour: share of the {passed} passing tests the head copy-pasted in; dashed: {thr:g}",
        ),
        xaxis={"title": {"text": "retrieval score"}, "rangemode": "tozero"},
        yaxis={"title": {"text": "head"}, "autorange": "reversed", "type": "category"},
        height=int(max(320, 110 + 22 * len(top))),
        margin={"l": 70, "r": 20, "t": 70, "b": 50},
        showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------------------- masking


def masking_curve(source: Source) -> pd.DataFrame:
    """:func:`analyses.retrieval.masking_curve` of the run's masking table (KeyError without one)."""
    if not has_masking(source):
        raise KeyError("this run ran no masking experiment (mask_fractions was empty)")
    return retrieval.masking_curve(table(source, "masking"))


def unmasked_recall(source: Source, metric: MaskMetric = "recall") -> float:
    """The reference: mean recall (or share recalled) of the masking tests without any head masked."""
    masking = table(source, "masking")
    base = masking[masking["kind"] == "none"]
    column = "rouge1_recall" if metric == "recall" else "recalled"
    return float(base[column].astype(float).mean()) if len(base) else float("nan")


def masking_figure(source: Source, metric: MaskMetric = "recall") -> go.Figure:
    """NIAH recall against K: the top-K heads vs K random heads attending uniformly during decoding.

    ``metric``: mean ROUGE-1 recall (random K: mean over seeds, whiskers ± one standard deviation over
    seeds) or the share of tests recalled above the gate. The dotted line is the unmasked recall of
    the same tests.
    """
    if metric not in MASK_METRICS:
        raise KeyError(f"unknown metric {metric!r}; choose from {', '.join(MASK_METRICS)}")
    if not has_masking(source):
        return figures.message_figure(
            "this run ran no masking experiment (mask_fractions was empty)", height=400
        )
    curve = masking_curve(source)
    masking = table(source, "masking")
    n_tests = int(masking["test"].nunique())
    n_total = len(heads_table(source))
    fig = go.Figure()
    for kind, name, colour, symbol in (
        ("top", "top-K heads masked", TOP_COLOUR, "circle"),
        ("random", "K random heads masked", RANDOM_COLOUR, "square"),
    ):
        part = curve[curve["kind"] == kind].sort_values("k")
        if part.empty:
            continue
        spread = metric == "recall" and kind == "random"
        fig.add_trace(
            go.Scatter(
                x=part["k"].to_numpy(dtype=int),
                y=part[metric].to_numpy(dtype=float),
                mode="lines+markers",
                name=name,
                line={"color": colour},
                marker={"color": colour, "symbol": symbol, "size": 9},
                error_y={"type": "data", "array": part["recall_sd"].to_numpy(dtype=float), "visible": True}
                if spread
                else None,
                customdata=np.column_stack(
                    [
                        part["fraction"].to_numpy(dtype=float),
                        part["recall"].to_numpy(dtype=float),
                        part["recall_sd"].to_numpy(dtype=float),
                        part["recalled"].to_numpy(dtype=float),
                        part["n_seeds"].to_numpy(dtype=int),
                    ]
                ),
                hovertemplate=name + ": K = %{x} (%{customdata[0]:.1%} of heads)"
                "<br>mean ROUGE-1 recall %{customdata[1]:.3f} (sd over seeds %{customdata[2]:.3f})"
                "<br>recalled %{customdata[3]:.0%} of tests; %{customdata[4]} seed(s)<extra></extra>",
            )
        )
    base = unmasked_recall(source, metric)
    if np.isfinite(base):
        fig.add_hline(
            y=base,
            line_dash="dot",
            line_color=NONE_COLOUR,
            annotation_text=f"no head masked: {base:.2f}",
            annotation_position="top left",
        )
    label = MASK_METRIC_LABELS[metric]
    fig.update_layout(
        title=figures.titled(
            f"Masking: {label} against K heads masked",
            f"{n_tests} test(s) of {n_total} heads; masked heads attend uniformly while decoding"
            + ("; whiskers: sd over random seeds" if metric == "recall" else ""),
        ),
        xaxis={"title": {"text": "K (heads masked)"}, "rangemode": "tozero"},
        yaxis={
            "title": {"text": label},
            "range": [-0.03, 1.05],
            "tickformat": ".0%" if metric == "recalled" else ".1f",
        },
        height=420,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# ---------------------------------------------------------------------------------------- recall grid


def recall_cells(source: Source) -> pd.DataFrame:
    """One row per (length, depth) asked: mean ROUGE-1 recall, tests, tests passed, mean depth reached."""
    tests = tests_table(source)
    cells = tests.groupby(["length", "depth"], as_index=False).agg(
        recall=("rouge1_recall", "mean"),
        n_tests=("test", "size"),
        n_passed=("passed", "sum"),
        depth_actual=("depth_actual", "mean"),
    )
    cells["n_passed"] = cells["n_passed"].astype(int)
    return cells.sort_values(["length", "depth"]).reset_index(drop=True)


def _depth_label(depth: float) -> str:
    return f"{float(depth):g}"


def recall_grid(source: Source, test: int | None = None) -> go.Figure:
    """Heat map of mean ROUGE-1 recall per (context length, needle depth); each cell says how many
    tests it averages and how many passed; ``test`` ringed in its cell."""
    cells = recall_cells(source)
    lengths = sorted(int(v) for v in cells["length"].unique())
    depths = sorted(float(v) for v in cells["depth"].unique())
    xs = [_depth_label(d) for d in depths]
    ys = [str(n) for n in lengths]
    z = np.full((len(lengths), len(depths)), np.nan)
    n = np.zeros_like(z)
    n_pass = np.zeros_like(z)
    actual = np.full_like(z, np.nan)
    for row in cells.itertuples(index=False):
        i, j = lengths.index(int(row.length)), depths.index(float(row.depth))
        z[i, j], n[i, j], n_pass[i, j], actual[i, j] = row.recall, row.n_tests, row.n_passed, row.depth_actual
    text = [[f"n={int(n[i, j])}" if n[i, j] else "" for j in range(len(depths))] for i in range(len(lengths))]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=xs,
            y=ys,
            zmin=0.0,
            zmax=1.0,
            colorscale="RdYlGn",
            colorbar={"title": {"text": "ROUGE-1 recall"}},
            text=text,
            texttemplate="%{z:.2f}<br>%{text}",
            customdata=np.stack([n, n_pass, actual], axis=-1),
            hovertemplate="context %{y} tokens, depth %{x} (reached %{customdata[2]:.2f})"
            "<br>mean ROUGE-1 recall %{z:.3f}"
            f"<br>%{{customdata[0]:.0f}} tests, %{{customdata[1]:.0f}} passed the gate (> {gate(source):g})"
            "<extra></extra>",
        )
    )
    if test is not None:
        row = test_row(source, test)
        fig.add_trace(
            go.Scatter(
                x=[_depth_label(float(row["depth"]))],
                y=[str(int(row["length"]))],
                mode="markers",
                name=f"test {test}",
                marker={"symbol": "square-open", "size": 34, "color": "#111111", "line": {"width": 3}},
                hovertemplate=f"test {test}: recall {float(row['rouge1_recall']):.2f}<extra></extra>",
            )
        )
    passed, total = gate_counts(source)
    fig.update_layout(
        title=figures.titled(
            "Needle recall over depth × context length",
            f"mean ROUGE-1 recall per cell, n = tests per cell; {passed} of {total} passed",
        ),
        xaxis={"title": {"text": "needle depth (0 = start of the haystack, 1 = end)"}, "type": "category"},
        yaxis={"title": {"text": "context length (tokens)"}, "type": "category"},
        height=int(max(320, 160 + 46 * len(lengths))),
        margin={"l": 70, "r": 20, "t": 70, "b": 60},
        showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------------------- one test


def test_ids(source: Source) -> list[int]:
    return [int(t) for t in tests_table(source)["test"]]


def test_row(source: Source, test: int) -> pd.Series:
    tests = tests_table(source)
    rows = tests[tests["test"] == int(test)]
    if rows.empty:
        raise KeyError(f"this run has no test {test}; it has tests {', '.join(map(str, test_ids(source)))}")
    return rows.iloc[0]


def test_label(row: Mapping[str, Any] | pd.Series) -> str:
    """``test 3: 512 tokens, depth 0.5, passphrase — passed (recall 1.00)``."""
    verdict = "passed" if bool(row["passed"]) else "failed"
    return (
        f"test {int(row['test'])}: {int(row['length'])} tokens, depth {float(row['depth']):g}, "
        f"{row['needle_kind']} — {verdict} (recall {float(row['rouge1_recall']):.2f})"
    )


def test_heads(source: Source, test: int) -> pd.DataFrame:
    """The heads that copy-pasted on ``test`` (score > 0), best first, with their overall score."""
    test_row(source, test)  # KeyError for an unknown test
    scores = table(source, "test_scores")
    part = scores[scores["test"] == int(test)]
    heads = heads_table(source)[["layer", "head", "retrieval_score", "is_retrieval"]]
    out = part.merge(heads, on=["layer", "head"], how="left")
    out = out.sort_values(["score", "layer", "head"], ascending=[False, True, True]).reset_index(drop=True)
    out.insert(0, "label", [head_label(r.layer, r.head) for r in out.itertuples(index=False)])
    return out[["label", "layer", "head", "score", "retrieval_score", "is_retrieval"]]


def test_score_matrix(source: Source, test: int) -> np.ndarray:
    """``[L, H]`` of one test's per-head score (0 where the head never copy-pasted)."""
    n_layers, n_heads = shape(source)
    z = np.zeros((n_layers, n_heads))
    part = test_heads(source, test)
    z[part["layer"].to_numpy(dtype=int), part["head"].to_numpy(dtype=int)] = part["score"].to_numpy(
        dtype=float
    )
    return z


def test_grid(source: Source, test: int) -> go.Figure:
    """Layer x head map of one test's copy-paste score (hits / |span|), the run's retrieval heads ringed."""
    row = test_row(source, test)
    n_layers, n_heads = shape(source)
    z = test_score_matrix(source, test)
    overall = score_matrix(source)
    span = int(row["span_end"]) - int(row["span_start"])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(h) for h in range(n_heads)],
            y=[str(layer) for layer in range(n_layers)],
            name=f"test {test}",
            colorscale=figures.COLORSCALE,
            zmin=0.0,
            zmax=_zmax(z),
            colorbar={"title": {"text": "test score"}},
            customdata=np.stack([np.rint(z * span), overall], axis=-1),
            hovertemplate="layer %{y}, head %{x}<br>score on this test %{z:.3f}"
            f" (%{{customdata[0]:.0f}} hits on a {span}-token span)"
            "<br>retrieval score over passing tests %{customdata[1]:.3f}<extra></extra>",
        )
    )
    marks = retrieval_heads(source)
    if marks:
        fig.add_trace(
            _rings(marks, "retrieval head", f"retrieval head of the run (score > {threshold(source):g})")
        )
    counts = (
        "did not pass the gate: its scores do not enter the head scores"
        if not bool(row["passed"])
        else "passed the gate"
    )
    return figures.head_grid_layout(
        fig,
        f"Test {test}: {int((z > 0).sum())} heads copy-pasted",
        f"{counts}; ringed: retrieval heads of the run",
        n_layers,
    )


def test_summary(source: Source, test: int) -> dict[str, Any]:
    """What one test asked and what the model answered, as plain values for display."""
    row = test_row(source, test)
    return {
        "test": int(row["test"]),
        "length": int(row["length"]),
        "n_tokens": int(row["n_tokens"]),
        "depth": float(row["depth"]),
        "depth_actual": float(row["depth_actual"]),
        "needle": int(row["needle"]),
        "needle_kind": str(row["needle_kind"]),
        "answer": str(row["answer"]),
        "reference": str(row["reference"]) if "reference" in row else str(row["answer"]),
        "generated": str(row["generated"]),
        "rouge1_recall": float(row["rouge1_recall"]),
        "passed": bool(row["passed"]),
        "span": (int(row["span_start"]), int(row["span_end"])),
        "n_steps": int(row["n_steps"]),
        "stopped_on": str(row["stopped_on"]),
        "heads_hit": int(row["heads_hit"]),
    }


def tests_rows(source: Source) -> pd.DataFrame:
    """Every test as display strings (for the report's table)."""
    tests = tests_table(source)
    return pd.DataFrame(
        {
            "test": tests["test"].astype(int).astype(str),
            "length": tests["length"].astype(int).astype(str),
            "depth": [
                f"{float(d):g} ({float(a):.2f})"
                for d, a in zip(tests["depth"], tests["depth_actual"], strict=True)
            ],
            "needle": tests["needle_kind"].astype(str),
            "answer": (tests["reference"] if "reference" in tests else tests["answer"]).astype(str),
            "generated": tests["generated"].astype(str),
            "recall": [f"{float(v):.2f}" for v in tests["rouge1_recall"]],
            "passed": ["yes" if p else "no" for p in tests["passed"]],
            "heads_hit": tests["heads_hit"].astype(int).astype(str),
        }
    )
