"""Head-atlas views: what the atlas page, its report section and a notebook show, read from an atlas.

Every function takes a saved atlas :class:`~analyses.runstore.Run` or the
:class:`~analyses.base.AnalysisResult` that :func:`analyses.atlas.build_atlas` returns, and returns a
figure, a small table or sentences; the page and the report only arrange them. An atlas's ``heads``
table has one row per head: ``layer``, ``head``, ``kv_head``, ``depth`` (layer / layers),
``n_roles``, ``roles`` (role names joined by ``+``), every joined run's columns as
``<analysis>.<column>``, a ``role.<name>`` flag per role and, where the analysis tests its roles on
held-out inputs, ``validated.<name>``. The ``columns`` table says which run each column came from;
``roles`` each role's rule, threshold and paper. Comparing models: :mod:`dashboard.atlas.comparison`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.atlas import findings
from analyses.atlas.run import TABLES
from analyses.base import AnalysisResult
from dashboard.census import views as census_views
from dashboard.core import common, figures

Source = common.Source
ANALYSIS = "atlas"
REQUIRED_TABLES = frozenset(TABLES)
NO_ROLE_COLOUR = "#eceef2"
ROLE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#393b79",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#637939",
    "#dbdb8d",
    "#9edae5",
)
SELECTED_COLOUR = "#1d2330"
# Each head's cell of the role grid is split into this many stripes, shared out among its roles
# (divisible by 1, 2, 3, 4 and 6: up to four roles get equal stripes).
STRIPES = 12
NO_ROLE = "(none)"  # the role filter's entry for heads without a role
KEYS = ("layer", "head", "kv_head", "depth", "n_roles", "roles")
Match = Literal["any", "all"]


class PickedHead(NamedTuple):
    """A head of the atlas, printed (and passed in URLs) as ``L{layer}H{head}``."""

    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


_HEAD = re.compile(r"^\s*L(\d{1,4})H(\d{1,4})\s*$", re.IGNORECASE)


def parse_head(text: object) -> PickedHead | None:
    """``"L3H7"`` -> ``PickedHead(3, 7)``; None for anything else."""
    match = _HEAD.match(text) if isinstance(text, str) else None
    return PickedHead(int(match[1]), int(match[2])) if match else None


# ---------------------------------------------------------------------------------------- access


def table(source: Source, name: str) -> pd.DataFrame:
    """Table ``name`` of a saved atlas or of an unsaved one (a copy either way)."""
    return common.table(source, name, kind="atlas")


def is_atlas(source: Source) -> bool:
    """Whether the source has every atlas table."""
    return common.has_tables(source, REQUIRED_TABLES)


def model_info(source: Source) -> dict[str, Any]:
    if isinstance(source, AnalysisResult):
        return dict(source.model_info)
    return dict(source.manifest.model)


def run_id(source: Source) -> str:
    """The atlas's run id ("" for an unsaved result)."""
    return "" if isinstance(source, AnalysisResult) else source.run_id


def role_names(heads: pd.DataFrame) -> list[str]:
    """The roles the atlas flags, in its column order (the analyses' registration order)."""
    return findings.role_names(heads)


def role_labels(source: Source) -> dict[str, str]:
    """Role name -> the words a person reads (``induction`` -> ``induction head``)."""
    roles = table(source, "roles")
    return {str(r.role): str(r.label) for r in roles.itertuples(index=False)}


def role_colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per role, in order (the palette repeats after 20 roles)."""
    return {name: ROLE_COLOURS[i % len(ROLE_COLOURS)] for i, name in enumerate(names)}


def grid_shape(heads: pd.DataFrame) -> tuple[int, int]:
    """``(layers, heads per layer)``."""
    return int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1


def source_columns(heads: pd.DataFrame) -> list[str]:
    """Every column a joined run gave (``<analysis>.<column>``), in the atlas's order."""
    return [str(c) for c in heads.columns if "." in str(c) and not str(c).startswith(("role.", "validated."))]


def is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def metric_columns(heads: pd.DataFrame) -> list[str]:
    """The numeric source columns other than standard errors: what filters, sorts and percentiles use."""
    return [c for c in source_columns(heads) if is_number(heads[c]) and not c.endswith("_sem")]


def has_head(heads: pd.DataFrame, head: PickedHead) -> bool:
    return bool(((heads["layer"] == head.layer) & (heads["head"] == head.head)).any())


def head_row(heads: pd.DataFrame, head: PickedHead) -> pd.Series:
    rows = heads[(heads["layer"] == head.layer) & (heads["head"] == head.head)]
    if rows.empty:
        raise KeyError(f"the atlas has no head {head}")
    return rows.iloc[0]


def head_roles(row: pd.Series, names: Iterable[str]) -> list[str]:
    """The roles a heads-table row has, in the atlas's order."""
    return [n for n in names if bool(row.get(f"role.{n}", False))]


def default_head(heads: pd.DataFrame) -> PickedHead:
    """The head the page opens on: the one with the most roles (the earliest of those)."""
    top = heads.sort_values(["n_roles", "layer", "head"], ascending=[False, True, True], kind="stable")
    row = top.iloc[0]
    return PickedHead(int(row["layer"]), int(row["head"]))


def role_text(roles: str, labels: dict[str, str] | None = None) -> str:
    """A ``roles`` cell (``induction+sink``) as words: ``induction, sink`` (labels when given)."""
    names = [r for r in str(roles or "").split("+") if r]
    if not names:
        return "no role"
    return ", ".join((labels or {}).get(n, n) for n in names)


# ------------------------------------------------------------------------------------ role grid


def _stripes(roles_of_head: Sequence[int]) -> list[int]:
    """The role index (1-based, 0: none) of each of the :data:`STRIPES` stripes of a head's cell."""
    k = len(roles_of_head)
    return [roles_of_head[j * k // STRIPES] + 1 if k else 0 for j in range(STRIPES)]


def _stepped_scale(colours: Sequence[str]) -> list[list[Any]]:
    """A colour scale giving integer ``i`` of ``0..len(colours) - 1`` the colour ``colours[i]``."""
    n = len(colours)
    scale: list[list[Any]] = []
    for i, colour in enumerate(colours):
        scale += [[i / n, colour], [(i + 1) / n, colour]]
    return scale


def role_grid(source: Source, selected: PickedHead | None = None) -> go.Figure:
    """Layer x head map of every head's roles: a head's cell is split into one stripe per role it
    has (coloured by role; light grey: none), a number on the cell of a head with several roles says
    how many, hovering lists them; the selected head is outlined."""
    heads = table(source, "heads").sort_values(["layer", "head"]).reset_index(drop=True)
    names = role_names(heads)
    labels = role_labels(source)
    colours = role_colours(names)
    n_layers, n_heads = grid_shape(heads)
    flags = heads[[f"role.{n}" for n in names]].to_numpy(bool) if names else np.zeros((len(heads), 0), bool)
    z = np.zeros((n_layers, n_heads * STRIPES))
    hover = np.full((n_layers, n_heads * STRIPES), "", dtype=object)
    for i, (layer, head) in enumerate(zip(heads["layer"], heads["head"], strict=True)):
        own = [int(j) for j in np.flatnonzero(flags[i])]
        cols = slice(int(head) * STRIPES, (int(head) + 1) * STRIPES)
        z[int(layer), cols] = _stripes(own)
        words = "<br>".join(labels.get(names[j], names[j]) for j in own) or "no role"
        count = f"{len(own)} role{'s' if len(own) != 1 else ''}"
        hover[int(layer), cols] = f"L{layer}H{head} ({count})<br>{words}"
    x = [h - 0.5 + (j + 0.5) / STRIPES for h in range(n_heads) for j in range(STRIPES)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=list(range(n_layers)),
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            colorscale=_stepped_scale([NO_ROLE_COLOUR, *colours.values()]),
            zmin=-0.5,
            zmax=len(names) + 0.5,
            showscale=False,
            name="roles",
        )
    )
    _cell_borders(fig, n_layers, n_heads)
    many = heads[heads["n_roles"] >= 2]
    fig.add_trace(
        go.Scatter(
            x=many["head"].tolist(),
            y=many["layer"].tolist(),
            mode="text",
            text=[str(int(n)) for n in many["n_roles"]],
            textfont={"size": 12, "color": "#ffffff", "weight": "bold", "shadow": "0px 0px 3px #000000"},
            hovertext=[hover[int(r.layer), int(r.head) * STRIPES] for r in many.itertuples(index=False)],
            hovertemplate="%{hovertext}<extra></extra>",
            name="number of roles",
            showlegend=False,
        )
    )
    counts = heads[[f"role.{n}" for n in names]].sum() if names else pd.Series(dtype=int)
    for name in names:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"symbol": "square", "size": 12, "color": colours[name]},
                name=f"{labels.get(name, name)} ({int(counts[f'role.{name}'])})",
                showlegend=True,
                hoverinfo="skip",
            )
        )
    if selected is not None and has_head(heads, selected):
        fig.add_shape(
            type="rect",
            x0=selected.head - 0.5,
            x1=selected.head + 0.5,
            y0=selected.layer - 0.5,
            y1=selected.layer + 0.5,
            line={"color": SELECTED_COLOUR, "width": 3},
            fillcolor="rgba(0,0,0,0)",
        )
    n_many = int((heads["n_roles"] >= 2).sum())
    subtitle = (
        f"{model_info(source).get('name', '?')}: {len(heads)} heads, {int((heads['n_roles'] >= 1).sum())} "
        f"with a role, {n_many} with several (the number: how many). One stripe per role; light grey: "
        "no role."
    )
    legend_rows = max(1, math.ceil(len(names) / 3))
    fig.update_layout(
        title=figures.titled("Roles of every head", subtitle),
        xaxis={
            "title": {"text": "head"},
            "tickvals": list(range(n_heads)),
            "range": [-0.5, n_heads - 0.5],
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={
            "title": {"text": "layer"},
            "tickvals": list(range(n_layers)),
            "range": [n_layers - 0.5, -0.5],
            "showgrid": False,
            "zeroline": False,
        },
        height=figures.heatmap_height(n_layers) + 24 * legend_rows,
        margin={"l": 60, "r": 20, "t": 70, "b": 60 + 24 * legend_rows},
        legend={"orientation": "h", "yanchor": "top", "y": -0.08, "x": 0, "font": {"size": 11}},
        plot_bgcolor="#ffffff",
    )
    return fig


def _cell_borders(fig: go.Figure, n_layers: int, n_heads: int) -> None:
    """White lines between heads and between layers, so that a cell's stripes read as one head."""
    line = {"color": "#ffffff", "width": 2}
    for h in range(1, n_heads):
        fig.add_shape(type="line", x0=h - 0.5, x1=h - 0.5, y0=-0.5, y1=n_layers - 0.5, line=line)
    for layer in range(1, n_layers):
        fig.add_shape(type="line", x0=-0.5, x1=n_heads - 0.5, y0=layer - 0.5, y1=layer - 0.5, line=line)


def clicked_head(click_data: object) -> PickedHead | None:
    """The head under a click on :func:`role_grid` (x: head, y: layer, numeric axes)."""
    if not isinstance(click_data, dict):
        return None
    points = click_data.get("points")
    if not isinstance(points, list) or not points or not isinstance(points[0], dict):
        return None
    try:
        x, y = float(points[0]["x"]), float(points[0]["y"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return PickedHead(round(y), round(x))


# --------------------------------------------------------------------------------- heads table


def filter_heads(
    source: Source,
    *,
    roles: Sequence[str] = (),
    match: Match = "any",
    metric: str | None = None,
    low: float | None = None,
    high: float | None = None,
    layers: Sequence[int] | None = None,
    sort: str | None = None,
    descending: bool = True,
) -> pd.DataFrame:
    """The heads table narrowed and sorted as the page's table shows it.

    ``roles``: heads with ``any`` (or ``all``) of these roles (:data:`NO_ROLE`: heads with none);
    ``metric`` with ``low`` / ``high``: heads whose value lies in [low, high] (either bound may be
    None; NaN never qualifies); ``layers``: ``(first, last)``, both included; ``sort``: a column
    (None: the number of roles), ties and NaN ordered by layer and head, NaN last."""
    heads = table(source, "heads")
    keep = pd.Series(True, index=heads.index)
    wanted = [r for r in roles if r == NO_ROLE or f"role.{r}" in heads.columns]
    if wanted:
        hits = [heads["n_roles"] == 0 if r == NO_ROLE else heads[f"role.{r}"].astype(bool) for r in wanted]
        stacked = pd.concat(hits, axis=1)
        keep &= stacked.all(axis=1) if match == "all" else stacked.any(axis=1)
    if metric and metric in heads.columns and (low is not None or high is not None):
        x = pd.to_numeric(heads[metric], errors="coerce")
        inside = x.notna()
        if low is not None:
            inside &= x >= float(low)
        if high is not None:
            inside &= x <= float(high)
        keep &= inside
    if layers is not None and len(layers) == 2:
        first, last = sorted(int(v) for v in layers)
        keep &= heads["layer"].between(first, last)
    shown = heads[keep]
    column = sort if sort in heads.columns else "n_roles"
    ordered = shown.sort_values(["layer", "head"], kind="stable")
    ordered = ordered.sort_values(column, ascending=not descending, na_position="last", kind="stable")
    return ordered.reset_index(drop=True)


def sort_options(heads: pd.DataFrame) -> list[dict[str, str]]:
    """What the table can be sorted by: roles, position, then every metric."""
    fixed = [
        {"label": "number of roles", "value": "n_roles"},
        {"label": "layer", "value": "layer"},
        {"label": "relative depth", "value": "depth"},
    ]
    return fixed + [{"label": c, "value": c} for c in metric_columns(heads)]


def role_options(source: Source) -> list[dict[str, str]]:
    """The role filter's entries: each role with its label and number of heads, then no role."""
    heads = table(source, "heads")
    labels = role_labels(source)
    options = [
        {"label": f"{labels.get(n, n)} ({int(heads[f'role.{n}'].sum())})", "value": n}
        for n in role_names(heads)
    ]
    return [*options, {"label": f"no role ({int((heads['n_roles'] == 0).sum())})", "value": NO_ROLE}]


# -------------------------------------------------------------------------------------- head card


def percentile(values: Sequence[float] | np.ndarray | pd.Series, value: float) -> float:
    """The share (in %) of the finite ``values`` at or below ``value``; NaN when ``value`` is not
    finite or no value is."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    x = x[np.isfinite(x)]
    if not x.size or value is None or not math.isfinite(float(value)):
        return math.nan
    return float(100.0 * np.mean(x <= float(value)))


@dataclass(frozen=True)
class HeadCard:
    """Everything the atlas knows of one head.

    ``roles``: one row per role it has (role, label, analysis, threshold, paper, validated: "yes",
    "no" or "not tested", run_id); ``metrics``: one row per source column but standard errors
    (column, analysis, source_column, value, sem (NaN: none), percentile (NaN: not a number),
    numeric, run_id)."""

    head: PickedHead
    kv_head: int
    depth: float
    roles: pd.DataFrame
    metrics: pd.DataFrame


def head_card(source: Source, head: PickedHead) -> HeadCard:
    heads = table(source, "heads")
    row = head_row(heads, head)
    roles = table(source, "roles").set_index("role")
    role_rows = []
    for name in head_roles(row, role_names(heads)):
        info = roles.loc[name] if name in roles.index else pd.Series(dtype=object)
        tested = f"validated.{name}" in heads.columns
        role_rows.append(
            {
                "role": name,
                "label": str(info.get("label", name)),
                "analysis": str(info.get("analysis", "")),
                "threshold": str(info.get("threshold", "")),
                "paper": str(info.get("paper", "")),
                "validated": ("yes" if bool(row[f"validated.{name}"]) else "no") if tested else "not tested",
                "run_id": str(info.get("run_id", "")),
            }
        )
    provenance = table(source, "columns").set_index("column")
    rows = []
    columns = source_columns(heads)
    for column in columns:
        if column.endswith("_sem") and column.removesuffix("_sem") in columns:
            continue  # shown as the ± of its metric
        numeric = is_number(heads[column])
        value = row[column]
        sem_column = f"{column}_sem"
        sem = float(row[sem_column]) if sem_column in heads.columns and numeric else math.nan
        where = provenance.loc[column] if column in provenance.index else pd.Series(dtype=object)
        rows.append(
            {
                "column": column,
                "analysis": str(where.get("analysis", column.split(".", 1)[0])),
                "source_column": str(where.get("source_column", column.split(".", 1)[1])),
                "value": value,
                "sem": sem,
                "percentile": percentile(heads[column], float(value)) if numeric else math.nan,
                "numeric": numeric,
                "run_id": str(where.get("run_id", "")),
            }
        )
    return HeadCard(
        head=head,
        kv_head=int(row["kv_head"]),
        depth=float(row["depth"]),
        roles=pd.DataFrame(
            role_rows, columns=["role", "label", "analysis", "threshold", "paper", "validated", "run_id"]
        ),
        metrics=pd.DataFrame(
            rows,
            columns=[
                "column",
                "analysis",
                "source_column",
                "value",
                "sem",
                "percentile",
                "numeric",
                "run_id",
            ],
        ),
    )


def value_text(value: object) -> str:
    """A heads-table cell as the card shows it: 4 significant digits, true/false, "n/a" for NaN."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}" if math.isfinite(float(value)) else "n/a"
    text = str(value) if value is not None else ""
    return text or "—"


def sources(source: Source) -> pd.DataFrame:
    """The joined runs: analysis, run_id, created, config_hash, ... (one row per analysis)."""
    return table(source, "sources")


def source_run(source: Source, analysis: str) -> str | None:
    """The id of the ``analysis`` run the atlas joined (None: it joined none)."""
    frame = sources(source)
    rows = frame[frame["analysis"] == analysis]
    return str(rows["run_id"].iloc[0]) if len(rows) else None


PATTERN_ANALYSIS = "census"  # the joined analysis whose runs keep whole attention patterns
# Roles measured on the census's repeated random block: their heads' patterns are drawn on it.
REPEATED_ROLES = frozenset({"induction", "duplicate_token"})


def pattern_input_set(roles: Iterable[str]) -> census_views.InputSet:
    """The census input set a head's pattern is drawn on: the repeated random block for an
    induction or duplicate-token head (where their stripes show), natural text otherwise."""
    return "repeated" if REPEATED_ROLES & set(roles) else "natural"


def pattern_figure(census_run: Source, head: PickedHead, roles: Iterable[str]) -> go.Figure:
    """``head``'s attention on the first example the census run kept (of the input set its roles
    were measured on, else of the other), or a message saying why there is none."""
    wanted = pattern_input_set(roles)
    other: census_views.InputSet = "repeated" if wanted == "natural" else "natural"
    for kind in (wanted, other):
        examples = census_views.example_ids(census_run, kind)  # type: ignore[arg-type]
        if examples:
            picked = census_views.PickedHead(head.layer, head.head)
            fig = census_views.pattern_figure(
                census_run,  # type: ignore[arg-type]
                examples[0],
                picked,
                scale="sqrt",
                input_set=kind,
            )
            fig.update_layout(height=520)
            return fig
    return figures.message_figure(census_views.missing_examples(census_run, wanted))  # type: ignore[arg-type]


# Where a page's own ``head`` URL parameter takes another form than ``L<layer>H<head>``.
HEAD_PARAMETERS = {"vit-heads": "{layer}-{head}"}


def head_parameter(analysis: str, head: PickedHead) -> str:
    """The ``head`` URL parameter the atlas passes to ``analysis``'s page: ``L<layer>H<head>``, in
    the form that page reads where it reads one (the ViT page: ``<layer>-<head>``)."""
    form = HEAD_PARAMETERS.get(analysis, "L{layer}H{head}")
    return form.format(layer=head.layer, head=head.head)


# --------------------------------------------------------------------------------------- findings


def overlap_figure(source: Source) -> go.Figure:
    """Role x role map of the Jaccard index of the heads they flag (roles with at least the atlas's
    ``min_heads`` heads); each cell says how many heads have both roles."""
    over = table(source, "overlap")
    heads = table(source, "heads")
    present = set(over["role_a"]) | set(over["role_b"])
    names = [n for n in role_names(heads) if n in present]
    if len(names) < 2:
        return figures.message_figure(
            "no two roles with enough heads to compare: the overlap needs two roles with at least "
            f"{_min_heads(source)} heads each"
        )
    index = {n: i for i, n in enumerate(names)}
    jaccard = np.full((len(names), len(names)), np.nan)
    both = np.full((len(names), len(names)), "", dtype=object)
    hover = np.full((len(names), len(names)), "", dtype=object)
    for r in over.itertuples(index=False):
        i, j = index[str(r.role_a)], index[str(r.role_b)]
        text = (
            f"{r.role_a} & {r.role_b}<br>both: {int(r.both)} heads (of {int(r.n_a)} and {int(r.n_b)})"
            f"<br>Jaccard {common.num(r.jaccard, '.2f')}; independent roles: {float(r.expected_both):.1f}"
        )
        for a, b in ((i, j), (j, i)):
            jaccard[a, b] = r.jaccard
            both[a, b] = str(int(r.both))
            hover[a, b] = text
    counts = {n: int(heads[f"role.{n}"].sum()) for n in names}
    for n, i in index.items():
        both[i, i] = f"({counts[n]})"
        hover[i, i] = f"{n}: {counts[n]} heads"
    fig = go.Figure(
        go.Heatmap(
            z=jaccard,
            x=names,
            y=names,
            text=both,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": {"text": "Jaccard"}},
        )
    )
    fig.update_layout(
        title=figures.titled(
            "Role overlap",
            "Colour: heads with both roles over heads with either (Jaccard); numbers: heads with both; "
            "diagonal: heads with the role.",
        ),
        xaxis={"type": "category", "tickangle": -40},
        yaxis={"type": "category", "autorange": "reversed"},
        height=max(360, 140 + 30 * len(names)),
        margin={"l": 130, "r": 20, "t": 70, "b": 130},
        plot_bgcolor="#ffffff",
    )
    return fig


def _min_heads(source: Source) -> int:
    return int(getattr(source.config, "min_heads", 2))


def top_correlations(source: Source, k: int = 10, *, cross_only: bool = True) -> pd.DataFrame:
    """The ``k`` strongest Spearman correlations (by |rho|) between key metrics; with
    ``cross_only``, only pairs of metrics from different analyses."""
    corr = table(source, "correlations").dropna(subset=["spearman"])
    if cross_only:
        corr = corr[~corr["same_analysis"].astype(bool)]
    order = corr["spearman"].abs().sort_values(ascending=False, kind="stable").index
    return corr.loc[order].head(k).reset_index(drop=True)


def many_roles(source: Source) -> pd.DataFrame:
    """The heads with several roles (most first, as the atlas listed them), with their roles in words."""
    many = table(source, "multi_role")
    labels = role_labels(source)
    many["roles_text"] = [role_text(r, labels) for r in many["roles"]]
    return many


def roles_table(source: Source) -> pd.DataFrame:
    """One row per role: role, label, analysis, threshold, paper, heads, share, mean depth, and
    validated ("n of m" where tested, "not tested" otherwise)."""
    roles = table(source, "roles")
    roles["validated"] = [
        f"{int(v)} of {int(n)}" if int(v) >= 0 else "not tested"
        for v, n in zip(roles["n_validated"], roles["n_heads"], strict=True)
    ]
    return roles


def settings_line(source: Source) -> str:
    info = model_info(source)
    heads = table(source, "heads")
    n_layers, n_heads = grid_shape(heads)
    joined = ", ".join(f"{r.analysis} ({r.run_id})" for r in sources(source).itertuples(index=False))
    return (
        f"{info.get('name', '?')}, {n_layers} layers × {n_heads} heads; joined: {joined or 'no run'}; "
        f"the overlap compares roles with at least {_min_heads(source)} heads"
    )


def summary_numbers(source: Source) -> list[tuple[str, str]]:
    """The atlas in a few numbers: (what, how many)."""
    heads = table(source, "heads")
    n_layers, n_heads = grid_shape(heads)
    roles = table(source, "roles")
    skipped = table(source, "skipped")
    return [
        ("model", str(model_info(source).get("name", "?"))),
        ("heads", f"{len(heads)} ({n_layers} layers × {n_heads} heads)"),
        ("analyses joined", str(len(sources(source)))),
        ("roles given", str(len(roles))),
        ("heads with a role", str(int((heads["n_roles"] >= 1).sum()))),
        ("heads with two roles or more", str(int((heads["n_roles"] >= 2).sum()))),
        ("most roles of one head", str(int(heads["n_roles"].max()) if len(heads) else 0)),
        ("runs skipped", str(len(skipped))),
    ]


def findings_lines(source: Source) -> list[str]:
    """What the atlas's numbers say, in sentences."""
    heads = table(source, "heads")
    roles = table(source, "roles")
    lines = []
    if len(roles):
        busiest = roles.sort_values("n_heads", ascending=False, kind="stable").iloc[0]
        empty = roles[roles["n_heads"] == 0]["role"].tolist()
        lines.append(
            f"{int((heads['n_roles'] >= 1).sum())} of {len(heads)} heads have at least one of the "
            f"{len(roles)} roles; the most common is {busiest['role']} ({int(busiest['n_heads'])} heads, "
            f"mean relative depth {common.num(busiest['mean_depth'], '.2f')})."
            + (f" No head qualifies as {', '.join(empty)}." if empty else "")
        )
    many = heads[heads["n_roles"] >= 2]
    if len(many):
        top = many.sort_values(["n_roles", "layer", "head"], ascending=[False, True, True]).iloc[0]
        lines.append(
            f"{len(many)} heads have two roles or more; L{int(top['layer'])}H{int(top['head'])} has the most: "
            f"{role_text(top['roles'])}."
        )
    over = table(source, "overlap").dropna(subset=["jaccard"])
    over = over[over["both"] > 0].sort_values("jaccard", ascending=False, kind="stable")
    if len(over):
        r = over.iloc[0]
        lines.append(
            f"The largest overlap: {r['role_a']} and {r['role_b']} share {int(r['both'])} heads "
            f"(Jaccard {r['jaccard']:.2f}; {r['expected_both']:.1f} expected if independent)."
        )
    top = top_correlations(source, 1)
    if len(top):
        r = top.iloc[0]
        lines.append(
            f"The strongest correlation across analyses: {r['metric_a']} and {r['metric_b']}, "
            f"Spearman {r['spearman']:+.2f} over {int(r['n'])} heads."
        )
    for r in table(source, "skipped").itertuples(index=False):
        lines.append(f"Not joined: {r.run_id} ({r.analysis}): {r.reason}.")
    return lines


__all__ = [
    "HeadCard",
    "PickedHead",
    "clicked_head",
    "filter_heads",
    "findings_lines",
    "head_card",
    "head_parameter",
    "many_roles",
    "overlap_figure",
    "parse_head",
    "percentile",
    "role_grid",
    "roles_table",
    "summary_numbers",
    "top_correlations",
]
