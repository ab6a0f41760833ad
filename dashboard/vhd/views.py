"""VHD / T-VHD / VHR views: the tables of a ``vhd`` or ``vhr`` run read for the VHD page, the
report sections and :mod:`dashboard.vhd.figures`, and the findings sentences.

Every function takes a saved :class:`~analyses.runstore.Run` or the unsaved
:class:`~analyses.base.AnalysisResult` alike, so a notebook draws a result before saving it. Tiny or
random models may name no object at all: empty ``words``, NaN in ``tvhd_test`` and NaN CHAIR_I are
read as "none", never as errors. The run's tables and arrays are listed in docs/analyses/vhd.md.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyses.vhd import BASELINE, VhdConfig
from dashboard.core import common
from dashboard.core.common import Source
from dashboard.core.common import table as _table

ANALYSES: tuple[str, ...] = ("vhd", "vhr")
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


def table(source: Source, name: str) -> pd.DataFrame:
    return _table(source, name, kind="vhd/vhr")


def array(source: Source, name: str) -> np.ndarray:
    return common.array(source, name, kind="vhd/vhr")


has_array = common.has_array


def is_vhd(source: Source) -> bool:
    """Whether the source has the tables this module reads."""
    return common.has_tables(source, REQUIRED_TABLES)


def analysis(source: Source) -> str:
    return source.analysis


def _optional(source: Source, name: str) -> pd.DataFrame:
    return table(source, name) if name in source.table_names else pd.DataFrame()


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


def settings_line(source: Source) -> str:
    """One line naming the run's settings (plain text)."""
    cfg: VhdConfig = source.config
    scenes = table(source, "scenes")
    parts = [
        f"{analysis(source)} run of {source.model_name}",
        f"{len(scenes)} scenes",
        f"{cfg.split} split",
        f"pixel noise {cfg.noise}",
        f"at most {cfg.max_new_tokens} tokens a caption",
        f"T-VHD over the top {cfg.top_k} heads a layer",
    ]
    s = settings_table(source)
    if len(s):
        parts.append(f"{len(s)} VHR setting(s): " + ", ".join(str(n) for n in s["name"]))
    else:
        parts.append("no VHR settings (a vhd run: no intervention)")
    if cfg.pope_kinds:
        parts.append("POPE " + ", ".join(str(k) for k in cfg.pope_kinds))
    parts += [f"{cfg.n_boot} bootstrap resamples", f"seed {cfg.seed}"]
    return ", ".join(parts)


def interval_level(source: Source) -> str:
    """The level of the run's bootstrap intervals as a percentage ("95%" for ``alpha_ci`` 0.05)."""
    return f"{100 * (1 - float(source.config.alpha_ci)):.0f}%"


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


def scene_classes(source: Source) -> dict[int, str]:
    """The object classes in each scene ("a, b")."""
    sc = table(source, "scenes")
    return {
        int(scene): str(c).replace(",", ", ") for scene, c in zip(sc["scene"], sc["classes"], strict=True)
    }


def scene_options(source: Source) -> list[dict[str, Any]]:
    """The captioned scenes as dropdown options (value: the scene index), hallucinating ones marked."""
    t = tokens(source)
    classes = scene_classes(source)
    out = []
    for scene in caption_scenes(source):
        rows = t[(t["scene"] == scene) & t["object"].astype(bool)]
        bad = sorted({str(w) for w in rows.loc[rows["hallucinated"].astype(bool), "shape"]})
        label = f"scene {scene} ({classes.get(scene, '?')})"
        if bad:
            label += f": hallucinates {', '.join(bad)}"
        out.append({"label": label, "value": scene})
    return out


def token_kind(row: Any) -> str:
    """``hallucinated``, ``correct`` (the first token of an object word) or ``other``."""
    if not bool(row["object"]):
        return "other"
    return "hallucinated" if bool(row["hallucinated"]) else "correct"


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


def deltas_table(source: Source) -> pd.DataFrame:
    """The paired changes against the baseline (empty for a ``vhd`` run)."""
    return _optional(source, "deltas")


def verdict(metric: str, lo: float, hi: float) -> str:
    """``better``, ``worse`` or ``unclear`` (the interval holds 0 or is undefined, or the metric has
    no better direction)."""
    if metric in NO_DIRECTION or not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "unclear"
    up = lo > 0
    return "worse" if up == (metric in LOWER_IS_BETTER) else "better"


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
    rows = s[
        (s["vhr_setting"].astype(str) == setting)
        & (s["benchmark"] == bench)
        & (s["setting"] == kind)
        & (s["metric"] == metric)
    ]
    return rows.iloc[0] if len(rows) else None


def _delta_row(d: pd.DataFrame, setting: str, bench: str, kind: str, metric: str) -> pd.Series | None:
    """The row of ``deltas`` table ``d`` for one setting and metric (None: the run has none)."""
    if d.empty:
        return None
    rows = d[
        (d["setting"].astype(str) == setting)
        & (d["benchmark"] == bench)
        & (d["kind"] == kind)
        & (d["metric"] == metric)
    ]
    return rows.iloc[0] if len(rows) else None


def _delta_phrase(row: pd.Series | None, metric: str) -> str:
    if row is None:
        return ""
    if not all(math.isfinite(float(row[c])) for c in ("delta", "lo", "hi")):
        return "no paired interval: the metric is undefined in some resamples"
    judged = verdict(metric, float(row["lo"]), float(row["hi"]))
    change = {"better": "an improvement", "worse": "a worsening", "unclear": "the interval holds 0"}[judged]
    return f"Δ {num(row['delta'], '+.3f')} [{num(row['lo'], '+.3f')}, {num(row['hi'], '+.3f')}], {change}"


def _run_line(source: Source, n_scenes: int) -> list[str]:
    """How well teacher forcing reproduced the captions (the pass VHD is read on)."""
    agree = source.notes.get("teacher_forced_agreement")
    if agree is None:
        return []
    return [
        f"{analysis(source)} on {source.model_name}, {n_scenes} scenes: teacher forcing reproduces "
        f"{100 * float(agree):.1f}% of the generated caption tokens (VHD is read on that pass)."
    ]


def _heads_line(h: pd.DataFrame) -> list[str]:
    """The most vision-aware head and the layers with the highest and lowest mean VHD."""
    if "vhd_mean" not in h or not np.isfinite(h["vhd_mean"].astype(float)).any():
        return []
    top = h.loc[h["vhd_mean"].astype(float).idxmax()]
    per_layer = h.groupby("layer")["vhd_mean"].mean()
    return [
        f"The most vision-aware head is layer {int(top['layer'])}, head {int(top['head'])} (mean VHD "
        f"{float(top['vhd_mean']):.3f}); per layer, mean VHD is highest in layer {int(per_layer.idxmax())} "
        f"({float(per_layer.max()):.3f}) and lowest in layer {int(per_layer.idxmin())} "
        f"({float(per_layer.min()):.3f})."
    ]


def _main_setting_line(source: Source, h: pd.DataFrame, main: str | None) -> list[str]:
    """What the main VHR setting reinforced (nothing for a ``vhd`` run)."""
    s = settings_table(source)
    if main is None or not len(s):
        return []
    r = s.iloc[0]
    layers = vhr_layers(source)
    extra = ""
    if "outlier_share" in h and layers:
        in_layers = h[h["layer"].isin(layers)]
        extra = (
            f"; {100 * float(in_layers['outlier_share'].mean()):.1f}% of the head-input pairs in those "
            "layers were set aside as outliers"
        )
    return [
        f"The main VHR setting '{main}' (alpha {num(r.get('alpha'), 'g')}, layers {r.get('layers')}"
        + (f" = {layer_ranges(layers)}" if layers else "")
        + f") reinforced {num(r.get('heads_reinforced_mean'), '.1f')} heads per input on average{extra}."
    ]


def _tvhd_line(source: Source) -> list[str]:
    """T-VHD of hallucinated against correct object words, or why they cannot be compared."""
    w = words(source)
    test = tvhd_test_row(source)
    n_h = int(test.get("n_hallucinated", 0)) if test else 0
    n_c = int(test.get("n_correct", 0)) if test else 0
    if w.empty:
        return ["The baseline captions name no object word, so T-VHD cannot be compared by label."]
    if not n_h:
        return [
            f"The baseline captions hold {n_c} correct object word(s) and no hallucinated one, so T-VHD of "
            f"hallucinated and correct words cannot be compared (mean T-VHD of correct words "
            f"{num(test.get('mean_correct'), '.2f')})."
        ]
    if not n_c:
        return [
            f"All {n_h} object words of the baseline captions are hallucinated; there is nothing to compare."
        ]
    lower = float(test["mean_hallucinated"]) < float(test["mean_correct"])
    p = float(test.get("p_value", math.nan))
    return [
        f"T-VHD of hallucinated object words (n = {n_h}, mean {num(test['mean_hallucinated'], '.2f')}, "
        f"median {num(test['median_hallucinated'], '.2f')}) is {'lower' if lower else 'not lower'} than of "
        f"correct ones (n = {n_c}, mean {num(test['mean_correct'], '.2f')}, median "
        f"{num(test['median_correct'], '.2f')}): Mann–Whitney p = {num(p, '.3g')}, AUROC of T-VHD for "
        f"'correct' {num(test.get('auroc_correct'), '.3f')} ("
        + ("the paper's direction" if lower else "against the paper's direction")
        + (", significant at 5%" if math.isfinite(p) and p < 0.05 else ", not significant at 5%")
        + ")."
    ]


def _chair_lines(summary: pd.DataFrame, d: pd.DataFrame, main: str | None, n_scenes: int) -> list[str]:
    """Each CHAIR metric of the baseline, and under the main VHR setting with its paired change."""
    lines = []
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
    return lines


def _pope_lines(source: Source, summary: pd.DataFrame, d: pd.DataFrame, main: str | None) -> list[str]:
    """POPE F1 and accuracy of each kind for the baseline, and F1 under the main VHR setting."""
    lines = []
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
    return lines


def _settings_verdict_line(d: pd.DataFrame) -> list[str]:
    """Which VHR settings clearly improve or worsen CHAIR_S (with more than one setting)."""
    if not len(d):
        return []
    chair = d[(d["benchmark"] == "CHAIR") & (d["metric"] == "CHAIR_S")]
    if len(chair) <= 1:
        return []
    verdicts = {str(r.setting): verdict("CHAIR_S", float(r.lo), float(r.hi)) for r in chair.itertuples()}
    better = [n for n, v in verdicts.items() if v == "better"]
    worse = [n for n, v in verdicts.items() if v == "worse"]
    return [
        f"Across the {len(chair)} VHR settings, CHAIR_S improves clearly under "
        f"{', '.join(better) or 'none'} and worsens clearly under {', '.join(worse) or 'none'}; "
        "the others' intervals hold 0."
    ]


def _resolution_line(summary: pd.DataFrame, n_scenes: int) -> list[str]:
    """How wide the baseline CHAIR_S interval is: the smallest difference the run resolves."""
    base = _metric_row(summary, BASELINE, "CHAIR", "captions", "CHAIR_S")
    if not n_scenes or base is None:
        return []
    width = float(base["hi"]) - float(base["lo"])
    spread = (
        f"the baseline CHAIR_S interval alone spans {num(width, '.3f')}, so smaller differences are "
        "not resolved"
        if math.isfinite(width) and width > 0
        else f"the baseline CHAIR_S is {num(base['value'])} in every resample (an interval of no width)"
    )
    return [f"Every interval is a percentile bootstrap over these {n_scenes} scenes; {spread}."]


def findings(source: Source) -> list[str]:
    """Plain-text sentences reading the run's numbers (no number is written here that is not in
    the run's tables or notes)."""
    n_scenes = len(table(source, "scenes"))
    summary, d = summary_table(source), deltas_table(source)
    h = heads(source)
    main = main_setting(source)
    return [
        *_run_line(source, n_scenes),
        *_heads_line(h),
        *_main_setting_line(source, h, main),
        *_tvhd_line(source),
        *_chair_lines(summary, d, main, n_scenes),
        *_pope_lines(source, summary, d, main),
        *_settings_verdict_line(d),
        *[f"Warning: {c.message()}" for c in collapses(source)],
        *_resolution_line(summary, n_scenes),
    ]
