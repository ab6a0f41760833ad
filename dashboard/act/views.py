"""ACT views: what the ACT page, the ACT report section and the notebooks show, read from an ACT run.

An ACT run holds ``tasks`` (accuracy before and after per task, with intervals and the paired
change), ``filter`` (the head search: calibration accuracy with each head calibrated alone, per
scope), ``heads`` (in range, tasks keeping the head, hidden sinks), ``items`` (per held-out item:
predictions and margins) and ``sink_tokens`` (see docs/analyses/act.md). Every function takes a
saved :class:`~analyses.runstore.Run` or the :class:`~analyses.base.AnalysisResult` that
:func:`analyses.act.run_act` returns (so a notebook can draw a result before saving it) and returns
a figure or a small table; the page and the report only arrange them. Accuracies are fractions
(0..1); figures format them as percentages.
"""

from __future__ import annotations

import html
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.act.heldout import null_missing
from dashboard.core import common, figures

Source = common.Source
MapKind = Literal["kept", "hidden"]
MAP_KINDS: tuple[MapKind, ...] = ("kept", "hidden")
MAP_LABELS: dict[MapKind, str] = {
    "kept": "heads kept (all tasks) / calibration delta (one task)",
    "hidden": "hidden sinks per head",
}
ALL_TASKS = "__all__"
POOLED = "pooled"
FILTER_LABELS = {
    "task": "head search per task",
    "pooled": "one head search pooled over the tasks",
    "none": "no head search (every head in range calibrated)",
}
REQUIRED_TABLES = frozenset({"heads", "filter", "tasks"})

BEFORE_COLOUR = "#9fb4c7"
AFTER_COLOUR = "#31688e"
CHANCE_COLOUR = "#e4572e"
KEPT_COLOUR = "#1a9850"
DROPPED_COLOUR = "#d73027"
OUT_OF_RANGE_COLOUR = "#d9d9d9"


# ---------------------------------------------------------------------------------------- access


def table(source: Source, name: str) -> pd.DataFrame:
    """Table ``name`` of a saved run or of an unsaved result (a copy either way)."""
    return common.table(source, name, kind="ACT")


def is_act(source: Source) -> bool:
    """Whether the source has the ACT tables this module draws."""
    return common.has_tables(source, REQUIRED_TABLES)


def tasks_table(source: Source) -> pd.DataFrame:
    """The ``tasks`` table in the run's order (the order of ``config.tasks`` where it lists them)."""
    tasks = table(source, "tasks")
    order = [str(t) for t in source.config.tasks if str(t) in set(tasks["task"])]
    rest = [str(t) for t in tasks["task"] if str(t) not in order]
    return tasks.set_index("task").loc[order + rest].reset_index()


def task_names(source: Source) -> list[str]:
    return [str(t) for t in tasks_table(source)["task"]]


def scope_of(source: Source, task: str) -> str:
    """The scope (a task name, or ``"pooled"``) whose kept heads the task was evaluated with."""
    tasks = tasks_table(source).set_index("task")
    if task not in tasks.index:
        raise KeyError(f"this run has no task {task!r}; it has {', '.join(map(str, tasks.index))}")
    return str(tasks.loc[task, "scope"])


def scopes(source: Source) -> list[str]:
    """Scopes of the head search, tasks in the run's order, then ``pooled``."""
    present = set(table(source, "filter")["scope"].astype(str))
    order = [t for t in task_names(source) if t in present]
    return order + sorted(present - set(order))


def _check_task(source: Source, task: str | None) -> str | None:
    """``None`` for all tasks, else the task (raising ``KeyError`` for an unknown one)."""
    if task in (None, ALL_TASKS):
        return None
    names = task_names(source)
    if task not in names:
        raise KeyError(f"this run has no task {task!r}; it has {', '.join(names)}")
    return str(task)


def calibrated_layers(source: Source) -> tuple[int, int] | None:
    """(first, last) layer of the searched range, from ``heads.in_range`` (None: no layer)."""
    heads = table(source, "heads")
    layers = heads.loc[heads["in_range"].astype(bool), "layer"]
    if layers.empty:
        return None
    return int(layers.min()), int(layers.max())


FIRST_SINK_LABELS = {
    "share": "first sink takes back its proportional share (first_sink=share, the official code's variant)",
    "frozen": "first sink's column left as it was (first_sink=frozen)",
}


def settings_line(source: Source) -> str:
    """One line naming the run's calibration settings (plain text)."""
    cfg = source.config
    parts = [f"beta {cfg.beta}"]
    if cfg.threshold == "ratio":
        parts.append(f"sinks alpha_k > {cfg.ratio_a}/T")
    else:
        parts.append(f"sinks alpha_k > {cfg.alpha_threshold}")
    parts.append(FIRST_SINK_LABELS.get(str(cfg.first_sink), f"first sink {cfg.first_sink}"))
    parts.append(FILTER_LABELS.get(str(cfg.filter), f"head search {cfg.filter}"))
    keep = str(getattr(cfg, "keep", "not_lower"))
    parts.append(f"keep={keep}" + (f" at {cfg.significance}" if keep == "significant" else ""))
    layers = calibrated_layers(source)
    parts.append(f"layers {layers[0]}–{layers[1]} in range" if layers else "no layer in range")
    parts.append(f"{cfg.n_calibration} calibration items per task")
    parts.append(f"{cfg.n_heldout} held-out items per task")
    parts.append(f"seed {cfg.seed}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------- accuracy


def accuracy_figure(source: Source, highlight: str | None = None) -> go.Figure:
    """Held-out accuracy per task before and after calibration (bars, 95% interval error bars), the
    chance level of each task marked; ``highlight`` (a task) drawn opaque, the others faded."""
    tasks = tasks_table(source)
    chosen = _check_task(source, highlight)
    names = tasks["task"].astype(str).tolist()
    opacity = [1.0 if chosen in (None, t) else 0.35 for t in names]
    custom_cols = ["n_heldout", "n_kept", "scope"]
    fig = go.Figure()
    for when, colour, (acc, low, high) in (
        ("before", BEFORE_COLOUR, ("acc_before", "before_low", "before_high")),
        ("after", AFTER_COLOUR, ("acc_after", "after_low", "after_high")),
    ):
        values = tasks[acc].to_numpy(dtype=float)
        fig.add_trace(
            go.Bar(
                x=names,
                y=values,
                name=f"{when} calibration",
                marker={"color": colour, "opacity": opacity},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": tasks[high].to_numpy(dtype=float) - values,
                    "arrayminus": values - tasks[low].to_numpy(dtype=float),
                    "visible": True,
                    "thickness": 1.5,
                },
                customdata=np.column_stack(
                    [tasks[low], tasks[high], *(tasks[c].astype(str) for c in custom_cols)]
                ),
                hovertemplate=(
                    f"%{{x}}, {when} calibration<br>accuracy %{{y:.1%}} "
                    "[%{customdata[0]:.1%}, %{customdata[1]:.1%}] (95% interval)"
                    "<br>%{customdata[2]} held-out items; %{customdata[3]} heads kept (scope %{customdata[4]})"
                    "<extra></extra>"
                ),
            )
        )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=tasks["chance"].to_numpy(dtype=float),
            mode="markers",
            name="chance",
            marker={"symbol": "line-ew", "size": 46, "line": {"color": CHANCE_COLOUR, "width": 2.5}},
            hovertemplate="%{x}: chance %{y:.1%}<extra></extra>",
        )
    )
    fig.update_layout(
        title=figures.titled(
            "Held-out accuracy before and after calibration",
            "bars: accuracy, whiskers: 95% interval, red dash: chance",
        ),
        barmode="group",
        xaxis={"title": {"text": "task"}},
        yaxis={"title": {"text": "accuracy"}, "tickformat": ".0%", "range": [0, 1.05]},
        height=420,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def delta_figure(source: Source, highlight: str | None = None) -> go.Figure:
    """The paired change of held-out accuracy (after − before) per task with its 95% interval;
    green when the interval lies above 0, red below, grey when it holds 0."""
    tasks = tasks_table(source)
    chosen = _check_task(source, highlight)
    names = tasks["task"].astype(str).tolist()
    delta = tasks["delta"].to_numpy(dtype=float)
    low = tasks["delta_low"].to_numpy(dtype=float)
    high = tasks["delta_high"].to_numpy(dtype=float)
    colours = [
        KEPT_COLOUR if lo > 0 else (DROPPED_COLOUR if hi < 0 else "#6c757d")
        for lo, hi in zip(low, high, strict=True)
    ]
    fig = go.Figure(
        go.Scatter(
            x=delta,
            y=names,
            mode="markers",
            name="after − before",
            marker={
                "color": colours,
                "size": [14 if chosen == t else 10 for t in names],
                "opacity": [1.0 if chosen in (None, t) else 0.35 for t in names],
            },
            error_x={"type": "data", "symmetric": False, "array": high - delta, "arrayminus": delta - low},
            customdata=np.column_stack(
                [low, high, tasks["n_kept"].astype(str), tasks["n_heldout"].astype(str)]
            ),
            hovertemplate=(
                "%{y}: accuracy change %{x:+.1%}<br>95% interval [%{customdata[0]:+.1%}, "
                "%{customdata[1]:+.1%}] (paired over %{customdata[3]} held-out items)"
                "<br>%{customdata[2]} heads calibrated<extra></extra>"
            ),
        )
    )
    fig.add_vline(x=0.0, line_dash="dot", line_color="#5b6475")
    fig.update_layout(
        title=figures.titled(
            "Change of held-out accuracy (after − before)", "paired over the same items, 95% interval"
        ),
        xaxis={
            "title": {"text": "accuracy change (percentage points)"},
            "tickformat": "+.0%",
            "zeroline": False,
        },
        yaxis={"title": {"text": "task"}, "autorange": "reversed", "type": "category"},
        height=int(max(280, 150 + 40 * len(names))),
        margin={"l": 110, "r": 20, "t": 70, "b": 50},
        showlegend=False,
    )
    return fig


# ---------------------------------------------------------------------------------------- heads


def searched(source: Source, scope: str) -> bool:
    """Whether the run searched heads for ``scope`` (not so with ``filter="none"``)."""
    rows = table(source, "filter")
    return bool((rows["scope"].astype(str) == scope).any())


def scope_filter(source: Source, scope: str) -> pd.DataFrame:
    """The head-search rows of one scope (a task, or ``"pooled"``)."""
    rows = table(source, "filter")
    part = rows[rows["scope"].astype(str) == scope]
    if part.empty:
        have = ", ".join(scopes(source)) or "none (this run calibrated every head in range without a search)"
        raise KeyError(f"this run searched no heads for scope {scope!r}; searched scopes: {have}")
    return part.reset_index(drop=True)


def _in_range_heads(source: Source) -> list[tuple[int, int]]:
    heads = table(source, "heads")
    part = heads[heads["in_range"].astype(bool)]
    return sorted((int(r.layer), int(r.head)) for r in part.itertuples(index=False))


def kept_heads(source: Source, task: str | None = None) -> list[tuple[int, int]]:
    """(layer, head) kept for ``task`` (its scope's search), or kept by at least one task."""
    chosen = _check_task(source, task)
    if chosen is None:
        heads = table(source, "heads")
        part = heads[heads["n_tasks_kept"] > 0]
    elif not searched(source, scope_of(source, chosen)):
        return _in_range_heads(source)  # no search: every head in range was calibrated
    else:
        part = scope_filter(source, scope_of(source, chosen))
        part = part[part["kept"].astype(bool)]
    return sorted((int(r.layer), int(r.head)) for r in part.itertuples(index=False))


def _grid(heads: pd.DataFrame, values: pd.Series) -> np.ndarray:
    """``[L, H]`` of ``values`` (aligned with ``heads``), NaN where a head has no value."""
    n_layers = int(heads["layer"].max()) + 1
    n_heads = int(heads["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    z[heads["layer"].to_numpy(dtype=int), heads["head"].to_numpy(dtype=int)] = values.to_numpy(dtype=float)
    return z


def head_grid(source: Source, task: str | None = None, kind: MapKind = "kept") -> go.Figure:
    """Layer x head map (layer 0 at the top).

    * ``kind="kept"``, all tasks: how many tasks kept each head;
    * ``kind="kept"``, one task: each head's calibration delta in that task's head search
      (accuracy change on the calibration split when that head alone is calibrated), the kept
      heads marked with a ring;
    * ``kind="hidden"``: the hidden sinks detected on each head (task independent).

    Layers outside the searched range are grey (``kept``); trace 0 is always the value map, so
    :func:`dashboard.core.figures.mark_head` can outline a head on it.
    """
    if kind not in MAP_KINDS:
        raise KeyError(f"unknown map {kind!r}; choose from {', '.join(MAP_KINDS)}")
    heads = table(source, "heads").sort_values(["layer", "head"]).reset_index(drop=True)
    chosen = _check_task(source, task)
    in_range = heads["in_range"].astype(bool).to_numpy()
    n_layers = int(heads["layer"].max()) + 1
    n_heads = int(heads["head"].max()) + 1
    xs = [str(h) for h in range(n_heads)]
    ys = [str(layer) for layer in range(n_layers)]
    first = _grid(heads, heads["first_sink_pos"].astype(float))
    subtitle = ""
    marks: list[tuple[int, int]] = []
    trace: dict[str, Any]
    if kind == "hidden":
        z = _grid(heads, heads["hidden_sinks"].astype(float))
        title = "Hidden sinks per head (mean per calibration input)"
        subtitle = "sinks after the first one (alpha_k above the threshold), before calibration"
        trace = {
            "colorscale": "Viridis",
            "zmin": 0.0,
            "colorbar": {"title": {"text": "hidden sinks / input"}},
            "customdata": first,
            "hovertemplate": "layer %{y}, head %{x}<br>%{z:.2f} hidden sinks per input"
            "<br>first sink mostly at position %{customdata:.0f} (-1: none)<extra></extra>",
        }
    elif chosen is None or not searched(source, scope_of(source, chosen)):
        n_tasks = len(task_names(source))
        z = _grid(heads, heads["n_tasks_kept"].astype(float).where(in_range))
        title = f"Heads kept for calibration, by how many of the {n_tasks} tasks"
        subtitle = "grey: layers outside the calibrated range"
        if chosen is not None:
            marks = _in_range_heads(source)
            title = f"{chosen}: no head search, all {len(marks)} heads in range calibrated (ringed)"
        delta = _grid(heads, heads["mean_delta"].astype(float))
        trace = {
            "colorscale": "Viridis",
            "zmin": 0.0,
            "zmax": float(max(n_tasks, 1)),
            "colorbar": {"title": {"text": "tasks keeping it"}, "dtick": 1},
            "customdata": np.stack([delta, first], axis=-1),
            "hovertemplate": "layer %{y}, head %{x}<br>kept by %{z:.0f} task(s)"
            "<br>mean calibration delta %{customdata[0]:+.1%}"
            "<br>first sink mostly at position %{customdata[1]:.0f} (-1: none)<extra></extra>",
        }
    else:
        scope = scope_of(source, chosen)
        part = scope_filter(source, scope)
        z = np.full((n_layers, n_heads), np.nan)
        base = np.full((n_layers, n_heads), np.nan)
        calibrated = np.full((n_layers, n_heads), np.nan)
        li, hi = part["layer"].to_numpy(dtype=int), part["head"].to_numpy(dtype=int)
        z[li, hi] = part["delta"].to_numpy(dtype=float)
        base[li, hi] = part["acc_base"].to_numpy(dtype=float)
        calibrated[li, hi] = part["acc_calibrated"].to_numpy(dtype=float)
        marks = [(int(r.layer), int(r.head)) for r in part[part["kept"].astype(bool)].itertuples(index=False)]
        where = "pooled calibration split of all tasks" if scope == POOLED else f"{scope} calibration split"
        title = f"{chosen}: calibration delta per head ({len(marks)} kept, ringed)"
        subtitle = f"accuracy change on the {where} when the head alone is calibrated; grey: not searched"
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0
        bound = bound if bound > 0 else 0.01
        trace = {
            "colorscale": "RdBu",
            "zmid": 0.0,
            "zmin": -bound,
            "zmax": bound,
            "colorbar": {"title": {"text": "delta"}, "tickformat": "+.0%"},
            "customdata": np.stack([base, calibrated], axis=-1),
            "hovertemplate": "layer %{y}, head %{x}<br>calibration delta %{z:+.1%}"
            "<br>accuracy %{customdata[0]:.1%} → %{customdata[1]:.1%}<extra></extra>",
        }
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=ys, name="heads", **trace))
    if kind == "kept":
        grey = np.where(np.isnan(z), 1.0, np.nan)
        fig.add_trace(
            go.Heatmap(
                z=grey,
                x=xs,
                y=ys,
                name="not searched",
                colorscale=[[0.0, OUT_OF_RANGE_COLOUR], [1.0, OUT_OF_RANGE_COLOUR]],
                showscale=False,
                hovertemplate="layer %{y}, head %{x}<br>not searched (outside the calibrated layers)"
                "<extra></extra>",
            )
        )
    if marks:
        fig.add_trace(figures.head_rings(marks, "kept", "kept", color="#111111"))
    return figures.head_grid_layout(fig, title, subtitle, n_layers)


def search_figure(source: Source, task: str | None = None) -> go.Figure:
    """The head search: calibration delta of every searched head.

    One task: its scope's heads sorted by delta (bars; green kept, red dropped). All tasks: one
    box with every head as a point per scope.
    """
    chosen = _check_task(source, task)
    if not scopes(source) or (chosen is not None and not searched(source, scope_of(source, chosen))):
        return figures.message_figure(
            "no head search in this run (filter=none): every head in range was calibrated", height=400
        )
    if chosen is not None:
        scope = scope_of(source, chosen)
        part = scope_filter(source, scope).sort_values("delta", ascending=False).reset_index(drop=True)
        part["rank"] = np.arange(len(part))
        fig = go.Figure()
        for kept, name, colour in ((True, "kept", KEPT_COLOUR), (False, "dropped", DROPPED_COLOUR)):
            rows = part[part["kept"].astype(bool) == kept]
            fig.add_trace(
                go.Bar(
                    x=rows["rank"],
                    y=rows["delta"].to_numpy(dtype=float),
                    name=f"{name} ({len(rows)})",
                    marker_color=colour,
                    customdata=np.column_stack(
                        [
                            [f"L{int(r.layer)}H{int(r.head)}" for r in rows.itertuples(index=False)],
                            rows["acc_base"].to_numpy(dtype=float),
                            rows["acc_calibrated"].to_numpy(dtype=float),
                        ]
                    ),
                    hovertemplate="%{customdata[0]} (" + name + ")<br>calibration delta %{y:+.1%}"
                    "<br>accuracy %{customdata[1]:.1%} → %{customdata[2]:.1%}<extra></extra>",
                )
            )
        fig.add_hline(y=0.0, line_dash="dot", line_color="#5b6475")
        where = "pooled (all tasks)" if scope == POOLED else scope
        fig.update_layout(
            title=figures.titled(
                f"Head search for {chosen}: {len(part)} heads, one at a time",
                f"calibration split of {where}; sorted by delta",
            ),
            xaxis={"title": {"text": "heads, ranked by calibration delta"}},
            yaxis={"title": {"text": "calibration delta (accuracy change)"}, "tickformat": "+.0%"},
            bargap=0.05,
            barmode="overlay",
        )
    else:
        fig = go.Figure()
        names = scopes(source)
        jitter = np.random.default_rng(0)
        points: dict[bool, list[pd.DataFrame]] = {True: [], False: []}
        for i, scope in enumerate(names):
            part = scope_filter(source, scope)
            fig.add_trace(
                go.Box(
                    x=np.full(len(part), i),
                    y=part["delta"].to_numpy(dtype=float),
                    name=scope,
                    boxpoints=False,
                    line={"color": "#5b6475"},
                    fillcolor="rgba(0,0,0,0)",
                    hoverinfo="y",
                    showlegend=False,
                )
            )
            part = part.assign(x=i + jitter.uniform(-0.3, 0.3, len(part)))
            for kept in (True, False):
                points[kept].append(part[part["kept"].astype(bool) == kept])
        for kept, name, colour in ((True, "kept", KEPT_COLOUR), (False, "dropped", DROPPED_COLOUR)):
            rows = pd.concat(points[kept]) if points[kept] else pd.DataFrame(columns=["x", "delta"])
            fig.add_trace(
                go.Scatter(
                    x=rows["x"].to_numpy(dtype=float),
                    y=rows["delta"].to_numpy(dtype=float),
                    mode="markers",
                    name=f"{name} ({len(rows)})",
                    marker={"color": colour, "size": 6, "opacity": 0.8},
                    customdata=np.column_stack(
                        [
                            [str(r.scope) for r in rows.itertuples(index=False)],
                            [f"L{int(r.layer)}H{int(r.head)}" for r in rows.itertuples(index=False)],
                        ]
                    )
                    if len(rows)
                    else None,
                    hovertemplate="%{customdata[1]} (" + name + ", search %{customdata[0]})"
                    "<br>calibration delta %{y:+.1%}<extra></extra>",
                )
            )
        fig.add_hline(y=0.0, line_dash="dot", line_color="#5b6475")
        fig.update_layout(
            title=figures.titled(
                "Head search: calibration delta of every searched head",
                "one box per search scope; points: heads (green kept, red dropped)",
            ),
            xaxis={
                "title": {"text": "search scope"},
                "tickvals": list(range(len(names))),
                "ticktext": ["pooled (all tasks)" if s == POOLED else s for s in names],
                "range": [-0.6, len(names) - 0.4],
            },
            yaxis={"title": {"text": "calibration delta (accuracy change)"}, "tickformat": "+.0%"},
            boxmode="overlay",
        )
    fig.update_layout(
        height=400, margin={"l": 70, "r": 20, "t": 70, "b": 50}, legend={"orientation": "h", "y": -0.2}
    )
    return fig


# ---------------------------------------------------------------------------------------- items


OUTCOMES = {
    "fixed": ("wrong → right", KEPT_COLOUR),
    "broken": ("right → wrong", DROPPED_COLOUR),
    "right": ("right both times", AFTER_COLOUR),
    "wrong": ("wrong both times", "#adb5bd"),
}


def items_table(source: Source, task: str | None = None) -> pd.DataFrame:
    """Held-out items (of ``task``, or all) with an ``outcome``: fixed, broken, right, wrong."""
    if "items" not in source.table_names:
        raise KeyError("this run kept no per-item table")
    chosen = _check_task(source, task)
    rows = table(source, "items")
    if chosen is not None:
        rows = rows[rows["task"].astype(str) == chosen]
    before = rows["correct_before"].astype(bool)
    after = rows["correct_after"].astype(bool)
    rows = rows.assign(
        outcome=np.select(
            [~before & after, before & ~after, before & after], ["fixed", "broken", "right"], "wrong"
        )
    )
    return rows.reset_index(drop=True)


def margin_figure(source: Source, task: str | None = None) -> go.Figure:
    """Per held-out item, the label's margin (its log-probability minus the best other choice's)
    before against after calibration; points above the diagonal gained."""
    rows = items_table(source, task)
    fig = go.Figure()
    for outcome, (label, colour) in OUTCOMES.items():
        part = rows[rows["outcome"] == outcome]
        fig.add_trace(
            go.Scatter(
                x=part["margin_before"].to_numpy(dtype=float),
                y=part["margin_after"].to_numpy(dtype=float),
                mode="markers",
                name=f"{label} ({len(part)})",
                marker={"color": colour, "size": 7, "opacity": 0.8},
                customdata=np.column_stack([part["task"].astype(str), part["item"].astype(str)]),
                hovertemplate="%{customdata[0]} item %{customdata[1]}<br>margin before %{x:.2f}, after %{y:.2f}"
                f"<br>{label}<extra></extra>",
            )
        )
    values = np.concatenate(
        [rows["margin_before"].to_numpy(dtype=float), rows["margin_after"].to_numpy(dtype=float)]
    )
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line={"dash": "dot", "color": "#5b6475"})
    fig.add_hline(y=0.0, line_width=1, line_color="#c0c4cc")
    fig.add_vline(x=0.0, line_width=1, line_color="#c0c4cc")
    chosen = _check_task(source, task)
    fig.update_layout(
        title=figures.titled(
            f"Held-out items{'' if chosen is None else ' of ' + html.escape(chosen)}: margin before vs after",
            "margin = log p(label) − best other choice (> 0: right); dotted: unchanged",
        ),
        xaxis={"title": {"text": "margin before calibration"}},
        yaxis={"title": {"text": "margin after calibration"}},
        height=420,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# ---------------------------------------------------------------------------------------- sink tokens


def top_sink_tokens(source: Source, k: int = 20) -> pd.DataFrame:
    """The ``k`` tokens most often found as hidden sinks (then by the share of heads they sink on)."""
    if "sink_tokens" not in source.table_names:
        return pd.DataFrame(columns=["token", "count", "share_of_heads"])
    rows = table(source, "sink_tokens")
    ordered = rows.sort_values(["count", "share_of_heads"], ascending=[False, False])
    return ordered.head(k).reset_index(drop=True)


def sink_tokens_figure(source: Source, k: int = 20) -> go.Figure:
    """Horizontal bars: how often each token was a hidden sink on the calibration inputs (the ``k``
    most frequent), coloured by the mean share of the in-range heads it was a sink for."""
    rows = top_sink_tokens(source, k)
    if rows.empty:
        return figures.message_figure("no hidden sink tokens were found in this run", height=300)
    labels = [figures.token_label(str(t)) for t in rows["token"]]
    # Two tokens may print alike (byte pieces): keep every bar by numbering repeated labels.
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    share = rows["share_of_heads"].to_numpy(dtype=float)
    fig = go.Figure(
        go.Bar(
            x=rows["count"].to_numpy(dtype=np.int64),
            y=unique,
            orientation="h",
            marker={
                "color": share,
                "colorscale": "Viridis",
                "cmin": 0.0,
                "colorbar": {"title": {"text": "share of heads"}, "tickformat": ".0%"},
            },
            customdata=share,
            hovertemplate="token %{y}<br>a hidden sink %{x} times"
            "<br>for %{customdata:.1%} of the heads in range on average<extra></extra>",
        )
    )
    fig.update_layout(
        title=figures.titled(
            "Tokens found as hidden sinks",
            "sinks after the first one, on the calibration inputs (uncalibrated)",
        ),
        xaxis={"title": {"text": "times found as a hidden sink (token occurrences)"}},
        yaxis={"title": {"text": "token"}, "autorange": "reversed", "type": "category"},
        height=int(max(300, 120 + 22 * len(rows))),
        margin={"l": 140, "r": 20, "t": 70, "b": 50},
    )
    return fig


# ---------------------------------------------------------------------------------------- tables


TASK_COLUMNS = {
    "task": "task",
    "kind": "kind",
    "scope": "head search",
    "n_kept": "heads kept",
    "n_calibration": "calibration items",
    "n_heldout": "held-out items",
    "chance": "chance",
    "before": "accuracy before [95%]",
    "after": "accuracy after [95%]",
    "delta": "change [95%]",
    "validated": "kept heads on held-out items vs null",
}

KEEP_LABELS = {
    "not_lower": "a head is kept when calibrating it alone does not lower calibration accuracy (keep=not_lower, "
    "the paper's rule)",
    "raise": "a head is kept when calibrating it alone raises calibration accuracy (keep=raise)",
    "significant": "a head is kept when calibrating it alone raises the label's margin on the calibration items "
    "significantly (one-sided t-test, Benjamini-Hochberg over the heads; keep=significant)",
}


def validation_table(source: Source) -> pd.DataFrame | None:
    """The run's ``validation`` table (None for a run made before ACT validated its kept heads)."""
    return table(source, "validation") if "validation" in source.table_names else None


def validation_verdicts(source: Source) -> dict[str, str]:
    """Per head search, a short verdict on its kept set's held-out margin effect against the null."""
    checks = validation_table(source)
    if checks is None:
        return {}
    out = {}
    for row in checks[checks["measure"] == "margin"].itertuples(index=False):
        if int(row.n_null) == 0:
            out[str(row.head_search)] = "no null (too few heads outside the set)"
        else:
            verdict = "validated" if bool(row.validated) else "not validated"
            out[str(row.head_search)] = f"{verdict}: percentile {row.percentile:.0f}, p {row.p_value:.2g}"
    return out


def validation_note(source: Source) -> str:
    """What the validation of this run tested, in plain text: the keep rule, the measures, and why a
    head search has no null."""
    cfg = source.config
    keep = str(getattr(cfg, "keep", "not_lower"))
    parts = [
        KEEP_LABELS.get(keep, f"keep={keep}").capitalize() + ".",
        "Each head search's kept set is calibrated together on the held-out items of its tasks and "
        "compared with random sets of as many heads drawn from the in-range heads outside it. Two "
        "effects per item: the change in the label's log-probability margin (the heads table carries "
        "this one) and the change in correctness.",
    ]
    checks = validation_table(source)
    if checks is not None and len(checks):
        n_in_range = int(table(source, "heads")["in_range"].astype(bool).sum())
        parts += [f"No null for {why}." for why in null_missing(checks, n_in_range)]
    return " ".join(parts)


def _pct(value: float, low: float, high: float, *, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value * 100:{sign}.1f}% [{low * 100:{sign}.1f}, {high * 100:{sign}.1f}]"


def task_rows(source: Source) -> pd.DataFrame:
    """The tasks table as display strings, with the columns of :data:`TASK_COLUMNS`."""
    tasks = tasks_table(source)
    searched_scopes = set(scopes(source)) if "filter" in source.table_names else None
    verdicts = validation_verdicts(source)
    missing = "not tested (an older run)" if validation_table(source) is None else "no head kept"
    out = pd.DataFrame(
        {
            "task": tasks["task"].astype(str),
            "kind": tasks["kind"].astype(str).str.replace("_", " "),
            "scope": [
                str(scope)
                if searched_scopes is None or str(scope) in searched_scopes
                else "none: all in range"
                for scope in tasks["scope"]
            ],
            "n_kept": tasks["n_kept"].astype(int).astype(str),
            "n_calibration": tasks["n_calibration"].astype(int).astype(str),
            "n_heldout": tasks["n_heldout"].astype(int).astype(str),
            "chance": [f"{c * 100:.1f}%" for c in tasks["chance"]],
            "before": [
                _pct(r.acc_before, r.before_low, r.before_high) for r in tasks.itertuples(index=False)
            ],
            "after": [_pct(r.acc_after, r.after_low, r.after_high) for r in tasks.itertuples(index=False)],
            "delta": [
                _pct(r.delta, r.delta_low, r.delta_high, signed=True) for r in tasks.itertuples(index=False)
            ],
            "validated": [verdicts.get(str(scope), missing) for scope in tasks["scope"]],
        }
    )
    return out[list(TASK_COLUMNS)]
