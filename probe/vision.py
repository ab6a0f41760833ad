"""Vision transformers in probe: loading, image preprocessing, capture and head gates with torch hooks.

Background
----------
A vision transformer cuts an image into a grid of patches (14×14 for a 224-pixel image and 16-pixel
patches), embeds each patch as a token, puts one or two *prefix* tokens in front (CLS; DeiT also a
distillation token) and runs bidirectional self-attention over all ``T = prefix + rows × cols``
tokens. TransformerLens cannot wrap a standalone ViT or CLIP image tower, so probe hooks the
transformers modules directly, through :class:`ModuleHooks` (the torch-module twin of
:class:`probe.hooks.HookSet`: it counts every call, removes exactly its own hooks on exit, also after
an error, and can prove that every hook fired).

Architectures are data (:data:`ARCHITECTURES`): for each family, where the blocks are, which module
computes attention (it returns ``(output, weights)``), which module is the output projection
(its input is the heads' outputs concatenated, ``[batch, T, heads × d_head]``) and which is the final
norm. Supported: CLIP image towers (``clip``, ``clip_vision_model``), ViT (``vit``) and DeiT
(``deit``). Attention always runs *eager*: a fused kernel (SDPA, flash) returns no weights, so
:func:`check_eager` refuses to capture from a model that would use one.

What can be read and changed:

* **Patterns** ``[batch, heads, T, T]`` (post-softmax) of chosen heads (:func:`capture`), or only
  per-head statistics computed in the hook by reducers (:mod:`probe.reducers`, plus
  :class:`KeyAttention` and :class:`GridDistance` here, which respect that every query sees every
  key), so that memory stays ``O(heads × T)`` per layer.
* **Head outputs** before the output projection, ``[batch, T, heads, d_head]``: head ``h`` adds
  ``z_h @ W_O[:, h·d:(h+1)·d]ᵀ`` to the residual stream, so gating ``z_h`` is exactly pruning it.
* **Head gates** (:func:`gate_heads`): scale a head's output, zero it or replace it by its mean over
  reference images, optionally only at some query tokens (a region of the patch grid, a band of
  distances from a centre: "partial pruning"). :func:`gate_variables` makes the gates differentiable
  and :func:`gate_importance` returns ``|∂loss/∂gate_h|`` per image (Michel et al.'s head importance):
  one backward pass gives every image its own gradient, because each image has its own gates.
* **Residual stream**: the norm of every token after every block (:func:`residual_norms`), where
  the high-norm "artifact" tokens of large ViTs show up (Darcet et al.), and the final image
  embedding (:func:`embed`: CLIP's projected embedding, else the CLS token after the final norm).

Padding does not exist here: every image has the same ``T`` tokens, and reducers see
``pad_offsets = 0``. Reducers written for causal language models keep their definitions: the
entropy averages over queries from position 1 on (all but CLS); :class:`probe.reducers.ColumnImportance`
divides by ``T - k`` (the causal count) — use :class:`KeyAttention` for images instead.

Usage
-----
::

    import numpy as np, torch
    import probe
    from probe import vision

    model = probe.load_model("clip-vit-b16")                 # kind "vision", bridge None
    pixels = model.preprocess([np.zeros((240, 320, 3), np.uint8)])   # [1, 3, 224, 224]
    cap = vision.capture(model, pixels, patterns=[(5, 3)], head_outputs=[(5, 3)],
                         residual=True)
    cap.patterns[5].shape          # [1, 1, 197, 197]; rows sum to 1
    cap.resid_norms.shape          # [1, 13, 197]: input of block 0, then after each block

    with vision.gate_heads(model, [(5, 3)], query_mask=vision.region_mask(model, rows=range(7))):
        pruned = vision.embed(model, pixels)                 # head 5.3 off in the top half only

    loss = lambda out: out.embedding.norm(dim=-1)            # any per-image loss
    importance = vision.gate_importance(model, pixels, loss).abs().mean(0)   # [layers, heads]
    vision.onnx_agreement(model, pixels)                     # cosine vs the package's INT8 runtime

References
----------
* Dosovitskiy et al. (2021). An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale. ICLR. (Mean attention distance in pixels.)
* Radford et al. (2021). Learning Transferable Visual Models From Natural Language Supervision. ICML.
* Touvron et al. (2021). Training data-efficient image transformers & distillation through attention.
* Michel, Levy & Neubig (2019). Are Sixteen Heads Really Better than One? NeurIPS.
* Darcet, Oquab, Mairal & Bojanowski (2024). Vision Transformers Need Registers. ICLR.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from probe import cache, onnx_clip, zoo
from probe.checkpoints import check_checkpoint_files, force_eager, quiet_transformers, read_config
from probe.checksums import checkpoint_sha256, state_sha256
from probe.errors import CaptureError, ConfigError, HeadlabError
from probe.heads import selection_by_layer
from probe.images import (
    CLIP_IMAGE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageInput,
    ImageSpec,
)
from probe.model import BosPolicy, LoadedModel
from probe.reducers import BatchInfo, PatternReducer, _SumCount
from probe.sources import CATALOGUE, DIRECTORY, TINY, ModelRequest, ModelSource, register
from probe.tiny import TINY_BUILDERS
from probe.types import Head, HeadSelection

GateMode = Literal["scale", "zero", "mean"]
__all__ = [
    "ARCHITECTURES",
    "CLIP_IMAGE",
    "GridDistance",
    "ImageSpec",
    "KeyAttention",
    "ModuleHooks",
    "VisionArch",
    "VisionCapture",
    "VisionOutput",
    "capture",
    "check_eager",
    "converted_onnx_file",
    "distance_band",
    "embed",
    "forward",
    "gate_heads",
    "gate_importance",
    "gate_variables",
    "mean_head_outputs",
    "module_hooks",
    "onnx_agreement",
    "region_mask",
    "residual_norms",
]



def region_mask(
    model: LoadedModel,
    *,
    rows: Iterable[int] | None = None,
    cols: Iterable[int] | None = None,
    include_prefix: bool = False,
) -> torch.Tensor:
    """``[T]`` bool mask of the patches in the given grid rows and columns (default: all).

    Prefix tokens (CLS, distillation) are included only with ``include_prefix``. Use it as
    ``query_mask`` of :func:`gate_heads` to prune a head in one region of the image only.
    """
    spec = _image(model)
    n_rows, n_cols = spec.grid
    row_set = set(range(n_rows)) if rows is None else set(rows)
    col_set = set(range(n_cols)) if cols is None else set(cols)
    bad = [r for r in row_set if not 0 <= r < n_rows] + [c for c in col_set if not 0 <= c < n_cols]
    if bad:
        raise ConfigError(f"rows/cols {sorted(bad)} are outside the {n_rows}×{n_cols} patch grid")
    rc = spec.patch_rc()
    mask = torch.tensor([(int(r) in row_set and int(c) in col_set) for r, c in rc.tolist()])
    mask[: spec.n_prefix] = include_prefix
    return mask


def distance_band(
    model: LoadedModel,
    centre: tuple[float, float] | None = None,
    inner: float = 0.0,
    outer: float = math.inf,
    *,
    include_prefix: bool = False,
) -> torch.Tensor:
    """``[T]`` bool mask of patches whose centre lies at ``inner <= d < outer`` from ``centre``.

    Distances are Euclidean, in patch units, between patch centres; ``centre`` is a (row, col)
    grid coordinate (default: the middle of the grid, ``((rows-1)/2, (cols-1)/2)``).
    """
    spec = _image(model)
    if inner < 0 or outer <= inner:
        raise ConfigError(f"a distance band needs 0 <= inner < outer, got inner={inner}, outer={outer}")
    n_rows, n_cols = spec.grid
    cr, cc = centre if centre is not None else ((n_rows - 1) / 2, (n_cols - 1) / 2)
    rc = spec.patch_rc().float()
    d = torch.sqrt((rc[:, 0] - cr) ** 2 + (rc[:, 1] - cc) ** 2)
    mask = (d >= inner) & (d < outer)
    mask[: spec.n_prefix] = include_prefix
    return mask


# ============================================================================== architectures


@dataclass(frozen=True)
class VisionArch:
    """Where a family keeps its parts; module paths relative to the transformers base model."""

    layers: str  # the ModuleList of blocks
    attention: str  # per block: returns (output, weights)
    out_proj: str  # per block: input [batch, T, heads × d_head]
    final_norm: str  # after the last block (CLIP: applied to the CLS token only)
    prefix_names: tuple[str, ...]
    default_image: Callable[[int, int], ImageSpec]  # (image_size, patch_size) -> preprocessing


def _clip_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(size, patch, 1, CLIP_MEAN, CLIP_STD, shortest_edge=size, crop=(size, size))


def _vit_image(size: int, patch: int) -> ImageSpec:
    return ImageSpec(
        size, patch, 1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_to=(size, size), resample="bilinear"
    )


def _deit_image(size: int, patch: int) -> ImageSpec:
    edge = round(size * 256 / 224)
    return ImageSpec(
        size, patch, 2, IMAGENET_MEAN, IMAGENET_STD, shortest_edge=edge, crop=(size, size),
        prefix_names=("cls", "distillation"),
    )  # fmt: skip


ARCHITECTURES: dict[str, VisionArch] = {
    "clip": VisionArch(
        "encoder.layers", "self_attn", "self_attn.out_proj", "post_layernorm", ("cls",), _clip_image
    ),
    "vit": VisionArch("layers", "attention", "attention.o_proj", "layernorm", ("cls",), _vit_image),
    "deit": VisionArch(
        "layers", "attention", "attention.o_proj", "layernorm", ("cls", "distillation"), _deit_image
    ),
}
"""model family -> module layout. A new ViT-like family is one entry here."""
MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip", "vit": "vit", "deit": "deit"}
"""config.json ``model_type`` -> family."""
_OTHER_VISION_TYPES = {
    "swin", "swinv2", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "siglip",
    "siglip_vision_model", "convnext", "convnextv2", "mobilevit", "levit", "pvt", "vit_mae",
    "vit_msn", "vit_hybrid", "dinat", "efficientformer", "hiera", "ijepa",
}  # fmt: skip


def vision_family(config_json: Mapping[str, Any]) -> str | None:
    """The family of a checkpoint's ``config.json``, None when it is no vision model.

    Raises for vision models probe does not support (so the user is not told that a Swin
    checkpoint is an unknown language model).
    """
    model_type = str(config_json.get("model_type", ""))
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if model_type in _OTHER_VISION_TYPES or ("image_size" in config_json and "patch_size" in config_json):
        raise HeadlabError(
            f"model_type {model_type!r} is a vision model that probe does not hook yet; supported vision "
            f"checkpoints have model_type {', '.join(sorted(MODEL_TYPES))} (add its layout to "
            "probe.vision.ARCHITECTURES)"
        )
    return None


# ============================================================================== loading


def _base(hf_model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(hf_model, "base_model", hf_model)
    return base if isinstance(base, torch.nn.Module) else hf_model


def _module_names(hf_model: torch.nn.Module, family: str) -> dict[str, Any]:
    """Full module names of every part ``ARCHITECTURES[family]`` lists, checked to exist."""
    arch = ARCHITECTURES[family]
    base = _base(hf_model)
    names = {id(m): n for n, m in hf_model.named_modules()}
    try:
        layers = base.get_submodule(arch.layers)
        if not isinstance(layers, torch.nn.ModuleList):
            raise AttributeError(f"{arch.layers} is a {type(layers).__name__}, not a list of blocks")
        attention = [layer.get_submodule(arch.attention) for layer in layers]
        out_proj = [layer.get_submodule(arch.out_proj) for layer in layers]
        final = base.get_submodule(arch.final_norm)
    except AttributeError as err:
        raise HeadlabError(
            f"this {family} checkpoint's modules are not where probe.vision.ARCHITECTURES[{family!r}] says "
            f"({err}); the installed transformers may lay the model out differently"
        ) from None
    return {
        "layers": [names[id(m)] for m in layers],
        "attention": [names[id(m)] for m in attention],
        "out_proj": [names[id(m)] for m in out_proj],
        "final_norm": names[id(final)],
    }


def _attention_config(hf_model: torch.nn.Module) -> Any:
    cfg = hf_model.config
    return getattr(cfg, "vision_config", None) or cfg


def check_eager(model: LoadedModel) -> None:
    """Raise :class:`CaptureError` unless every attention module of ``model`` runs eager attention."""
    wrong = []
    for name in model.extra["modules"]["attention"]:
        module = model.hf_model.get_submodule(name)
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "eager")
        if impl != "eager":
            wrong.append(f"{name} ({impl})")
    if wrong:
        raise CaptureError(
            f"attention of {model.name} would run a fused kernel that returns no weights: {', '.join(wrong[:3])}"
            f"{' …' if len(wrong) > 3 else ''}; load it with probe.load_model (which forces eager attention) "
            "or call probe.vision.force_eager(model.hf_model)"
        )


def wrap_vision(
    name: str, family: str, source: str, hf_model: torch.nn.Module, image: ImageSpec | None = None, *,
    device: torch.device, dtype: torch.dtype, weight_sha256: str, path: str | None,
    caveat: str = "", licence: str = "", extra: Mapping[str, Any] | None = None,
) -> LoadedModel:  # fmt: skip
    """Wrap a transformers ViT/DeiT/CLIP image model: eager attention, frozen weights, geometry."""
    if family not in ARCHITECTURES:
        raise HeadlabError(f"no vision layout for family {family!r}; known: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[family]
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    force_eager(hf_model)
    cfg = _attention_config(hf_model)
    image_size = int(cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    patch_size = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
    image = image or arch.default_image(image_size, patch_size)
    given = (image.image_size, image.patch_size, image.prefix_names)
    if given != (image_size, patch_size, arch.prefix_names):
        raise HeadlabError(
            f"the image spec ({image.image_size} px, patch {image.patch_size}, prefix {image.prefix_names}) "
            f"does not match the model ({image_size} px, patch {patch_size}, prefix {arch.prefix_names})"
        )
    n_heads = int(cfg.num_attention_heads)
    d_model = int(cfg.hidden_size)
    modules = _module_names(hf_model, family)
    info = {
        **dict(extra or {}),
        "modules": modules,
        "grid": list(image.grid),
        "n_patches": image.n_patches,
        "n_tokens": image.n_tokens,
        "n_prefix": image.n_prefix,
        "embedding_dim": _embedding_dim(hf_model, d_model),
    }
    model = LoadedModel(
        name=name, kind="vision", family=family, source=source, n_layers=len(modules["layers"]),
        n_heads=n_heads, n_kv_heads=n_heads, d_head=int(getattr(cfg, "head_dim", None) or d_model // n_heads),
        d_model=d_model, n_ctx=image.n_tokens, tokenizer=None,
        bos=BosPolicy(mode="never", prepend=False, token_id=None, token=None), device=device, dtype=dtype,
        hf_model=hf_model, bridge=None, native_model=None, weight_sha256=weight_sha256, path=path,
        caveat=caveat, licence=licence, extra=info, image=image,
    )  # fmt: skip
    check_eager(model)
    return model


def _embedding_dim(hf_model: torch.nn.Module, d_model: int) -> int:
    projection = getattr(hf_model, "visual_projection", None)
    return int(projection.out_features) if isinstance(projection, torch.nn.Linear) else d_model


def load_checkpoint(directory: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, str, ImageSpec]:
    """Load a ViT / DeiT / CLIP(-vision) checkpoint directory: (model, family, image spec).

    A full CLIP checkpoint (``model_type: clip``) gives its image tower with projection. Every
    weight of the loaded model must come from the checkpoint (the pooler of a plain ViT, which
    probe never uses, excepted); the text tower of a full CLIP checkpoint is ignored.
    """
    from safetensors import SafetensorError

    config = read_config(directory)
    family = vision_family(config)
    if family is None:
        raise HeadlabError(f"{directory} holds a {config['model_type']!r} model, not a vision model")
    check_checkpoint_files(directory)
    architectures = [str(a) for a in config.get("architectures") or []]
    import transformers

    if family == "clip":
        with_projection = config["model_type"] == "clip" or any("WithProjection" in a for a in architectures)
        cls: Any = (
            transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
        )
    elif (
        architectures
        and "ImageClassification" in architectures[0]
        and hasattr(transformers, architectures[0])
    ):
        cls = getattr(transformers, architectures[0])  # the exact head (DeiT: ...WithTeacher too)
    else:
        cls = transformers.AutoModel
    kwargs: dict[str, Any] = {}
    if config["model_type"] == "clip" and "projection_dim" in config:
        # The projection's width is the full model's projection_dim; its vision_config may not say it.
        vision_config = transformers.CLIPVisionConfig.from_pretrained(str(directory))
        vision_config.projection_dim = int(config["projection_dim"])
        kwargs["config"] = vision_config
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                str(directory), dtype=dtype, attn_implementation="eager", output_loading_info=True, **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise HeadlabError(
            f"could not load the {family} checkpoint in {directory}: {str(err).splitlines()[0]}; "
            "it needs config.json and model.safetensors (or pytorch_model.bin) written by save_pretrained"
        ) from None
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k.split(".")]
    if missing:
        raise HeadlabError(
            f"the checkpoint in {directory} lacks weights of {type(model).__name__}: {sorted(missing)[:4]}; "
            "they would be random. Re-save the full model with save_pretrained"
        )
    cfg = _attention_config(model)
    image_size = int(cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
    patch_size = int(cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
    arch = ARCHITECTURES[family]
    processor = directory / "preprocessor_config.json"
    if processor.is_file():
        try:
            image = ImageSpec.from_processor_config(
                json.loads(processor.read_text()), image_size=image_size, patch_size=patch_size,
                prefix_names=arch.prefix_names,
            )  # fmt: skip
        except json.JSONDecodeError as err:
            raise HeadlabError(f"{processor} is not valid JSON ({err}); fix or delete it") from None
    else:
        image = arch.default_image(image_size, patch_size)
    return model, family, image


# ============================================================================== hooks


class ModuleHooks:
    """Forward hooks and pre-hooks added to a model's torch modules by name; removed by :meth:`remove`.

    The torch-module counterpart of :class:`probe.hooks.HookSet`: counts how often each hook fired,
    and removes exactly the hooks it added (other hooks on the same modules stay).
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.added: list[str] = []
        self.fired: Counter[str] = Counter()

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.hf_model.get_submodule(name)
        except AttributeError:
            raise CaptureError(f"module {name!r} does not exist in {self.model.name}") from None

    def forward(self, name: str, fn: Callable[[torch.nn.Module, tuple[Any, ...], Any], Any]) -> None:
        """Call ``fn(module, args, output)`` after ``name`` runs; a returned value replaces the output."""
        key = f"{name}:forward"

        def counted(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            self.fired[key] += 1
            return fn(module, args, output)

        self._handles.append(self._module(name).register_forward_hook(counted))
        self.added.append(key)

    def pre(self, name: str, fn: Callable[[torch.nn.Module, tuple[Any, ...]], Any]) -> None:
        """Call ``fn(module, args)`` before ``name`` runs; a returned tuple replaces the positional args."""
        key = f"{name}:pre"

        def counted(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
            self.fired[key] += 1
            return fn(module, args)

        self._handles.append(self._module(name).register_forward_pre_hook(counted))
        self.added.append(key)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def check_fired(self, times: int = 1) -> None:
        """Raise if a hook fired fewer than ``times`` times (each forward pass fires each hook once)."""
        silent = [k for k in dict.fromkeys(self.added) if self.fired[k] < times]
        if silent:
            raise CaptureError(
                f"hooks that did not fire {times} time(s): {', '.join(silent[:4])}{' …' if len(silent) > 4 else ''}; "
                "the model did not run these modules (wrong module layout, or a different forward path)"
            )


@contextmanager
def module_hooks(model: LoadedModel) -> Iterator[ModuleHooks]:
    """Context manager: yields a :class:`ModuleHooks`; every hook added in the block goes on exit."""
    _require_vision(model)
    hooks = ModuleHooks(model)
    try:
        yield hooks
    finally:
        hooks.remove()


# ============================================================================== checks


def _require_vision(model: LoadedModel) -> None:
    if model.kind != "vision" or "modules" not in model.extra:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; probe.vision works on vision models loaded with "
            "probe.load_model (e.g. clip-vit-b16, tiny-vit or a ViT/DeiT/CLIP checkpoint directory)"
        )


def _image(model: LoadedModel) -> ImageSpec:
    _require_vision(model)
    assert model.image is not None
    return model.image



def _pixels(model: LoadedModel, images: ImageInput) -> torch.Tensor:
    pixels = _image(model).preprocess(images)
    return pixels.to(device=model.device, dtype=model.dtype)


def _query_mask(
    mask: torch.Tensor | None, batch: int, n_tokens: int, device: torch.device
) -> torch.Tensor | None:
    """``mask`` as bool ``[batch, T, 1, 1]`` (broadcast over heads and d_head); None = every query."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != n_tokens:
        raise ConfigError(
            f"query_mask must be a bool tensor [T] or [batch, T] with T = {n_tokens}, got {mask.dtype} "
            f"{tuple(mask.shape)}; build one with probe.vision.region_mask or distance_band"
        )
    if mask.dim() == 2 and mask.shape[0] not in (1, batch):
        raise ConfigError(f"query_mask has {mask.shape[0]} rows but the batch has {batch} images")
    return mask.to(device).reshape(-1, n_tokens)[:, :, None, None]


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)


def _first_arg(args: tuple[Any, ...], where: str) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise CaptureError(
            f"{where} was called without a positional tensor; this transformers version differs"
        )
    return args[0]


# ============================================================================== forward


@dataclass
class VisionOutput:
    """What a vision forward pass returns: the image embedding and, for classifiers, the logits."""

    embedding: torch.Tensor  # [N, d_embed]: CLIP's projected embedding, else the final-norm CLS token
    logits: torch.Tensor | None  # [N, n_labels] for classification checkpoints


def _run(model: LoadedModel, pixels: torch.Tensor, hooks: ModuleHooks) -> VisionOutput:
    """One forward pass; reads the final norm's output with a hook (added to ``hooks``)."""
    seen: dict[str, torch.Tensor] = {}

    def final(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["norm"] = output

    hooks.forward(model.extra["modules"]["final_norm"], final)
    out = model.hf_model(pixel_values=pixels)
    embedding = getattr(out, "image_embeds", None)
    if embedding is None:
        norm = seen.get("norm")
        if norm is None:
            raise CaptureError(f"the final norm of {model.name} did not run; cannot read the embedding")
        embedding = norm if norm.dim() == 2 else norm[:, 0]
    return VisionOutput(embedding=embedding, logits=getattr(out, "logits", None))


def forward(model: LoadedModel, images: ImageInput) -> VisionOutput:
    """Run ``model`` on images (or pixel values); gradients flow if enabled by the caller.

    Interventions active around the call (:func:`gate_heads`, :func:`gate_variables`) apply.
    """
    pixels = _pixels(model, images)
    with module_hooks(model) as hooks:
        out = _run(model, pixels, hooks)
        hooks.check_fired()
    return out


@torch.no_grad()
def embed(model: LoadedModel, images: ImageInput, *, batch_size: int = 16) -> torch.Tensor:
    """Image embeddings ``[N, d_embed]`` (float32, CPU), in batches of ``batch_size``."""
    pixels = _pixels(model, images)
    chunks = [
        forward(model, pixels[i : i + batch_size]).embedding.float().cpu()
        for i in _starts(pixels, batch_size)
    ]
    return torch.cat(chunks)


def _starts(pixels: torch.Tensor, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, pixels.shape[0], batch_size)


# ============================================================================== capture


@dataclass
class VisionCapture:
    """What :func:`capture` read. Tensors are float32 on the CPU, one row per image."""

    embedding: torch.Tensor  # [N, d_embed]
    logits: torch.Tensor | None  # [N, n_labels] or None
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, k, T, T]
    pattern_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> the k heads, in order
    head_outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, T, k, d_head]
    output_heads: dict[int, list[int]] = field(default_factory=dict)
    resid_norms: torch.Tensor | None = None  # [N, n_layers + 1, T]: block 0's input, then each block's output

    def pattern(self, layer: int, head: int) -> torch.Tensor:
        """``[N, T, T]`` pattern of one captured head."""
        if layer not in self.patterns or head not in self.pattern_heads[layer]:
            raise ConfigError(f"head ({layer}, {head}) was not captured; pass it in patterns=")
        return self.patterns[layer][:, self.pattern_heads[layer].index(head)]

    def head_output(self, layer: int, head: int) -> torch.Tensor:
        """``[N, T, d_head]`` output (before the output projection) of one captured head."""
        if layer not in self.head_outputs or head not in self.output_heads[layer]:
            raise ConfigError(f"head ({layer}, {head}) was not captured; pass it in head_outputs=")
        return self.head_outputs[layer][:, :, self.output_heads[layer].index(head)]


def capture(
    model: LoadedModel,
    images: ImageInput,
    *,
    patterns: HeadSelection | None = None,
    head_outputs: HeadSelection | None = None,
    reducers: Sequence[PatternReducer] = (),
    residual: bool = False,
    batch_size: int = 16,
) -> VisionCapture:
    """Run ``model`` over images and read what is asked, with hooks that are gone afterwards.

    ``patterns`` / ``head_outputs``: ``(layer, head)`` pairs or ``"all"``; only those heads are kept
    (full ``[T, T]`` patterns cost ``4·T²`` bytes per head and image: 155 kB for ViT-B/16).
    ``reducers`` see every layer's post-softmax rows ``[batch, heads, T, T]`` in the hook and keep
    only their accumulators. ``residual`` records token norms of the residual stream. Raises
    :class:`CaptureError` if attention is not eager, returns no weights, or a hook did not fire.
    Interventions active around the call apply (a capture inside :func:`gate_heads` sees the
    gated model).
    """
    spec = _image(model)
    check_eager(model)
    pixels = _pixels(model, images)
    want_patterns = selection_by_layer(model, patterns)
    want_outputs = selection_by_layer(model, head_outputs)
    names = model.extra["modules"]
    pattern_layers = sorted(set(want_patterns) | (set(range(model.n_layers)) if reducers else set()))
    store_p: dict[int, list[torch.Tensor]] = {layer: [] for layer in want_patterns}
    store_z: dict[int, list[torch.Tensor]] = {layer: [] for layer in want_outputs}
    norms: list[list[torch.Tensor]] = []
    embeddings: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []

    def pattern_hook(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise CaptureError(
                    f"layer {layer} of {model.name} returned no attention weights: a fused kernel ran. "
                    "Load the model with probe.load_model, which forces eager attention"
                )
            rows = weights.detach().float()
            if layer in store_p:
                store_p[layer].append(rows[:, want_patterns[layer]].cpu())
            for reducer in reducers:
                reducer.update(layer, rows, 0)

        return hook

    def output_hook(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = _split_heads(_first_arg(args, names["out_proj"][layer]), model.n_heads)
            store_z[layer].append(z[:, :, want_outputs[layer]].detach().float().cpu())

        return hook

    def resid_in(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        norms.append([_first_arg(args, names["layers"][0]).detach().float().norm(dim=-1).cpu()])

    def resid_out(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        norms[-1].append(hidden.detach().float().norm(dim=-1).cpu())

    starts = _starts(pixels, batch_size)
    with torch.no_grad(), module_hooks(model) as hooks:
        for layer in pattern_layers:
            hooks.forward(names["attention"][layer], pattern_hook(layer))
        for layer in want_outputs:
            hooks.pre(names["out_proj"][layer], output_hook(layer))
        if residual:
            hooks.pre(names["layers"][0], resid_in)
            for layer_name in names["layers"]:
                hooks.forward(layer_name, resid_out)
        for start in starts:
            chunk = pixels[start : start + batch_size]
            info = BatchInfo(
                lengths=torch.full((chunk.shape[0],), spec.n_tokens, dtype=torch.long, device=model.device),
                pad_offsets=torch.zeros(chunk.shape[0], dtype=torch.long, device=model.device),
                T=spec.n_tokens, n_layers=model.n_layers, n_heads=model.n_heads,
            )  # fmt: skip
            for reducer in reducers:
                reducer.begin_batch(info)
            out = _run(model, chunk, hooks)
            for reducer in reducers:
                reducer.end_batch()
            embeddings.append(out.embedding.float().cpu())
            if out.logits is not None:
                logits.append(out.logits.float().cpu())
        hooks.check_fired(times=len(starts))
    return VisionCapture(
        embedding=torch.cat(embeddings),
        logits=torch.cat(logits) if logits else None,
        patterns={layer: torch.cat(v) for layer, v in store_p.items()},
        pattern_heads=want_patterns,
        head_outputs={layer: torch.cat(v) for layer, v in store_z.items()},
        output_heads=want_outputs,
        resid_norms=torch.cat([torch.stack(n, dim=1) for n in norms]) if residual else None,
    )


def residual_norms(model: LoadedModel, images: ImageInput, *, batch_size: int = 16) -> torch.Tensor:
    """``[N, n_layers + 1, T]`` L2 norm of every token of the residual stream.

    Index 0 is the input of the first block (for CLIP: after its pre-norm), index ``l + 1`` the
    output of block ``l``. Tokens whose norm stands far above the median (the "artifact" or
    "register" tokens) show up in the middle and late layers of large ViTs.
    """
    out = capture(model, images, residual=True, batch_size=batch_size).resid_norms
    assert out is not None
    return out


# ============================================================================== reducers for images


class KeyAttention(PatternReducer):
    """Mean attention each key receives, averaged over all queries: ``[n_images, L, H, T]``.

    Attention in a ViT is bidirectional, so every query sees every key and the mean is over all
    ``T`` queries (:class:`probe.reducers.ColumnImportance` divides by the causal ``T - k`` and
    does not apply). A token that soaks up attention (CLS, an artifact token) has a large value.
    """

    name = "key_attention"

    def _start(self, info: BatchInfo) -> None:
        self.colsum = torch.zeros(
            info.n_layers, info.batch_size, info.n_heads, info.T, device=info.lengths.device
        )
        self.queries = torch.zeros(info.n_layers, device=info.lengths.device)

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        self.colsum[layer] += rows.float().sum(dim=2)
        self.queries[layer] += rows.shape[2]

    def _finish(self, info: BatchInfo) -> torch.Tensor:
        mean = self.colsum / self.queries.clamp_min(1)[:, None, None, None]
        mean[self.queries == 0] = float("nan")
        return mean.permute(1, 0, 2, 3)

    def state_bytes(self, batch: int, T: int, n_layers: int, n_heads: int) -> int:
        return 4 * n_layers * batch * n_heads * T


class GridDistance(_SumCount):
    """Mean attention distance in pixels (Dosovitskiy et al.): ``[n_images, L, H]``.

    For each patch query, ``Σ_k A[q,k]·‖p_q − p_k‖ / Σ_k A[q,k]`` over patch keys ``k`` (prefix
    keys left out and the row renormalised over patches), with ``p`` the patch centres in pixels;
    averaged over patch queries. Small = local head, large = global head.
    """

    name = "grid_distance"

    def __init__(self, image: ImageSpec) -> None:
        super().__init__()
        self.image = image
        rc = image.patch_rc()[image.n_prefix :].float() * image.patch_size
        self.distances = torch.cdist(rc, rc)  # [P, P] pixels

    def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
        assert self.info is not None
        p = self.image.n_prefix
        if q_start != 0 or rows.shape[2] != self.image.n_tokens:
            raise CaptureError("GridDistance needs every query row of a layer at once")
        patch = rows[:, :, p:, p:].float()  # [b, h, P, P]
        dist = self.distances.to(patch.device)
        per_query = (patch * dist).sum(-1) / patch.sum(-1).clamp_min(1e-12)  # [b, h, P]
        mask = torch.ones(rows.shape[0], per_query.shape[-1], device=rows.device)
        self._add(layer, per_query, mask)


# ============================================================================== gates


def _check_means(
    model: LoadedModel, grouped: Mapping[int, list[int]], means: Mapping[int, torch.Tensor] | None
) -> None:
    if means is None:
        raise ConfigError(
            "mode='mean' needs means={layer: tensor}; compute them with probe.vision.mean_head_outputs"
        )
    for layer in grouped:
        m = means.get(layer)
        shapes = ((model.n_heads, model.d_head), (model.n_ctx, model.n_heads, model.d_head))
        if not isinstance(m, torch.Tensor) or tuple(m.shape) not in shapes:
            raise ConfigError(
                f"means[{layer}] must be a tensor [heads, d_head] or [T, heads, d_head] "
                f"({shapes[0]} or {shapes[1]}), got {None if m is None else tuple(m.shape)}; "
                "see probe.vision.mean_head_outputs"
            )


def gate_heads(
    model: LoadedModel,
    heads: Mapping[Head, float] | Iterable[Head],
    *,
    mode: GateMode | None = None,
    means: Mapping[int, torch.Tensor] | None = None,
    query_mask: torch.Tensor | None = None,
) -> contextlib.AbstractContextManager[ModuleHooks]:
    """Context manager: scale, zero or mean-replace chosen heads' outputs while the block runs.

    ``heads`` is ``{(layer, head): factor}`` (mode ``"scale"``, the default for a mapping) or a
    list of heads (mode ``"zero"``, the default, or ``"mean"`` with ``means`` from
    :func:`mean_head_outputs`). The edit acts on the head's output ``z_h`` before the output
    projection, so zeroing removes exactly the head's term ``z_h W_O,hᵀ`` from the residual stream
    (the output projection's bias stays). ``query_mask`` (bool ``[T]`` or ``[batch, T]``, see
    :func:`region_mask`, :func:`distance_band`) limits the edit to those query tokens. The model is
    unchanged after the block, also after an error.
    """
    _require_vision(model)
    if isinstance(heads, Mapping):
        mode = mode or "scale"
        if mode != "scale":
            raise ConfigError(
                f"a {{head: factor}} mapping means mode='scale'; for mode={mode!r} pass a list of heads"
            )
        factors: dict[Head, float] = {}
        for head, value in heads.items():
            try:
                factor = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"the factor of head {head} must be a number, got {value!r}") from None
            if not math.isfinite(factor):
                raise ConfigError(f"the factor of head {head} must be finite, got {factor}")
            factors[head] = factor
        grouped = selection_by_layer(model, factors)
    else:
        mode = mode or "zero"
        if mode not in ("zero", "mean"):
            raise ConfigError(f"mode must be 'scale', 'zero' or 'mean', got {mode!r}")
        factors = {}
        grouped = selection_by_layer(model, heads)
    if mode == "mean":
        _check_means(model, grouped, means)
    names = model.extra["modules"]["out_proj"]
    n_heads, n_tokens = model.n_heads, model.n_ctx

    def make(layer: int, indices: list[int]) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = _first_arg(args, names[layer])
            z = _split_heads(x, n_heads)
            where = _query_mask(query_mask, z.shape[0], n_tokens, z.device)
            if mode == "scale":
                f = torch.ones(n_heads, dtype=z.dtype, device=z.device)
                for index in indices:
                    f[index] = factors[(layer, index)]
                new = z * f[:, None]
            elif mode == "zero":
                keep = torch.ones(n_heads, dtype=z.dtype, device=z.device)
                keep[indices] = 0
                new = z * keep[:, None]
            else:
                assert means is not None
                m = means[layer].to(device=z.device, dtype=z.dtype)
                chosen = torch.zeros(n_heads, dtype=torch.bool, device=z.device)
                chosen[indices] = True
                new = torch.where(chosen[:, None], m.expand_as(z), z)
            if where is not None:
                new = torch.where(where, new, z)
            return (new.reshape(x.shape), *args[1:])

        return hook

    @contextmanager
    def manager() -> Iterator[ModuleHooks]:
        with module_hooks(model) as hooks:
            for layer, indices in grouped.items():
                hooks.pre(names[layer], make(layer, indices))
            yield hooks

    return manager()


@contextmanager
def gate_variables(
    model: LoadedModel,
    *,
    batch: int | None = None,
    query_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield differentiable gates, all 1: ``[n_layers, n_heads]``, or ``[batch, n_layers, n_heads]``.

    While the block runs, every head's output is multiplied by its gate (only at ``query_mask``
    tokens if given), so ``loss.backward()`` leaves ``∂loss/∂gate`` in ``gates.grad``. With
    ``batch`` each image has its own gates, so one backward pass of a summed per-image loss gives
    per-image gradients. Gates can also be set (``gates.data[l, h] = 0``) to prune by hand.
    """
    _require_vision(model)
    shape = (model.n_layers, model.n_heads) if batch is None else (batch, model.n_layers, model.n_heads)
    gates = torch.ones(shape, device=model.device, dtype=torch.float32, requires_grad=True)
    names = model.extra["modules"]["out_proj"]

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = _split_heads(_first_arg(args, names[layer]), model.n_heads)
            if batch is None:
                g = gates[layer][None, None, :, None]
            else:
                if x.shape[0] != batch:
                    raise ConfigError(
                        f"gates were made for batch={batch} but the forward has {x.shape[0]} images"
                    )
                g = gates[:, layer][:, None, :, None]
            g = g.to(x.dtype)
            where = _query_mask(query_mask, x.shape[0], model.n_ctx, x.device)
            new = x * g if where is None else torch.where(where, x * g, x)
            return (new.reshape(*x.shape[:-2], -1), *args[1:])

        return hook

    with module_hooks(model) as hooks:
        for layer in range(model.n_layers):
            hooks.pre(names[layer], make(layer))
        yield gates


def gate_importance(
    model: LoadedModel,
    images: ImageInput,
    loss_fn: Callable[[VisionOutput], torch.Tensor],
    *,
    batch_size: int = 8,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image gradients ``∂loss/∂gate`` at gates = 1: ``[N, n_layers, n_heads]`` (float32, CPU).

    ``loss_fn`` maps the model's :class:`VisionOutput` to one loss per image ``[N]`` (e.g. the
    negative log-probability of the label, or the embedding's cosine to a target). Michel et al.'s
    importance of head ``h`` is ``result.abs().mean(0)``: the first-order change of the loss when
    the head is removed.
    """
    pixels = _pixels(model, images)
    grads = []
    for start in _starts(pixels, batch_size):
        chunk = pixels[start : start + batch_size]
        with torch.enable_grad(), gate_variables(model, batch=chunk.shape[0], query_mask=query_mask) as gates:
            losses = loss_fn(forward(model, chunk))
            if losses.dim() != 1 or losses.shape[0] != chunk.shape[0]:
                raise ConfigError(
                    f"loss_fn must return one loss per image, shape [{chunk.shape[0]}], got {tuple(losses.shape)}"
                )
            (grad,) = torch.autograd.grad(losses.sum(), gates)
        grads.append(grad.detach().float().cpu())
    return torch.cat(grads)


@torch.no_grad()
def mean_head_outputs(
    model: LoadedModel, images: ImageInput, *, per_token: bool = True, batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """Mean head outputs over reference images: ``{layer: [T, heads, d_head]}`` (or ``[heads, d_head]``).

    The reference for mean-ablation (:func:`gate_heads` with ``mode="mean"``): replacing a head's
    output by its mean keeps the average signal it sends and removes what depends on the image.
    ``per_token`` keeps one mean per token position (CLS and each patch differ); otherwise one
    mean over all tokens. Accumulated in the hook, so memory does not grow with the image count.
    """
    pixels = _pixels(model, images)
    names = model.extra["modules"]["out_proj"]
    sums = {
        layer: torch.zeros(model.n_ctx, model.n_heads, model.d_head, dtype=torch.float64, device=model.device)
        for layer in range(model.n_layers)
    }

    def make(layer: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = _split_heads(_first_arg(args, names[layer]), model.n_heads)
            sums[layer] += z.double().sum(0)

        return hook

    starts = _starts(pixels, batch_size)
    with module_hooks(model) as hooks:
        for layer in range(model.n_layers):
            hooks.pre(names[layer], make(layer))
        for start in starts:
            _run(model, pixels[start : start + batch_size], hooks)
        hooks.check_fired(times=len(starts))
    n = pixels.shape[0]
    means = {layer: (s / n).to(model.dtype) for layer, s in sums.items()}
    if not per_token:
        means = {layer: m.mean(0) for layer, m in means.items()}
    return means


# ============================================================================== fidelity


def converted_onnx_file(model: LoadedModel) -> Path:
    """The ONNX graph ``model`` was converted from, re-checked against the sha256 recorded at conversion."""
    source = model.extra.get("onnx_file")
    if not source:
        raise ConfigError(
            f"{model.name} was not converted from an ONNX graph; pass onnx_file= (a CLIP image tower "
            "exported to ONNX with an image_embeds output)"
        )
    onnx_file = Path(source)
    expected = model.extra.get("onnx_sha256")
    if expected and cache.sha256_file(onnx_file) != expected:
        raise HeadlabError(
            f"{onnx_file} has changed since {model.name} was converted; reconvert with: "
            f"headlab fetch {model.name} --force"
        )
    return onnx_file


def onnx_agreement(
    model: LoadedModel,
    images: ImageInput,
    *,
    onnx_file: str | Path | None = None,
    reference: str = "int8",
) -> torch.Tensor:
    """Cosine per image ``[N]`` between ``model``'s embedding and the ONNX graph's (INT8 or float).

    Both get the same preprocessed pixel values. ``onnx_file`` defaults to the graph the model was
    converted from (clip-vit-b16: the package's ``clip_encoder.int8.onnx``, re-checked against the
    sha256 recorded at conversion).

    ``reference="int8"`` (default) compares with the package's own runtime. Expect about 0.94–0.99:
    that runtime also quantises every activation to 8 bits, the converted model only has
    dequantised weights. ``reference="float"`` compares with the same graph with the activation
    quantisation taken out (:func:`probe.onnx_clip.float_activation_graph`: same weights, float32
    activations), which checks the conversion alone; expect 1 - cosine below 1e-10.
    """
    _require_vision(model)
    if onnx_file is None:
        onnx_file = converted_onnx_file(model)
    pixels = _pixels(model, images)
    theirs = torch.from_numpy(onnx_clip.run_onnx(Path(onnx_file), pixels, reference=reference))
    ours = embed(model, pixels)
    if ours.shape != theirs.shape:
        raise HeadlabError(
            f"embedding shapes differ: {model.name} gives {tuple(ours.shape)}, the ONNX graph {tuple(theirs.shape)}"
        )
    return torch.nn.functional.cosine_similarity(ours.double(), theirs.double(), dim=-1).float()


# ============================================================================== model sources


def convert_onnx_clip_vision(onnx_file: Path, out: Path) -> None:
    """INT8 ONNX CLIP image tower -> a float32 ``CLIPVisionModelWithProjection`` checkpoint.

    Dequantises every weight and checks that the mapping fills the model exactly
    (:mod:`probe.onnx_clip`); also writes CLIP's ``preprocessor_config.json`` so the directory
    says how its images are prepared.
    """
    onnx_clip.convert(onnx_file, out)
    (out / "preprocessor_config.json").write_text(json.dumps(CLIP_IMAGE.to_processor_config(), indent=2))


zoo.register_converter("onnx-clip-vision", convert_onnx_clip_vision)


def load_embedded(
    spec: zoo.ModelSpec, directory: Path, marker: dict[str, Any], *, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Wrap a catalogue vision model from its converted (and checked) cache directory."""
    hf_model, family, image = load_checkpoint(directory, dtype)
    source = spec.weight_parts[0].locate() if len(spec.weight_parts) == 1 else None
    companions = {
        name: {"path": str(directory / name), "description": text}
        for name, text in (marker.get("companions") or {}).items()
        if (directory / name).is_file()
    }
    return wrap_vision(
        spec.name,
        family,
        "embedded",
        hf_model,
        image,
        device=device,
        dtype=dtype,
        weight_sha256=str(marker.get("source_sha256")),
        path=str(directory),
        caveat=spec.caveat,
        licence=spec.licence,
        extra={
            "onnx_file": str(source) if source is not None and source.suffix == ".onnx" else None,
            "onnx_sha256": spec.weight_sha256,
            "companions": companions,
        },
    )


def _is_tiny(request: ModelRequest) -> bool:
    builder = TINY_BUILDERS.get(request.name)
    return builder is not None and builder.kind == "vision"


def _load_tiny(request: ModelRequest) -> LoadedModel:
    builder = TINY_BUILDERS[request.name]
    model, _ = builder.build(request.seed, request.tiny_words)
    return wrap_vision(
        request.name,
        builder.family,
        "tiny",
        model,
        device=request.device,
        dtype=request.dtype,
        weight_sha256=state_sha256(model),
        path=None,
        licence="n/a (random weights)",
    )


def _in_catalogue(request: ModelRequest) -> bool:
    return request.name in zoo.CATALOGUE and zoo.CATALOGUE[request.name].kind == "vision"


def _load_catalogue(request: ModelRequest) -> LoadedModel:
    spec = zoo.CATALOGUE[request.name]
    # every file checked against the marker before it is read; so is the marker's source_sha256
    directory, marker = zoo.verified_cache(spec, fetch_if_missing=request.fetch_if_missing)
    return load_embedded(spec, directory, marker, device=request.device, dtype=request.dtype)


def _is_vision_dir(request: ModelRequest) -> bool:
    return request.path.is_dir() and vision_family(request.config) is not None


def _load_dir(request: ModelRequest) -> LoadedModel:
    path = request.path
    hf_model, family, image = load_checkpoint(path, request.dtype)
    return wrap_vision(
        path.name,
        family,
        "local",
        hf_model,
        image,
        device=request.device,
        dtype=request.dtype,
        weight_sha256=checkpoint_sha256(path),
        path=str(path),
    )


register(ModelSource("tiny-vision", TINY + 10, "a tiny random vision model built in memory", _is_tiny, _load_tiny))
register(
    ModelSource(
        "catalogue-vision",
        CATALOGUE + 10,
        "an embedded vision model of the catalogue, converted once into the cache",
        _in_catalogue,
        _load_catalogue,
    )
)
register(
    ModelSource(
        "vision-directory",
        DIRECTORY + 20,
        "a local ViT, DeiT or CLIP checkpoint directory",
        _is_vision_dir,
        _load_dir,
    )
)
