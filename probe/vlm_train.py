"""Training a LLaVA's projector (optionally with LoRA deltas on its language model) on image-text pairs.

LLaVA's first stage: the image tower and the language model stay frozen (unless ``lora_rank > 0``)
and the loss is the language model's cross-entropy on the answer tokens of (image, prompt, answer)
triples. The tower's features are computed once per image and cached on disk
(:func:`extract_features`), so each step runs only projector -> language model -> loss.
:func:`train` runs the steps; :func:`save` writes the projector file, its record and the loss
figure. The scene data and the recipe live in :mod:`analyses.tasks.scene_captions`; the command is
``headlab train scene-llava``.

See docs/scene-llava.md (training the projector) and docs/models.md (projector files).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from probe import cache, vlm
from probe.errors import ConfigError, HeadlabError
from probe.kernels import native_attention
from probe.model import LoadedModel

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
IGNORE = -100

__all__ = [
    "ImageSet",
    "TrainConfig",
    "TrainExample",
    "TrainResult",
    "extract_features",
    "loss_figure",
    "save",
    "train",
]


class ImageSet(Protocol):
    """Images by index: ``images[i]`` is a uint8 RGB array ``[H, W, 3]`` (a list of arrays will do)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TrainExample:
    """One training pair: the user's ``prompt`` about image ``image`` and the answer ``target``."""

    image: int
    prompt: str
    target: str


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the data is the caller's). The defaults suit a GPU; tests use a few steps.

    ``lr`` is the projector's peak learning rate (LLaVA-1.5's stage 1: 1e-3), reached after
    ``warmup_steps`` and decayed on a cosine to ``min_lr_ratio · lr``. ``lora_rank = 0`` trains the
    projector only. ``time_limit_s > 0`` stops early (and still saves) when a wall-clock budget runs
    out. ``eval_every`` steps (and at the end) the loss on the held-out examples is measured.
    ``loss_weighting``: ``"token"`` averages the cross-entropy over every answer token of the batch
    (LLaVA's recipe), so a one-token answer ("Yes") weighs 1/30 of a caption and the yes/no questions
    are barely learned; ``"example"`` (default) averages each answer's tokens first and then the
    examples, so every example weighs the same.
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_lr: float = 2e-4
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    feature_batch_size: int = 64
    feature_cache: bool = True
    time_limit_s: float = 0.0
    loss_weighting: str = "example"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "feature_batch_size": self.feature_batch_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, value in {
            "warmup_steps": self.warmup_steps,
            "lora_rank": self.lora_rank,
            "eval_every": self.eval_every,
            "seed": self.seed,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        rates: dict[str, float] = {"lr": self.lr, "lora_lr": self.lora_lr, "lora_alpha": self.lora_alpha}
        for name, rate in rates.items():
            if not rate > 0:
                raise ConfigError(f"{name} must be positive, got {rate!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.time_limit_s < 0:
            raise ConfigError("weight_decay, grad_clip and time_limit_s must be non-negative (0: off)")
        if self.loss_weighting not in ("example", "token"):
            raise ConfigError(f"loss_weighting must be 'example' or 'token', got {self.loss_weighting!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or (self.lora_rank and not self.lora_targets):
            raise ConfigError(
                f"lora_targets must be a non-empty subset of {', '.join(LORA_TARGETS)}, got {self.lora_targets!r}"
            )

    def learning_rate(self, step: int, peak: float) -> float:
        """Linear warm-up to ``peak``, then a cosine to ``min_lr_ratio · peak`` at the last step."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What training produced: weights (float32, CPU), the loss curves, timings and sizes."""

    config: TrainConfig
    projector: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]
    curve: list[
        dict[str, float]
    ]  # every log_every steps: step, loss (mean since the last point), lr, seconds
    eval_curve: list[dict[str, float]]  # step, eval_loss
    steps_done: int
    stopped_early: bool
    timings: dict[str, float]
    sizes: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last tenth of the logged points (at least one)."""
        tail = self.curve[-max(1, len(self.curve) // 10) :]
        return float(np.mean([p["loss"] for p in tail])) if tail else math.nan

    @property
    def first_loss(self) -> float:
        return float(self.curve[0]["loss"]) if self.curve else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "stopped_early": self.stopped_early,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "final_eval_loss": self.eval_curve[-1]["eval_loss"] if self.eval_curve else None,
            "timings": self.timings,
            "sizes": self.sizes,
        }


# ============================================================================== features


@contextmanager
def _tower_sdpa(model: LoadedModel) -> Iterator[torch.nn.Module]:
    """The native image tower with SDPA attention inside the block (eager again afterwards)."""
    assert model.native_model is not None
    tower = model.native_model.get_submodule(vlm.LAYOUT.vision_tower)
    configs = {id(c): c for c in [getattr(m, "config", None) for m in tower.modules()] if c is not None}
    saved = {k: getattr(c, "_attn_implementation", None) for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "sdpa"
        yield tower
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _vision_fingerprint(model: LoadedModel) -> str:
    parts = model.extra.get("parts") or {}
    if "vision" in parts:
        return str(parts["vision"]["weight_sha256"])
    assert model.native_model is not None
    digest = hashlib.sha256()
    for name, tensor in sorted(
        model.native_model.get_submodule(vlm.LAYOUT.vision_tower).state_dict().items()
    ):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def extract_features(
    model: LoadedModel,
    images: ImageSet,
    *,
    batch_size: int = 64,
    cache_key: str | None = None,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """What the projector reads for every image, ``float16 [N, image_seq_length, d_vision]`` on the CPU.

    With ``cache_key`` (a string that names the image set exactly, e.g. its generator config and
    seed) the result is stored under ``$HEADLAB_CACHE/features`` keyed by it, the tower's weights,
    the feature layer and strategy, the preprocessing and the dtype, and read back next time.
    ``timings`` (if given) receives ``render_s`` (reading the images), ``preprocess_s`` and ``tower_s``.
    """
    vlm._require_vlm(model)
    from tqdm.auto import tqdm

    n = len(images)
    if n < 1:
        raise ConfigError("no images to extract features from")
    key_fields = {
        "images": cache_key,
        "n": n,
        "vision": _vision_fingerprint(model),
        "layer": model.extra["vision_feature_layer"],
        "strategy": model.extra["vision_feature_select_strategy"],
        "image": model.image.describe() if model.image is not None else None,
        "dtype": str(model.dtype),
    }
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    file = cache.cache_root() / "features" / f"{digest}.npy"
    if cache_key is not None and file.is_file():
        array = np.load(file)
        if timings is not None:
            timings["features_cached"] = 1.0
        return torch.from_numpy(array)
    seconds = {"render_s": 0.0, "preprocess_s": 0.0, "tower_s": 0.0}
    chunks: list[torch.Tensor] = []
    with torch.no_grad(), _tower_sdpa(model):
        for start in tqdm(range(0, n, batch_size), desc="image features", disable=not progress, unit="batch"):
            t0 = time.perf_counter()
            stack = np.stack([images[i] for i in range(start, min(n, start + batch_size))])
            t1 = time.perf_counter()
            pixels = model.preprocess(stack)
            t2 = time.perf_counter()
            feats = vlm.image_features(model, pixels)
            chunks.append(feats.to("cpu", torch.float16))
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            t3 = time.perf_counter()
            seconds["render_s"] += t1 - t0
            seconds["preprocess_s"] += t2 - t1
            seconds["tower_s"] += t3 - t2
    features = torch.cat(chunks)
    if timings is not None:
        timings.update(seconds)
    if cache_key is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, features.numpy())
        tmp.replace(file)
        file.with_suffix(".json").write_text(json.dumps(key_fields, indent=2))
    return features


# ============================================================================== tokens


@dataclass
class _Tokens:
    ids: list[list[int]]  # prompt (BOS policy applied, image tokens expanded) + answer + end of turn
    n_prompt: list[int]
    images: list[int]


def _tokenize(model: LoadedModel, examples: Sequence[TrainExample], n_images: int) -> _Tokens:
    tok = model.tokenizer
    end = tok.eos_token_id
    if end is None:
        raise HeadlabError(f"{model.name}'s tokenizer has no end-of-sequence token to end answers with")
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    prompts: dict[str, list[int]] = {}
    out = _Tokens([], [], [])
    for ex in examples:
        if not 0 <= ex.image < n_images:
            raise ConfigError(f"an example names image {ex.image}, but there are {n_images} images")
        if ex.prompt not in prompts:
            prompts[ex.prompt] = prefix + vlm.prompt_ids(model, ex.prompt)
        answer = tok(ex.target, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ConfigError(f"an example for image {ex.image} has an empty answer")
        ids = prompts[ex.prompt] + answer + [end]
        model.check_context(len(ids))
        out.ids.append(ids)
        out.n_prompt.append(len(prompts[ex.prompt]))
        out.images.append(ex.image)
    return out


def _batch(tokens: _Tokens, rows: Sequence[int], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and the answer mask (positions whose token is scored)."""
    width = max(len(tokens.ids[r]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        row = tokens.ids[r]
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        answer[i, tokens.n_prompt[r] : len(row)] = True
    images = torch.tensor([tokens.images[r] for r in rows], dtype=torch.long)
    return {
        "ids": ids.to(device),
        "attention": attention.to(device),
        "answer": answer.to(device),
        "images": images,
    }


# ============================================================================== model parts


class _Lora(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(rank, linear.in_features))
        self.B = torch.nn.Parameter(torch.zeros(linear.out_features, rank))  # starts as no change
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class _Parts:
    """The native model's pieces a training step runs, and the trainable modules."""

    def __init__(self, model: LoadedModel, config: TrainConfig) -> None:
        native = model.native_model
        assert native is not None
        self.model = model
        self.embed = native.get_submodule(vlm.LAYOUT.embed_tokens)
        self.language_model = native.get_submodule(vlm.LAYOUT.language_model)
        self.head = native.get_submodule(vlm.LAYOUT.lm_head)
        # float32 master copies; the model's own (possibly bf16) weights are written back at the end
        self.projector = copy.deepcopy(vlm.projector_module(model)).to(torch.float32)
        self.projector.requires_grad_(True)
        self.lora: dict[str, _Lora] = {}
        self.scale = config.lora_alpha / config.lora_rank if config.lora_rank else 0.0
        if config.lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                for layer in range(model.n_layers):
                    for target in config.lora_targets:
                        linear = native.get_submodule(vlm.lora_module_name(layer, target))
                        assert isinstance(linear, torch.nn.Linear)
                        self.lora[f"{layer}.{target}"] = _Lora(linear, config.lora_rank).to(model.device)
        self.projector.to(model.device)

    def parameter_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {
                "params": list(self.projector.parameters()),
                "peak": config.lr,
                "weight_decay": config.weight_decay,
            }
        ]
        if self.lora:
            params = [p for m in self.lora.values() for p in m.parameters()]
            groups.append({"params": params, "peak": config.lora_lr, "weight_decay": 0.0})
        return groups

    def trainable(self) -> int:
        return sum(p.numel() for p in self.projector.parameters()) + sum(
            p.numel() for m in self.lora.values() for p in m.parameters()
        )

    @contextmanager
    def lora_hooks(self) -> Iterator[None]:
        native = self.model.native_model
        assert native is not None
        handles = []

        def make(adapter: _Lora) -> Any:
            def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
                x = args[0]
                delta = (x.to(adapter.A.dtype) @ adapter.A.t()) @ adapter.B.t()
                return output + (self.scale * delta).to(output.dtype)

            return hook

        try:
            for key, adapter in self.lora.items():
                layer, target = key.split(".")
                module = native.get_submodule(vlm.lora_module_name(int(layer), target))
                handles.append(module.register_forward_hook(make(adapter)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def loss(
        self, batch: Mapping[str, torch.Tensor], features: torch.Tensor, weighting: str = "token"
    ) -> torch.Tensor:
        """Cross-entropy of the answer tokens (the image positions get the projected features): the mean
        over tokens (``weighting="token"``) or over examples of each example's token mean (``"example"``)."""
        model = self.model
        ids, attention, answer = batch["ids"], batch["attention"], batch["answer"]
        image_mask = ids == int(model.extra["image_token_id"])
        with torch.no_grad():
            embeds = self.embed(ids)
        projected = self.projector(features.to(model.device, torch.float32))
        if int(image_mask.sum()) != projected.shape[0] * projected.shape[1]:
            raise HeadlabError("image tokens and image features do not match in a training batch")
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(embeds.dtype))
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention, use_cache=False)[0]
        scored = answer[:, 1:]
        logits = self.head(hidden[:, :-1][scored]).float()  # logits only where a token is scored
        if weighting == "token":
            return torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored])
        per_token = torch.nn.functional.cross_entropy(logits, ids[:, 1:][scored], reduction="none")
        counts = scored.sum(dim=1)  # answer tokens per example
        row = scored.nonzero(as_tuple=True)[0]  # the example of each scored token
        weights = 1.0 / counts.clamp(min=1).to(per_token.dtype)[row] / int((counts > 0).sum())
        return (per_token * weights).sum()


def _autocast(model: LoadedModel) -> contextlib.AbstractContextManager[Any]:
    if model.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=model.dtype)


# ============================================================================== training


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
    with native_attention(model, "sdpa"), parts.lora_hooks():
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


# ============================================================================== outputs


def loss_figure(result: TrainResult, title: str = "projector training") -> Any:
    """A plotly figure of the training loss (and the held-out loss) against the step."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[p["step"] for p in result.curve],
            y=[p["loss"] for p in result.curve],
            mode="lines",
            name="training loss",
        )
    )
    if result.eval_curve:
        fig.add_trace(
            go.Scatter(
                x=[p["step"] for p in result.eval_curve],
                y=[p["eval_loss"] for p in result.eval_curve],
                mode="lines+markers",
                name="held-out loss",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="step",
        yaxis_title="cross-entropy (nats; see loss_weighting)",
        yaxis_type="log",
        template="plotly_white",
    )
    return fig


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def save(
    result: TrainResult, path: str | Path, model: LoadedModel, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the projector file, its JSON record and the loss figure; returns their paths.

    ``path`` (``.safetensors``) holds the weights (< 10 MB, checked); ``<stem>.json`` the training
    config, seed, steps, losses and the curve, timings, sizes, versions and the caller's ``meta``
    (data statistics, command, evaluation); ``<stem>.loss.plotly.json`` the figure
    (``plotly.io.read_json``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"the projector file must end in .safetensors, got {path.name}")
    record = {
        "model": model.name,
        "parts": vlm.parts_meta(model),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "train_config": asdict(result.config),
        "seed": result.config.seed,
        **result.summary(),
        "versions": _versions(),
        **dict(meta or {}),
        "loss_curve": result.curve,
        "eval_loss_curve": result.eval_curve,
    }
    file_meta = {
        **vlm.parts_meta(model),
        **_lora_meta(result.config),
        "training": {k: record[k] for k in ("model", "seed", "steps_done", "final_loss", "final_eval_loss")},
    }
    weights = vlm.write_projector(path, vlm.ProjectorFile(result.projector, result.lora, file_meta))
    record["projector_sha256"] = cache.sha256_file(weights)
    record["projector_bytes"] = weights.stat().st_size
    paths = {"weights": weights, "record": path.with_suffix(".json")}
    try:  # a plotting dependency must never cost a trained projector
        figure = path.with_name(f"{path.stem}.loss.plotly.json")
        loss_figure(result, f"{model.name}: projector training").write_json(str(figure))
        paths["figure"] = figure
    except ImportError as err:
        record["figure_error"] = f"loss figure not written ({err}); the curve is in loss_curve"
    paths["record"].write_text(json.dumps(record, indent=2, default=str))
    return paths
