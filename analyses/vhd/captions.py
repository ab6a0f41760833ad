"""The data VHD and VHR evaluate and the model's answers: noisy held-out scenes and their POPE
questions, greedy captions and yes/no answers with or without reinforced heads.

See docs/analyses/vhd.md ("The testbed") and docs/scene-llava.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.tasks import scene_captions as scc
from analyses.tasks import scenes as sc
from analyses.vhd.config import VhdConfig, VhrSetting
from analyses.vhd.forward import make_rows, pad_id, scale_heads, spans
from analyses.vhd.reinforcement import Selection, select_heads
from probe import vlm
from probe.errors import ConfigError
from probe.loading import Batch, LoadedModel


def noisy_images(scenes: Sequence[sc.Scene], noise: float, seed: int) -> np.ndarray:
    """Rendered scenes with Gaussian pixel noise of std ``noise`` (0–255 scale), seeded per scene."""
    images = sc.render_batch(scenes)
    if noise <= 0:
        return images
    out = np.empty_like(images)
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([0x5A11, seed, scene.seed, scene.index])
        out[i] = np.clip(
            images[i].astype(np.float32) + rng.normal(0.0, noise, images[i].shape), 0, 255
        ).astype(np.uint8)
    return out


def require_llava(model: LoadedModel) -> None:
    if model.kind != "vision-language":
        raise ConfigError(
            f"{model.name} is a {model.kind} model; VHD and VHR need a vision-language model: "
            "--model scene-llava, tiny-llava or a LLaVA checkpoint directory"
        )


@dataclass
class EvalInputs:
    """What a run evaluates: the held-out scenes, their (noisy) images, the POPE questions and the
    training statistics that ranked their negatives (``None`` without POPE)."""

    data: scc.SceneCaptionConfig
    scenes: list[sc.Scene]
    images: np.ndarray
    questions: list[scc.PopeQuestion]
    stats: sc.Cooccurrence | None = None


def eval_inputs(cfg: VhdConfig) -> EvalInputs:
    """The ``n_scenes`` held-out scenes of ``split`` with pixel noise, and ``pope_per_scene`` POPE
    questions of each kind per scene (negatives ranked by the training set's statistics)."""
    data = scc.SceneCaptionConfig()
    scenes = scc.eval_scenes(data, cfg.split, cfg.n_scenes)  # type: ignore[arg-type]
    images = noisy_images(scenes, cfg.noise, cfg.seed)
    stats = scc.training_statistics(data, cfg.n_stats) if cfg.pope_kinds else None
    questions = [
        q
        for kind in cfg.pope_kinds
        for q in scc.pope_questions(scenes, stats, kind, n_per_scene=cfg.pope_per_scene, seed=cfg.seed)  # type: ignore[arg-type]
    ]
    return EvalInputs(data, scenes, images, questions, stats)


@dataclass
class Answers:
    """Greedy answers of one batch: token ids (EOS and later cut), texts, first-step Yes−No margins."""

    tokens: list[list[int]]
    texts: list[str]
    margins: list[float] = field(default_factory=list)


def generate_ids(
    model: LoadedModel,
    prompts: Sequence[str],
    pixels: torch.Tensor,
    max_new_tokens: int,
    scales: torch.Tensor | None = None,
    *,
    yes_no: bool = False,
) -> Answers:
    """Greedy answers to ``prompts`` about ``pixels`` (one per row), with per-row head ``scales``."""
    batch: Batch = vlm.encode_prompts(model, list(prompts))
    context = scale_heads(model, scales) if scales is not None else contextlib.nullcontext()
    with context:
        result = vlm._native_generate(model, pixels, batch, max_new_tokens, scores=yes_no)
    tok = model.tokenizer
    stops = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    stops.add(pad_id(model))
    tokens = []
    for row in result.sequences[:, batch.input_ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:cut])
    texts = [t.strip() for t in tok.batch_decode(tokens, skip_special_tokens=True)]
    margins: list[float] = []
    if yes_no:
        yes = tok("Yes", add_special_tokens=False)["input_ids"][0]
        no = tok("No", add_special_tokens=False)["input_ids"][0]
        first = result.scores[0].float()
        margins = (first[:, yes] - first[:, no]).tolist()
    return Answers(tokens, texts, margins)


def caption_setting(
    model: LoadedModel, cfg: VhdConfig, images: np.ndarray, setting: VhrSetting | None, bar: Any
) -> tuple[list[Answers], list[Selection]]:
    answers, selections = [], []
    for start, stop in spans(len(images), cfg.batch_size):
        pixels = model.preprocess(images[start:stop])
        prompts = [cfg.prompt] * (stop - start)
        scales = None
        if setting is not None:
            selection = select_heads(model, make_rows(model, prompts, pixels), setting, seed=cfg.seed + start)
            selections.append(selection)
            scales = selection.scales
        answers.append(generate_ids(model, prompts, pixels, cfg.max_new_tokens, scales))
        bar.update(stop - start)
    return answers, selections


def pope_setting(
    model: LoadedModel,
    cfg: VhdConfig,
    images: np.ndarray,
    questions: Sequence[scc.PopeQuestion],
    setting: VhrSetting | None,
    bar: Any,
) -> pd.DataFrame:
    texts: list[str] = []
    margins: list[float] = []
    for start in range(0, len(questions), cfg.batch_size):
        part = questions[start : start + cfg.batch_size]
        pixels = model.preprocess(images[[q.scene for q in part]])
        prompts = [q.text for q in part]
        scales = None
        if setting is not None:
            scales = select_heads(
                model, make_rows(model, prompts, pixels), setting, seed=cfg.seed + start
            ).scales
        got = generate_ids(model, prompts, pixels, cfg.pope_max_new_tokens, scales, yes_no=True)
        texts += got.texts
        margins += got.margins
        bar.update(len(part))
    return scc.pope_table(questions, texts, margins)
