"""The training run: features, tokens, the optimiser steps and the trained weights, in named steps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from probe import vlm
from probe.errors import ConfigError, HeadlabError
from probe.kernels import native_attention
from probe.model import LoadedModel
from probe.vlm_train.config import ImageSet, TrainConfig, TrainExample, TrainResult
from probe.vlm_train.features import extract_features
from probe.vlm_train.parts import _autocast, _Parts
from probe.vlm_train.tokens import _batch, _tokenize, _Tokens


def train(
    model: LoadedModel,
    images: ImageSet,
    examples: Sequence[TrainExample],
    config: TrainConfig | None = None,
    *,
    eval_images: ImageSet | None = None,
    eval_examples: Sequence[TrainExample] = (),
    feature_key: str | None = None,
    eval_feature_key: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model``'s projector (and LoRA deltas if ``config.lora_rank``) on ``examples``.

    Seeded and reproducible for a given device: batches are drawn epoch by epoch in a permutation
    from ``config.seed``. At the end the trained weights are written into ``model`` (projector
    copied, LoRA merged), so it can be evaluated at once; the result holds them in float32.
    ``feature_key`` names the image set for the feature cache (None: no cache).
    """
    vlm._require_vlm(model)
    config = config or TrainConfig()
    if not examples:
        raise ConfigError("no training examples; give at least one (image, prompt, answer) triple")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    features, eval_features = _training_features(
        model, images, config, eval_images, eval_examples, feature_key, eval_feature_key, progress, timings
    )
    t0 = time.perf_counter()
    tokens = _tokenize(model, examples, len(images))
    eval_tokens = _tokenize(model, eval_examples, len(eval_images)) if eval_examples and eval_images else None
    timings["tokenize_s"] = time.perf_counter() - t0
    parts = _Parts(model, config)
    t_train = time.perf_counter()
    run = _run_steps(
        _Loop(model, parts, config, _pad_id(model), tokens, features, eval_tokens, eval_features),
        t_start=t_start,
        t_train=t_train,
        progress=progress,
    )
    timings["train_s"] = time.perf_counter() - t_train
    timings["seconds_per_step"] = timings["train_s"] / max(1, run.steps_done)
    timings["total_s"] = time.perf_counter() - t_start
    projector, lora = _trained_weights(parts)
    file = vlm.ProjectorFile(projector, lora, {**vlm.parts_meta(model), **_lora_meta(config)})
    vlm.apply_projector(model, file)
    lengths = [len(ids) - n for ids, n in zip(tokens.ids, tokens.n_prompt, strict=True)]
    sizes = {
        "n_examples": len(examples),
        "n_images": len(images),
        "n_eval_examples": len(eval_examples),
        "answer_tokens_mean": float(np.mean(lengths)),
        "sequence_tokens_mean": float(np.mean([len(ids) for ids in tokens.ids])),
        "trainable_parameters": parts.trainable(),
        "epochs": run.steps_done * config.batch_size / len(examples),
        "feature_bytes": int(features.numel() * features.element_size()),
    }
    return TrainResult(
        config, projector, lora, run.curve, run.eval_curve, run.steps_done, run.stopped_early, timings, sizes
    )


def _training_features(
    model: LoadedModel,
    images: ImageSet,
    config: TrainConfig,
    eval_images: ImageSet | None,
    eval_examples: Sequence[TrainExample],
    feature_key: str | None,
    eval_feature_key: str | None,
    progress: bool,
    timings: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 1: the image features of the training (and held-out) images, on the GPU if training runs there."""
    feature_timings: dict[str, float] = {}
    t0 = time.perf_counter()
    features = extract_features(
        model,
        images,
        batch_size=config.feature_batch_size,
        cache_key=feature_key if config.feature_cache else None,
        progress=progress,
        timings=feature_timings,
    )
    timings["features_s"] = time.perf_counter() - t0
    timings["features_per_image_s"] = timings["features_s"] / len(images)
    timings.update({f"features_{k}": v for k, v in feature_timings.items()})
    eval_features = None
    if eval_examples:
        if eval_images is None:
            raise ConfigError("eval_examples need eval_images")
        eval_features = extract_features(
            model,
            eval_images,
            batch_size=config.feature_batch_size,
            cache_key=eval_feature_key if config.feature_cache else None,
            progress=progress,
        )
    if model.device.type == "cuda":
        features = features.to(model.device)
        eval_features = eval_features.to(model.device) if eval_features is not None else None
    return features, eval_features


def _pad_id(model: LoadedModel) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


@dataclass
class _Loop:
    """What the training steps work on."""

    model: LoadedModel
    parts: _Parts
    config: TrainConfig
    pad: int
    tokens: _Tokens
    features: torch.Tensor
    eval_tokens: _Tokens | None
    eval_features: torch.Tensor | None


@dataclass
class _Run:
    """What the training steps produced."""

    curve: list[dict[str, float]] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False


def _eval_loss(loop: _Loop, step: int, run: _Run) -> None:
    """The loss on the held-out examples (mean over their answer tokens), appended to ``run.eval_curve``."""
    if loop.eval_tokens is None or loop.eval_features is None:
        return
    tokens, features, model = loop.eval_tokens, loop.eval_features, loop.model
    losses, weights = [], []
    with torch.no_grad():
        for start in range(0, len(tokens.ids), loop.config.batch_size):
            rows = list(range(start, min(len(tokens.ids), start + loop.config.batch_size)))
            batch = _batch(tokens, rows, loop.pad, model.device)
            with _autocast(model):
                loss = loop.parts.loss(batch, features[batch["images"].to(features.device)])
            n_scored = int(batch["answer"][:, 1:].sum())
            losses.append(float(loss) * n_scored)
            weights.append(n_scored)
    run.eval_curve.append({"step": step, "eval_loss": sum(losses) / max(1, sum(weights))})


def _run_steps(loop: _Loop, *, t_start: float, t_train: float, progress: bool) -> _Run:
    """Step 2: the optimiser steps (AdamW, warm-up and cosine decay, gradient clipping), logged."""
    from tqdm.auto import tqdm

    model, parts, config = loop.model, loop.parts, loop.config
    groups = parts.parameter_groups(config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    running: list[float] = []
    run = _Run()

    def log_point() -> dict[str, float]:
        return {
            "step": run.steps_done,
            "loss": float(np.mean(running)),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t_train,
        }

    bar = tqdm(total=config.steps, desc="train projector", disable=not progress, unit="step")
    with native_attention(model), parts.lora_hooks():
        parts.projector.train()
        for step in range(config.steps):
            if config.time_limit_s and time.perf_counter() - t_start > config.time_limit_s:
                run.stopped_early = True
                break
            while len(order) < config.batch_size:
                order += torch.randperm(len(loop.tokens.ids), generator=generator).tolist()
            rows, order = order[: config.batch_size], order[config.batch_size :]
            loss = _step(loop, optimizer, groups, rows, step)
            running.append(float(loss.detach()))
            run.steps_done = step + 1
            bar.update(1)
            if run.steps_done % config.log_every == 0 or run.steps_done == config.steps:
                point = log_point()
                run.curve.append(point)
                running = []
                bar.set_postfix(loss=f"{point['loss']:.3f}")
            if config.eval_every and run.steps_done % config.eval_every == 0:
                _eval_loss(loop, run.steps_done, run)
        if running:  # stopped between log points
            run.curve.append(log_point())
        if not run.eval_curve or run.eval_curve[-1]["step"] != run.steps_done:
            _eval_loss(loop, run.steps_done, run)
        parts.projector.eval()
    bar.close()
    return run


def _step(
    loop: _Loop, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], rows: list[int], step: int
) -> torch.Tensor:
    """One optimiser step on the examples ``rows``; returns the loss."""
    model, config = loop.model, loop.config
    batch = _batch(loop.tokens, rows, loop.pad, model.device)
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate(step, group["peak"])
    with _autocast(model):
        loss = loop.parts.loss(
            batch, loop.features[batch["images"].to(loop.features.device)], config.loss_weighting
        )
    if not torch.isfinite(loss):
        raise HeadlabError(
            f"the training loss became {float(loss)} at step {step}; lower lr (now {config.lr}) or "
            "train in float32"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.grad_clip)
    optimizer.step()
    return loss


def _trained_weights(parts: _Parts) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Step 3: the trained projector and LoRA weights, float32 copies on the CPU."""
    projector = {
        k: v.detach().to("cpu", torch.float32).clone() for k, v in parts.projector.state_dict().items()
    }
    lora: dict[str, torch.Tensor] = {}
    for key, adapter in parts.lora.items():
        lora[f"{key}.A"] = adapter.A.detach().to("cpu", torch.float32).clone()
        lora[f"{key}.B"] = adapter.B.detach().to("cpu", torch.float32).clone()
    return projector, lora


def _lora_meta(config: TrainConfig) -> dict[str, Any]:
    if not config.lora_rank:
        return {"lora_rank": 0}
    return {
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_targets": list(config.lora_targets),
    }
