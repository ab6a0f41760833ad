"""``headlab run vhd`` and ``headlab run vhr``: caption and ask POPE under each setting, read VHD on
the baseline captions, and gather the tables; plus the terminal summary.

See docs/analyses/vhd.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses import validation as va
from analyses.base import AnalysisResult
from analyses.tasks import scene_captions as scc
from analyses.vhd.captions import (
    Answers,
    EvalInputs,
    caption_setting,
    eval_inputs,
    pope_setting,
    require_llava,
)
from analyses.vhd.config import BASELINE, VhdConfig, VhrSetting, parse_layers
from analyses.vhd.divergence import tvhd_test
from analyses.vhd.evaluation import (
    heads_table,
    paired_deltas,
    scene_table,
    summary_table,
    token_tables,
    vhd_pass,
)
from analyses.vhd.heldout import EXTRA as VALIDATION_EXTRA
from analyses.vhd.heldout import run_validation, validation_work
from analyses.vhd.reinforcement import Selection
from analyses.vhd.sweep import plan as sweep_plan
from analyses.vhd.sweep import sweep_lines, sweep_table
from probe.loading import LoadedModel


def _settings(
    model: LoadedModel, cfg: VhdConfig, with_vhr: bool
) -> tuple[list[VhrSetting | None], list[VhrSetting]]:
    """The settings to run, ``None`` (the baseline) first, then the chosen ones and the sweep's own;
    and the sweep's points. Their layers are checked before any work."""
    chosen = list(cfg.settings if cfg.ablations else cfg.settings[:1]) if with_vhr else []
    extra, points = sweep_plan(cfg, chosen) if with_vhr else ([], [])
    settings: list[VhrSetting | None] = [None, *chosen, *extra]
    for s in settings:
        if s is not None:
            parse_layers(s.layers, model.n_layers)  # fail before any work
    return settings, points


def _asks_pope(cfg: VhdConfig, setting: VhrSetting | None) -> bool:
    """POPE under the baseline and the main setting, and the ablations with ``pope_ablations``
    (never under the sweep's own settings)."""
    if setting is None or setting.name == cfg.settings[0].name:
        return True
    return cfg.pope_ablations and cfg.ablations and setting in cfg.settings


@dataclass
class SettingRuns:
    """What captioning and POPE under every setting gave: one CHAIR and one POPE table per setting,
    the ``settings`` rows, the main setting's head selections and the baseline's answers."""

    caption_frames: list[pd.DataFrame] = field(default_factory=list)
    pope_frames: list[pd.DataFrame] = field(default_factory=list)
    setting_rows: list[dict[str, Any]] = field(default_factory=list)
    selection_main: list[Selection] = field(default_factory=list)
    baseline_answers: list[Answers] = field(default_factory=list)


def _run_settings(
    model: LoadedModel,
    cfg: VhdConfig,
    inputs: EvalInputs,
    settings: list[VhrSetting | None],
    bar: Any,
    timings: dict[str, float],
) -> SettingRuns:
    """Caption every scene and ask the POPE questions under each setting (POPE under the baseline
    and the main setting only unless ``pope_ablations``)."""
    out = SettingRuns()
    for setting in settings:
        name = BASELINE if setting is None else setting.name
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        answers, selections = caption_setting(model, cfg, inputs.images, setting, bar)
        if setting is None:
            out.baseline_answers = answers
        elif setting.name == cfg.settings[0].name:
            out.selection_main = selections
        texts = [t for a in answers for t in a.texts]
        table = scc.chair_table(inputs.scenes, texts)
        table.insert(0, "setting", name)
        out.caption_frames.append(table)
        ask = bool(inputs.questions) and _asks_pope(cfg, setting)
        pope = (
            pope_setting(model, cfg, inputs.images, inputs.questions, setting, bar) if ask else pd.DataFrame()
        )
        if len(pope):
            pope.insert(0, "setting", name)
            out.pope_frames.append(pope)
        timings[f"{name}_s"] = time.perf_counter() - t0
        if setting is not None:
            n_sel = torch.cat([s.selected for s in selections]).sum(dim=(1, 2)).float()
            out.setting_rows.append(
                {
                    **asdict(setting),
                    "layers_used": ",".join(map(str, parse_layers(setting.layers, model.n_layers))),
                    "heads_reinforced_mean": float(n_sel.mean()),
                    "seconds": timings[f"{name}_s"],
                }
            )
    return out


def _evaluate(model: LoadedModel, cfg: VhdConfig, with_vhr: bool, analysis: str) -> AnalysisResult:
    from tqdm.auto import tqdm

    require_llava(model)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = eval_inputs(cfg)
    settings, points = _settings(model, cfg, with_vhr)
    n_scenes, n_questions = len(inputs.scenes), len(inputs.questions)
    n_pope = sum(_asks_pope(cfg, s) for s in settings)
    validate = with_vhr and cfg.validation
    n_work = len(settings) * n_scenes + n_pope * n_questions + n_scenes
    n_work += validation_work(cfg) if validate else 0
    bar = tqdm(total=n_work, desc=analysis, unit="item", disable=not cfg.progress)
    runs = _run_settings(model, cfg, inputs, settings, bar, timings)
    t0 = time.perf_counter()
    bar.set_postfix_str("VHD")
    vhd, norm, agreement = vhd_pass(model, cfg, inputs.images, runs.baseline_answers, bar)
    timings["vhd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar.set_postfix_str("validation")
    validation = (
        run_validation(model, cfg, inputs, runs.selection_main, bar)
        if validate
        else va.frame([], extra=VALIDATION_EXTRA)
    )
    timings["validation_s"] = time.perf_counter() - t0
    bar.close()

    tokens, words = token_tables(model, inputs.scenes, runs.baseline_answers, vhd, cfg.top_k)
    captions = pd.concat(runs.caption_frames, ignore_index=True)
    pope = pd.concat(runs.pope_frames, ignore_index=True) if runs.pope_frames else pd.DataFrame()
    summary = summary_table(captions, pope, cfg)
    deltas = paired_deltas(captions, pope, n_scenes, cfg)
    heads = va.evidence_columns(heads_table(model, cfg, vhd, norm, runs.selection_main), validation, "vhr")
    timings["total_s"] = time.perf_counter() - t_all
    return AnalysisResult(
        analysis=analysis,
        model_info=model.describe(),
        config=cfg,
        tables={
            "heads": heads,
            "captions": captions,
            "tokens": tokens,
            "words": words,
            "tvhd_test": tvhd_test(words),
            "pope": pope,
            "summary": summary,
            "deltas": deltas,
            "scenes": scene_table(inputs.scenes),
            "settings": pd.DataFrame(runs.setting_rows),
            "sweep": sweep_table(points, summary, deltas, model.n_layers),
            "validation": validation,
        },
        arrays={"vhd": vhd.astype(np.float16), "images": inputs.images[: cfg.n_display]},
        seeds={
            "seed": cfg.seed,
            "eval_seed": inputs.data.eval_seed,
            "conflict_seed": inputs.data.conflict_seed,
        },
        timings=timings,
        notes={"teacher_forced_agreement": agreement, "n_questions": n_questions},
    )


def run_vhd(model: LoadedModel, config: VhdConfig | None = None) -> AnalysisResult:
    """``headlab run vhd``: captions and POPE without intervention, VHD at every step, T-VHD of object
    words (hallucinated vs correct)."""
    return _evaluate(model, config or VhdConfig(), with_vhr=False, analysis="vhd")


def run_vhr(model: LoadedModel, config: VhdConfig | None = None) -> AnalysisResult:
    """``headlab run vhr``: everything :func:`run_vhd` does plus CHAIR and POPE under each VHR setting
    (the main one first, then the ablations and the random-heads control), with paired changes."""
    return _evaluate(model, config or VhdConfig(), with_vhr=True, analysis="vhr")


def summary(result: AnalysisResult) -> str:
    """A few lines for the terminal."""
    t = result.tables
    s = t["summary"]
    lines = [
        f"{result.analysis} on {result.model_info.get('name')}: {len(t['scenes'])} scenes, "
        f"teacher-forced agreement {result.notes.get('teacher_forced_agreement', math.nan):.3f}"
    ]
    for name, frame in s.groupby("vhr_setting", sort=False):
        got = {(r.benchmark, r.setting, r.metric): r for r in frame.itertuples()}
        parts = []
        for key, label in (
            (("CHAIR", "captions", "CHAIR_S"), "CHAIR_S"),
            (("CHAIR", "captions", "CHAIR_I"), "CHAIR_I"),
            (("POPE", "adversarial", "F1"), "POPE-adv F1"),
            (("POPE", "random", "F1"), "POPE-rand F1"),
        ):
            if key in got:
                r = got[key]
                parts.append(f"{label} {r.value:.3f} [{r.lo:.3f}, {r.hi:.3f}]")
        lines.append(f"  {name:<20} " + "; ".join(parts))
    test = t["tvhd_test"].iloc[0]
    lines.append(
        f"  T-VHD: hallucinated {test.mean_hallucinated:.2f} (n={int(test.n_hallucinated)}) vs correct "
        f"{test.mean_correct:.2f} (n={int(test.n_correct)}); Mann-Whitney p={test.p_value:.3g}, AUROC {test.auroc_correct:.3f}"
    )
    lines += sweep_lines(t.get("sweep", pd.DataFrame()))
    lines += va.summary_lines(t.get("validation", pd.DataFrame()))
    top = t["heads"].nlargest(5, "vhd_mean")
    lines.append(
        "  top VHD heads: " + ", ".join(f"L{r.layer}H{r.head} {r.vhd_mean:.3f}" for r in top.itertuples())
    )
    return "\n".join(lines)
