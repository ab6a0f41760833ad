"""Vision-aware head divergence (VHD), token VHD (T-VHD) and head reinforcement (VHR) on a LLaVA.

Background
----------
He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (ACL 2025)
ask which attention heads of a vision-language model's language model actually
use the image. For head ``(l, h)`` at a generation step, **VHD** is the Euclidean distance between
the head's output before the output projection (``o_proj``'s input slice, TransformerLens'
``hook_z``) when the model sees the image and when the image tokens are removed from the prompt
(the same prompt text and the same tokens generated so far). A head whose output barely changes
without the image is answering from the language context alone. **T-VHD** of a generated token is
the sum over layers of the ``top_k`` largest VHD of that layer at the step that produced it; the
paper reports lower T-VHD for hallucinated object words than for correct ones. **VHR** reinforces
the vision-aware heads: at the first generation step, layer by layer over ``layers``, heads whose
VHD *and* text-only output norm are both above their layer's mean + std are outliers (their VHD is
set to 0), the heads whose VHD is above the layer median are selected and their outputs scaled by
``alpha`` (2 in the paper); the selection of a layer sees the reinforcement of the layers before
it, and the same heads stay reinforced for every later step.

How it is computed here
-----------------------
* **Prompts.** The paper's caption prompt (``PAPER_PROMPT``, "Please help me describe the image in
  detail.") through the model's chat template; its text-only twin is the same template without the
  image placeholder (:func:`probe.vlm.format_prompt`). ``scene-llava`` was trained on four other
  caption prompts (``scene_captions.CAPTION_PROMPTS``) and answers this one with the same kind of
  caption (``prompt=scene_captions.CAPTION_PROMPT`` gives the testbed's own benchmark prompt).
  Decoding is greedy, as the paper's CHAIR evaluation.
* **Own forward.** Every pass that reads or edits heads runs the language model on input
  embeddings built here (token embeddings with the projected image features written over the image
  tokens: LLaVA's own computation, checked against the native forward in the tests), left-padded with
  position ids from the attention mask (as ``generate`` does). Image and text-only rows share one
  batch, so a pre-hook on each layer's ``o_proj`` sees both and can compare them there.
* **VHD at every step** (:func:`step_vhd`): the caption generated with the image is fed back
  (teacher forcing) after both prompts; the outputs at the positions that produced each token are
  compared in the hook. This equals running the two models token by token (causal attention) and
  costs one forward of ``2 × batch`` rows; the tests check that the teacher-forced argmax reproduces
  the generated caption.
* **VHR in one pass** (:func:`select_heads`): because layer ``l``'s outputs depend only on layers
  below it, the layer-by-layer selection is exact in a single forward of the image and text-only
  rows: the hook of layer ``l`` computes the first-step VHD from the (already reinforced) lower
  layers, decides, and scales the selected heads of both rows before ``o_proj`` so that the layers
  above see the reinforced model. Scaling applies at every position (prefill and decoding); the
  selection is per input (per image and prompt) and kept for the whole answer.
* **Outlier rule**: mean and std (population, ``ddof=0``) over the layer's heads; the median is the
  usual one (mean of the two middle values for an even count). ``outlier_removal=False`` is the
  paper's ablation.
* **Layers**: ``"paper"`` is layer 1 plus the last 14 (the paper's choice for the 32 layers of
  LLaVA-1.5-7B, kept literally: on the 30 layers of SmolLM2-135M it is 1 and 16–29); ``"all"``,
  ``"last:N"``, ``"first:N"`` or a comma list ``"1,5,9"``.

The testbed
-----------
``scene-llava`` (:mod:`probe.vlm`) describes clean synthetic scenes almost perfectly, so the default
evaluation adds Gaussian pixel noise (``noise``, on the 0–255 scale) to the held-out ``conflict``
scenes (a pair's first class present, its usual partner absent): with the image less certain, the
caption prior planted in training (:mod:`analyses.tasks.scene_captions`) names the absent partner.
Distorting the image to bring out language priors follows Leng et al. (2024, visual contrastive
decoding). CHAIR and POPE are exact (closed vocabulary, exact labels).

Outputs (an :class:`~analyses.base.AnalysisResult`)
----------------------------------------------------
* ``heads``: per (layer, head): ``vhd_mean`` (over steps and scenes), ``vhd_first`` (first step),
  ``text_norm_first``, ``selected_share`` / ``outlier_share`` (share of inputs for which the main VHR
  setting selected the head / set it aside), ``in_vhr_layers``.
* ``captions``: one row per (setting, scene): CHAIR's columns (:func:`scene_captions.chair_table`)
  plus ``setting``.
* ``tokens``: the baseline captions token by token: ``scene, step, token, t_vhd, word, shape,
  object`` (the first token of an object word), ``hallucinated``.
* ``words``: the object words with their T-VHD and label; ``tvhd_test``: hallucinated vs correct
  words (counts, means, medians, Mann–Whitney U, two-sided p, AUROC of T-VHD for "correct").
* ``pope``: one row per (setting, probe) (:func:`scene_captions.pope_table` plus ``setting``).
* ``summary``: CHAIR_S, CHAIR_I, recall, words and POPE accuracy/precision/recall/F1/yes-ratio per
  setting with percentile bootstrap intervals; ``deltas``: the paired change of each setting against
  the baseline (scenes resampled together) with intervals.
* ``settings``: each VHR setting (alpha, layers, outlier removal, random control) and the mean
  number of heads it reinforced.
* arrays: ``vhd`` ``float16 [scenes, steps, layers, heads]`` (NaN past a caption's end) and
  ``images`` (the first ``n_display`` evaluated images, ``uint8``).

Usage
-----
::

    import probe
    from analyses import vision_heads as vh

    model = probe.load_model("scene-llava")                 # or "tiny-llava", or a LLaVA checkpoint dir
    result = vh.run_vhr(model, vh.VhdConfig(n_scenes=100))   # `headlab run vhr --model scene-llava`
    result.tables["summary"]; result.tables["tvhd_test"]; result.save()

References
----------
* He et al. (2025). Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence.
  ACL.
* Leng et al. (2024). Mitigating Object Hallucinations in Large Vision-Language Models through Visual
  Contrastive Decoding. CVPR. (Distorted images bring out language priors.)
* Rohrbach et al. (2018), CHAIR; Li et al. (2023), POPE: see :mod:`analyses.tasks.scene_captions`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult, heads_frame
from analyses.registry import Analysis, register
from analyses.tasks import scene_captions as scc
from analyses.tasks import scenes as sc
from probe import vlm
from probe.errors import CaptureError, ConfigError
from probe.loading import Batch, LoadedModel

# ============================================================================== configuration


@dataclass(frozen=True)
class VhrSetting:
    """One way to reinforce heads: ``alpha``, ``layers`` (see :func:`parse_layers`), outlier removal,
    and ``random=True`` for the control that scales as many heads per layer, drawn at random."""

    name: str
    alpha: float = 2.0
    layers: str = "paper"
    outlier_removal: bool = True
    random: bool = False

    def validate(self) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"VHR setting {self.name!r}: alpha must be positive, got {self.alpha!r}")
        if not self.name or self.name == BASELINE:
            raise ConfigError(f"a VHR setting needs a name other than {BASELINE!r}")


PAPER_PROMPT = "Please help me describe the image in detail."
"""He et al.'s caption prompt for CHAIR (LLaVA-1.5's detailed-description prompt)."""
BASELINE = "baseline"
MAIN = "vhr"
DEFAULT_SETTINGS: tuple[VhrSetting, ...] = (
    VhrSetting(MAIN),
    VhrSetting("alpha=1.5", alpha=1.5),
    VhrSetting("alpha=3", alpha=3.0),
    VhrSetting("layers=all", layers="all"),
    VhrSetting("layers=last:14", layers="last:14"),
    VhrSetting("no outlier removal", outlier_removal=False),
    VhrSetting("random heads", random=True),
)


@dataclass(frozen=True)
class VhdConfig:
    """What :func:`run_vhd` and :func:`run_vhr` evaluate.

    ``n_scenes`` held-out scenes of ``split`` (``conflict`` or ``iid``) with Gaussian pixel noise of
    std ``noise`` (0–255 scale; 0: clean). ``top_k``: heads per layer summed by T-VHD. ``settings``:
    the VHR settings (:class:`VhrSetting`; the first is the main one; ``run_vhd`` runs none;
    ``ablations=False`` runs the main one only; ``pope_ablations=False`` asks POPE only without VHR
    and under the main setting).
    ``pope_per_scene`` present and as many absent classes per scene and kind (empty ``pope_kinds``:
    no POPE). ``n_display`` images are kept for the dashboard.
    """

    n_scenes: int = 100
    split: str = "conflict"
    noise: float = 50.0
    prompt: str = PAPER_PROMPT
    max_new_tokens: int = 64
    top_k: int = 3
    settings: tuple[VhrSetting, ...] = DEFAULT_SETTINGS
    pope_kinds: tuple[str, ...] = scc.POPE_KINDS
    pope_per_scene: int = 2
    pope_max_new_tokens: int = 3
    n_stats: int = 20000
    batch_size: int = 16
    n_boot: int = 1000
    alpha_ci: float = 0.05
    n_display: int = 8
    ablations: bool = True
    pope_ablations: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        ints = {"n_scenes": self.n_scenes, "max_new_tokens": self.max_new_tokens, "top_k": self.top_k,
                "pope_per_scene": self.pope_per_scene, "pope_max_new_tokens": self.pope_max_new_tokens,
                "n_stats": self.n_stats, "batch_size": self.batch_size, "n_boot": self.n_boot}  # fmt: skip
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.split not in ("conflict", "iid"):
            raise ConfigError(f"split must be 'conflict' or 'iid', got {self.split!r}")
        if not 0 <= self.noise <= 255:
            raise ConfigError(f"noise is a pixel std on the 0-255 scale; got {self.noise!r}")
        if not 0 < self.alpha_ci < 1:
            raise ConfigError(f"alpha_ci must be in (0, 1), got {self.alpha_ci!r}")
        bad = [k for k in self.pope_kinds if k not in scc.POPE_KINDS]
        if bad:
            raise ConfigError(f"unknown POPE kinds {bad}; choose from {', '.join(scc.POPE_KINDS)}")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ConfigError(f"VHR setting names must be unique, got {names}")
        for setting in self.settings:
            setting.validate()


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Layers named by ``spec``: ``"paper"`` (1 and the last 14), ``"all"``, ``"last:N"``,
    ``"first:N"``, ``"1,5,9"`` or a list of indices; sorted, each once."""
    if not isinstance(spec, str):
        chosen = [int(x) for x in spec]
    elif spec == "paper":
        chosen = [1, *range(max(0, n_layers - 14), n_layers)]
    elif spec == "all":
        chosen = list(range(n_layers))
    elif spec.startswith(("last:", "first:")):
        kind, _, number = spec.partition(":")
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"layers {spec!r}: give a positive count, e.g. last:14")
        k = min(int(number), n_layers)
        chosen = list(range(n_layers - k, n_layers)) if kind == "last" else list(range(k))
    else:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"layers {spec!r}: use paper, all, last:N, first:N or a comma list of indices"
            ) from None
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad or not chosen:
        raise ConfigError(
            f"layers {spec!r} name {bad or 'no layers'}; the model has layers 0 to {n_layers - 1}"
        )
    return sorted(set(chosen))


# ============================================================================== the language model's forward


@dataclass
class Rows:
    """A batch of image rows followed by their text-only twins, left-padded to one width.

    ``ids``/``mask`` ``[2B, W + N]``: prompt (left-padded to ``W``) then ``N`` answer tokens
    (right-padded, mask 0 there). Step ``t`` of row ``b`` is read at position ``W - 1 + t``.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    n_image_rows: int
    width: int
    pixels: torch.Tensor | None


def make_rows(
    model: LoadedModel,
    prompts: Sequence[str],
    pixels: torch.Tensor | None,
    answers: Sequence[Sequence[int]] | None = None,
    *,
    text_twin: bool = True,
) -> Rows:
    """The image prompts (and, with ``text_twin``, the same prompts without the image) plus answers."""
    rows = [vlm.prompt_ids(model, p, image=True) for p in prompts]
    if text_twin:
        rows += [vlm.prompt_ids(model, p, image=False) for p in prompts]
    prompt = model.batch_from_ids(rows)
    n = max((len(a) for a in answers), default=0) if answers is not None else 0
    b, width = prompt.input_ids.shape
    ids = torch.full((b, width + n), _pad_id(model), dtype=torch.long, device=prompt.input_ids.device)
    mask = torch.zeros_like(ids)
    ids[:, :width], mask[:, :width] = prompt.input_ids, prompt.attention_mask
    if answers is not None:
        twins = list(answers) * (2 if text_twin else 1)
        for r, answer in enumerate(twins):
            if answer:
                ids[r, width : width + len(answer)] = torch.tensor(list(answer), dtype=torch.long)
                mask[r, width : width + len(answer)] = 1
    return Rows(ids, mask, len(prompts), width, pixels)


def _pad_id(model: LoadedModel) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def embed_rows(model: LoadedModel, rows: Rows) -> torch.Tensor:
    """Token embeddings with the projected image features written over the image tokens (LLaVA's input)."""
    native = model.native_model
    assert native is not None
    embeds = native.get_submodule(vlm.LAYOUT.embed_tokens)(rows.ids)
    image_mask = rows.ids == int(model.extra["image_token_id"])
    if rows.pixels is None:
        if bool(image_mask.any()):
            raise ConfigError(
                "image tokens in the prompt but no images given; pass pixel values to make_rows"
            )
        return embeds
    projector = native.get_submodule(vlm.LAYOUT.projector)
    features = projector(vlm.image_features(model, rows.pixels.to(model.device, model.dtype)))
    if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
        raise CaptureError(
            f"{int(image_mask.sum())} image tokens for {features.shape[0]} images of {features.shape[1]} features"
        )
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))


def forward_rows(
    model: LoadedModel, rows: Rows, read: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Run the language model on ``rows``; logits ``[2B, len(read), vocab]`` at positions ``read``
    (default: the last prompt position). Position ids follow the attention mask (left padding)."""
    from probe.kernels import native_attention

    native = model.native_model
    assert native is not None
    positions = (rows.mask.cumsum(-1) - 1).clamp(min=0)
    read_at = torch.as_tensor([rows.width - 1] if read is None else read, device=rows.ids.device)
    with torch.no_grad(), native_attention(model, "sdpa"):
        embeds = embed_rows(model, rows)
        language_model = native.get_submodule(vlm.LAYOUT.language_model)
        hidden = language_model(inputs_embeds=embeds, attention_mask=rows.mask, position_ids=positions,
                                use_cache=False)[0]  # fmt: skip
        return native.get_submodule(vlm.LAYOUT.lm_head)(hidden[:, read_at]).float()


# ============================================================================== hooks on o_proj


@contextmanager
def _o_proj_hooks(model: LoadedModel, hook_for: Any) -> Iterator[None]:
    native = model.native_model
    assert native is not None
    handles = []
    try:
        for layer in range(model.n_layers):
            hook = hook_for(layer)
            if hook is not None:
                module = native.get_submodule(vlm.LAYOUT.block(layer, vlm.LAYOUT.out_proj))
                handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def scale_heads(model: LoadedModel, scales: torch.Tensor) -> Iterator[None]:
    """Multiply head ``h`` of layer ``l`` by ``scales[row, l, h]`` before ``o_proj``, at every position of
    every native forward in the block (``scales``: ``[batch, layers, heads]``; a batch row count of
    1 broadcasts). Works under SDPA and with a KV cache (generation)."""
    if scales.dim() != 3 or tuple(scales.shape[1:]) != (model.n_layers, model.n_heads):
        raise ConfigError(
            f"scales must be [batch, {model.n_layers}, {model.n_heads}], got {tuple(scales.shape)}"
        )
    active = [bool((scales[:, layer] != 1).any()) for layer in range(model.n_layers)]

    def hook_for(layer: int) -> Any:
        if not active[layer]:
            return None

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            z = args[0]
            s = scales[:, layer].to(z.device, z.dtype)
            if s.shape[0] != z.shape[0] and s.shape[0] != 1:
                raise CaptureError(
                    f"scales for {s.shape[0]} rows, but the forward has {z.shape[0]}; "
                    "give one row of scales per batch row, or a single row for all"
                )
            shaped = z.reshape(*z.shape[:-1], model.n_heads, -1) * s[:, None, :, None]
            return (shaped.reshape(z.shape), *args[1:])

        return hook

    with _o_proj_hooks(model, hook_for):
        yield


def step_vhd(model: LoadedModel, rows: Rows, n_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VHD ``[B, n_steps, layers, heads]`` between the image rows and their text-only twins at the
    positions that produce answer tokens ``0..n_steps-1``, the text-only output norms there, and the
    image rows' logits there ``[B, n_steps, vocab]`` (their argmax is the greedy next token)."""
    b = rows.n_image_rows
    if rows.ids.shape[0] != 2 * b:
        raise ConfigError("step_vhd needs image rows and their text-only twins (make_rows(text_twin=True))")
    span = slice(rows.width - 1, rows.width - 1 + n_steps)
    vhd = torch.zeros(b, n_steps, model.n_layers, model.n_heads)
    norm = torch.zeros_like(vhd)
    fired: set[int] = set()

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0][:, span].float()
            z = z.reshape(*z.shape[:-1], model.n_heads, -1)
            vhd[:, :, layer] = torch.linalg.vector_norm(z[:b] - z[b:], dim=-1).cpu()
            norm[:, :, layer] = torch.linalg.vector_norm(z[b:], dim=-1).cpu()
            fired.add(layer)

        return hook

    with _o_proj_hooks(model, hook_for):
        logits = forward_rows(model, rows, read=list(range(span.start, span.stop)))
    if len(fired) != model.n_layers:
        raise CaptureError(
            f"o_proj hooks of layers {sorted(set(range(model.n_layers)) - fired)[:5]} never fired"
        )
    return vhd, norm, logits[:b].cpu()


@dataclass
class Selection:
    """What :func:`select_heads` decided for a batch: ``scales [B, layers, heads]`` (alpha or 1),
    ``selected``/``outlier`` masks and the first-step ``vhd``/``text_norm`` it decided on."""

    scales: torch.Tensor
    selected: torch.Tensor
    outlier: torch.Tensor
    vhd: torch.Tensor
    text_norm: torch.Tensor


def _decide(
    vhd: torch.Tensor, norm: torch.Tensor, outlier_removal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``[B, heads]``: outliers (VHD and norm both above mean + std) and selected heads
    (VHD, outliers set to 0, above the median)."""
    if outlier_removal:
        high_v = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, correction=0, keepdim=True)
        high_n = norm > norm.mean(-1, keepdim=True) + norm.std(-1, correction=0, keepdim=True)
        outlier = high_v & high_n
    else:
        outlier = torch.zeros_like(vhd, dtype=torch.bool)
    kept = torch.where(outlier, torch.zeros_like(vhd), vhd)
    median = torch.quantile(kept, 0.5, dim=-1, keepdim=True)
    return kept > median, outlier


def select_heads(model: LoadedModel, rows: Rows, setting: VhrSetting, *, seed: int = 0) -> Selection:
    """VHR's head choice at the first generation step, layer by layer, in one forward (see the module
    docstring): returns the per-row scales to apply while generating."""
    b = rows.n_image_rows
    if rows.ids.shape[0] != 2 * b:
        raise ConfigError(
            "select_heads needs image rows and their text-only twins (make_rows(text_twin=True))"
        )
    layers = set(parse_layers(setting.layers, model.n_layers))
    shape = (b, model.n_layers, model.n_heads)
    scales = torch.ones(shape)
    selected = torch.zeros(shape, dtype=torch.bool)
    outlier = torch.zeros(shape, dtype=torch.bool)
    vhd_first = torch.full(shape, math.nan)
    norm_first = torch.full(shape, math.nan)
    generator = torch.Generator().manual_seed(seed)
    last = rows.width - 1

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            z = args[0]
            heads = z.reshape(*z.shape[:-1], model.n_heads, -1)
            at = heads[:, last].float()
            vhd = torch.linalg.vector_norm(at[:b] - at[b:], dim=-1).cpu()
            norm = torch.linalg.vector_norm(at[b:], dim=-1).cpu()
            vhd_first[:, layer], norm_first[:, layer] = vhd, norm
            if layer not in layers:
                return None
            chosen, out = _decide(vhd, norm, setting.outlier_removal)
            if setting.random:  # the control: as many heads, drawn uniformly
                keys = torch.rand(b, model.n_heads, generator=generator)
                ranks = keys.argsort(-1).argsort(-1)
                chosen = ranks < chosen.sum(-1, keepdim=True)
            selected[:, layer], outlier[:, layer] = chosen, out
            factor = torch.where(chosen, torch.tensor(setting.alpha), torch.tensor(1.0))
            scales[:, layer] = factor
            both = torch.cat([factor, factor]).to(z.device, z.dtype)
            return ((heads * both[:, None, :, None]).reshape(z.shape), *args[1:])

        return hook

    with _o_proj_hooks(model, hook_for):
        forward_rows(model, rows)
    if bool(torch.isnan(vhd_first).any()):
        raise CaptureError("some o_proj hooks never fired during the VHR selection pass")
    return Selection(scales, selected, outlier, vhd_first, norm_first)


# ============================================================================== generation


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
    stops.add(_pad_id(model))
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


# ============================================================================== words and T-VHD


def t_vhd(vhd: np.ndarray, top_k: int) -> np.ndarray:
    """T-VHD ``[..., steps]``: per step, the sum over layers of the ``top_k`` largest VHD of the layer
    (``vhd``: ``[..., steps, layers, heads]``; NaN steps stay NaN)."""
    k = min(top_k, vhd.shape[-1])
    top = -np.sort(-vhd, axis=-1)[..., :k]
    return top.sum(axis=(-1, -2))


TOKEN_COLUMNS = ["scene", "step", "token", "token_id", "t_vhd", "object", "word", "shape", "hallucinated"]


def token_table(
    model: LoadedModel, scene: sc.Scene, tokens: Sequence[int], t: np.ndarray, index: int
) -> pd.DataFrame:
    """One row per generated token of a caption: text, T-VHD, the object word it starts (if any)."""
    tok = model.tokenizer
    full = tok.decode(list(tokens), skip_special_tokens=True)
    offsets = [len(tok.decode(list(tokens[:i]), skip_special_tokens=True)) for i in range(len(tokens) + 1)]
    starts: dict[int, sc.Mention] = {}
    for mention in sc.find_objects(full):
        step = next((i for i in range(len(tokens)) if offsets[i] <= mention.start < offsets[i + 1]), None)
        if step is not None and step not in starts:
            starts[step] = mention
    present = set(scene.classes)
    rows = []
    for i, token in enumerate(tokens):
        m = starts.get(i)
        rows.append({
            "scene": index, "step": i, "token": full[offsets[i] : offsets[i + 1]], "token_id": int(token),
            "t_vhd": float(t[i]), "object": m is not None, "word": m.text if m else "",
            "shape": m.shape if m else "", "hallucinated": bool(m is not None and m.shape not in present),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=TOKEN_COLUMNS)


def tvhd_test(words: pd.DataFrame) -> pd.DataFrame:
    """Hallucinated vs correct object words: counts, means, medians, Mann–Whitney U (two-sided) and the
    AUROC of T-VHD for telling a correct word from a hallucinated one (0.5: no signal)."""
    from scipy.stats import mannwhitneyu

    h = words.loc[words["hallucinated"], "t_vhd"].to_numpy(float)
    c = words.loc[~words["hallucinated"], "t_vhd"].to_numpy(float)
    row: dict[str, Any] = {
        "n_hallucinated": len(h), "n_correct": len(c),
        "mean_hallucinated": float(h.mean()) if len(h) else math.nan,
        "mean_correct": float(c.mean()) if len(c) else math.nan,
        "median_hallucinated": float(np.median(h)) if len(h) else math.nan,
        "median_correct": float(np.median(c)) if len(c) else math.nan,
        "u": math.nan, "p_value": math.nan, "auroc_correct": math.nan,
    }  # fmt: skip
    if len(h) and len(c):
        test = mannwhitneyu(c, h, alternative="two-sided")
        row.update(
            u=float(test.statistic),
            p_value=float(test.pvalue),
            auroc_correct=float(test.statistic) / (len(h) * len(c)),
        )
    return pd.DataFrame([row])


# ============================================================================== data


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


def _require_llava(model: LoadedModel) -> None:
    if model.kind != "vision-language":
        raise ConfigError(
            f"{model.name} is a {model.kind} model; VHD and VHR need a vision-language model: "
            "--model scene-llava, tiny-llava or a LLaVA checkpoint directory"
        )


# ============================================================================== the runs


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive batches of ``size`` over ``n`` items."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _caption_setting(
    model: LoadedModel, cfg: VhdConfig, images: np.ndarray, setting: VhrSetting | None, bar: Any
) -> tuple[list[Answers], list[Selection]]:
    answers, selections = [], []
    for start, stop in _spans(len(images), cfg.batch_size):
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


def _pope_setting(
    model: LoadedModel, cfg: VhdConfig, images: np.ndarray, questions: Sequence[scc.PopeQuestion],
    setting: VhrSetting | None, bar: Any,
) -> pd.DataFrame:  # fmt: skip
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


def _paired_deltas(captions: pd.DataFrame, pope: pd.DataFrame, n_scenes: int, cfg: VhdConfig) -> pd.DataFrame:
    """Change of each setting against the baseline, scenes resampled together (paired bootstrap)."""
    rng = np.random.default_rng([0xDE17, cfg.seed, n_scenes])
    idx = rng.integers(0, n_scenes, size=(cfg.n_boot, n_scenes))
    base = captions[captions["setting"] == BASELINE].sort_values("scene")
    rows = []

    everyone = np.arange(n_scenes)[None]  # the point estimate: one "resample" holding every scene

    def chair(frame: pd.DataFrame, pick: np.ndarray) -> dict[str, np.ndarray]:
        s, h, m, c, p = (
            frame[k].to_numpy(float)[pick]
            for k in ("chair_s", "n_hallucinated", "n_mentioned", "n_correct", "n_present")
        )
        return {
            "CHAIR_S": s.mean(1),
            "CHAIR_I": scc._ratio(h.sum(1), m.sum(1)),
            "recall": scc._ratio(c.sum(1), p.sum(1)),
        }

    def pope_counts(frame: pd.DataFrame) -> np.ndarray:
        """[n_scenes, 4]: tp, fp, tn, fn per scene."""
        out = np.zeros((n_scenes, 4))
        said_yes = frame["yes"].to_numpy(bool)
        label = frame["label"].to_numpy(bool)
        scene = frame["scene"].to_numpy(int)
        for j, hit in enumerate([said_yes & label, said_yes & ~label, ~said_yes & ~label, ~said_yes & label]):
            np.add.at(out[:, j], scene, hit.astype(float))
        return out

    def pope_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
        return scc._pope_metrics(*(counts[..., j] for j in range(4)))

    base_chair, base_boot = chair(base, everyone), chair(base, idx)
    for setting in captions["setting"].unique():
        if setting == BASELINE:
            continue
        other = captions[captions["setting"] == setting].sort_values("scene")
        point, boot = chair(other, everyone), chair(other, idx)
        for metric in point:
            diff = boot[metric] - base_boot[metric]
            lo, hi = scc._interval(diff, cfg.alpha_ci)
            rows.append({"setting": setting, "benchmark": "CHAIR", "kind": "captions", "metric": metric,
                         "delta": float(point[metric][0] - base_chair[metric][0]), "lo": lo, "hi": hi})  # fmt: skip
    if len(pope):
        for kind in pope["kind"].unique():
            b_counts = pope_counts(pope[(pope["setting"] == BASELINE) & (pope["kind"] == kind)])
            b_point, b_boot = pope_metrics(b_counts.sum(0)), pope_metrics(b_counts[idx].sum(1))
            for setting in pope["setting"].unique():
                if setting == BASELINE:
                    continue
                counts = pope_counts(pope[(pope["setting"] == setting) & (pope["kind"] == kind)])
                point, boot = pope_metrics(counts.sum(0)), pope_metrics(counts[idx].sum(1))
                for metric in point:
                    lo, hi = scc._interval(boot[metric] - b_boot[metric], cfg.alpha_ci)
                    rows.append({"setting": setting, "benchmark": "POPE", "kind": str(kind), "metric": metric,
                                 "delta": float(point[metric] - b_point[metric]), "lo": lo, "hi": hi})  # fmt: skip
    return pd.DataFrame(rows, columns=["setting", "benchmark", "kind", "metric", "delta", "lo", "hi"])


def _vhd_pass(
    model: LoadedModel, cfg: VhdConfig, images: np.ndarray, answers: list[Answers], bar: Any
) -> tuple[np.ndarray, np.ndarray, float]:
    """Teacher-forced VHD of the baseline captions; also how often the forced argmax reproduces them."""
    n = len(images)
    longest = max((len(t) for a in answers for t in a.tokens), default=0)
    vhd = np.full((n, max(1, longest), model.n_layers, model.n_heads), np.nan, dtype=np.float32)
    norm = np.full_like(vhd, np.nan)
    agree, total = 0, 0
    for (start, stop), batch in zip(_spans(len(images), cfg.batch_size), answers, strict=True):
        steps = max((len(t) for t in batch.tokens), default=0)
        if steps == 0:
            bar.update(stop - start)
            continue
        pixels = model.preprocess(images[start:stop])
        rows = make_rows(model, [cfg.prompt] * (stop - start), pixels, batch.tokens)
        v, nt, logits = step_vhd(model, rows, steps)
        forced = logits.argmax(-1)
        for r, tokens in enumerate(batch.tokens):
            k = len(tokens)
            vhd[start + r, :k] = v[r, :k].numpy()
            norm[start + r, :k] = nt[r, :k].numpy()
            agree += int((forced[r, :k] == torch.tensor(tokens)).sum())
            total += k
        bar.update(stop - start)
    return vhd, norm, agree / max(1, total)


def _evaluate(model: LoadedModel, cfg: VhdConfig, with_vhr: bool, analysis: str) -> AnalysisResult:
    from tqdm.auto import tqdm

    _require_llava(model)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    data = scc.SceneCaptionConfig()
    scenes = scc.eval_scenes(data, cfg.split, cfg.n_scenes)  # type: ignore[arg-type]
    images = noisy_images(scenes, cfg.noise, cfg.seed)
    stats = scc.training_statistics(data, cfg.n_stats) if cfg.pope_kinds else None
    questions = [
        q for kind in cfg.pope_kinds
        for q in scc.pope_questions(scenes, stats, kind, n_per_scene=cfg.pope_per_scene, seed=cfg.seed)  # type: ignore[arg-type]
    ]  # fmt: skip
    chosen = (cfg.settings if cfg.ablations else cfg.settings[:1]) if with_vhr else ()
    settings: list[VhrSetting | None] = [None, *chosen]
    for s in settings:
        if s is not None:
            parse_layers(s.layers, model.n_layers)  # fail before any work
    n_pope = len(settings) if cfg.pope_ablations else min(2, len(settings))
    n_work = len(settings) * len(scenes) + n_pope * len(questions) + len(scenes)
    bar = tqdm(total=n_work, desc=analysis, unit="item", disable=not cfg.progress)
    caption_frames, pope_frames, setting_rows = [], [], []
    selection_main: list[Selection] = []
    baseline_answers: list[Answers] = []
    for setting in settings:
        name = BASELINE if setting is None else setting.name
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        answers, selections = _caption_setting(model, cfg, images, setting, bar)
        if setting is None:
            baseline_answers = answers
        elif setting.name == cfg.settings[0].name:
            selection_main = selections
        texts = [t for a in answers for t in a.texts]
        table = scc.chair_table(scenes, texts)
        table.insert(0, "setting", name)
        caption_frames.append(table)
        ask = bool(questions) and (
            setting is None or cfg.pope_ablations or setting.name == cfg.settings[0].name
        )
        pope = _pope_setting(model, cfg, images, questions, setting, bar) if ask else pd.DataFrame()
        if len(pope):
            pope.insert(0, "setting", name)
            pope_frames.append(pope)
        timings[f"{name}_s"] = time.perf_counter() - t0
        if setting is not None:
            n_sel = torch.cat([s.selected for s in selections]).sum(dim=(1, 2)).float()
            setting_rows.append({**asdict(setting), "layers_used": ",".join(map(str, parse_layers(setting.layers, model.n_layers))),
                                 "heads_reinforced_mean": float(n_sel.mean()), "seconds": timings[f"{name}_s"]})  # fmt: skip
    t0 = time.perf_counter()
    bar.set_postfix_str("VHD")
    vhd, norm, agreement = _vhd_pass(model, cfg, images, baseline_answers, bar)
    timings["vhd_s"] = time.perf_counter() - t0
    bar.close()

    tv = t_vhd(vhd, cfg.top_k)
    token_frames = [
        token_table(model, scenes[i], t, tv[i], i)
        for i, t in enumerate(t for a in baseline_answers for t in a.tokens)
        if t
    ]
    tokens = (
        pd.concat(token_frames, ignore_index=True) if token_frames else pd.DataFrame(columns=TOKEN_COLUMNS)
    )
    # (filtering an empty object-typed frame would drop its columns)
    words = tokens[tokens["object"]].reset_index(drop=True) if len(tokens) else tokens
    captions = pd.concat(caption_frames, ignore_index=True)
    pope = pd.concat(pope_frames, ignore_index=True) if pope_frames else pd.DataFrame()
    summaries = []
    for name, frame in captions.groupby("setting", sort=False):
        part = scc.chair_summary(
            frame.drop(columns="setting"), n_boot=cfg.n_boot, seed=cfg.seed, alpha=cfg.alpha_ci
        )
        part.insert(0, "vhr_setting", name)
        summaries.append(part)
    if len(pope):
        for name, frame in pope.groupby("setting", sort=False):
            part = scc.pope_summary(
                frame.drop(columns="setting"), n_boot=cfg.n_boot, seed=cfg.seed, alpha=cfg.alpha_ci
            )
            part.insert(0, "vhr_setting", name)
            summaries.append(part)
    summary = pd.concat(summaries, ignore_index=True)
    deltas = _paired_deltas(captions, pope, len(scenes), cfg)

    with warnings.catch_warnings():  # heads never seen (no tokens): NaN, not "Mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        columns = {
            "vhd_mean": np.nanmean(vhd, axis=(0, 1)),
            "vhd_first": np.nanmean(vhd[:, 0], axis=0),
            "text_norm_first": np.nanmean(norm[:, 0], axis=0),
        }
    if selection_main:
        columns["selected_share"] = torch.cat([s.selected for s in selection_main]).float().mean(0).numpy()
        columns["outlier_share"] = torch.cat([s.outlier for s in selection_main]).float().mean(0).numpy()
        main_layers = parse_layers(cfg.settings[0].layers, model.n_layers)
        columns["in_vhr_layers"] = np.isin(np.arange(model.n_layers), main_layers)[:, None].repeat(
            model.n_heads, 1
        )
    heads = heads_frame(model, columns)
    timings["total_s"] = time.perf_counter() - t_all
    scene_rows = pd.DataFrame([{"scene": i, "seed": s.seed, "index": s.index, "classes": ",".join(s.classes),
                                "caption_truth": s.caption()} for i, s in enumerate(scenes)])  # fmt: skip
    return AnalysisResult(
        analysis=analysis,
        model_info=model.describe(),
        config=asdict(cfg),
        tables={
            "heads": heads,
            "captions": captions,
            "tokens": tokens,
            "words": words,
            "tvhd_test": tvhd_test(words),
            "pope": pope,
            "summary": summary,
            "deltas": deltas,
            "scenes": scene_rows,
            "settings": pd.DataFrame(setting_rows),
        },
        arrays={"vhd": vhd.astype(np.float16), "images": images[: cfg.n_display]},
        seeds={"seed": cfg.seed, "eval_seed": data.eval_seed, "conflict_seed": data.conflict_seed},
        timings=timings,
        notes={"teacher_forced_agreement": agreement, "n_questions": len(questions)},
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
    lines = [f"{result.analysis} on {result.model_info.get('name')}: {len(t['scenes'])} scenes, "
             f"teacher-forced agreement {result.notes.get('teacher_forced_agreement', math.nan):.3f}"]  # fmt: skip
    for name, frame in s.groupby("vhr_setting", sort=False):
        got = {(r.benchmark, r.setting, r.metric): r for r in frame.itertuples()}
        parts = []
        for key, label in ((("CHAIR", "captions", "CHAIR_S"), "CHAIR_S"), (("CHAIR", "captions", "CHAIR_I"), "CHAIR_I"),
                           (("POPE", "adversarial", "F1"), "POPE-adv F1"), (("POPE", "random", "F1"), "POPE-rand F1")):  # fmt: skip
            if key in got:
                r = got[key]
                parts.append(f"{label} {r.value:.3f} [{r.lo:.3f}, {r.hi:.3f}]")
        lines.append(f"  {name:<20} " + "; ".join(parts))
    test = t["tvhd_test"].iloc[0]
    lines.append(
        f"  T-VHD: hallucinated {test.mean_hallucinated:.2f} (n={int(test.n_hallucinated)}) vs correct "
        f"{test.mean_correct:.2f} (n={int(test.n_correct)}); Mann-Whitney p={test.p_value:.3g}, AUROC {test.auroc_correct:.3f}"
    )
    top = t["heads"].nlargest(5, "vhd_mean")
    lines.append(
        "  top VHD heads: " + ", ".join(f"L{r.layer}H{r.head} {r.vhd_mean:.3f}" for r in top.itertuples())
    )
    return "\n".join(lines)


VHD = register(
    Analysis(
        name="vhd",
        config_cls=VhdConfig,
        run=run_vhd,
        summary=summary,
        help=(
            "Vision-aware head divergence on a LLaVA (default scene-llava): VHD per head and step, "
            "T-VHD of hallucinated vs correct words, CHAIR, POPE."
        ),
        default_model="scene-llava",
        page="dashboard.vhd.page:VhdPage",
        report="dashboard.vhd.report:report_sections",
        opt_outs={"demo": "the vhr run computes VHD first and saves the same tables"},
    )
)
VHR = register(
    Analysis(
        name="vhr",
        config_cls=VhdConfig,
        run=run_vhr,
        summary=summary,
        help=(
            "Vision-aware head reinforcement: CHAIR and POPE before and after VHR, with ablations "
            "(alpha, layers, outliers) and a random-heads control."
        ),
        default_model="scene-llava",
        page="dashboard.vhd.page:VhdPage",
        report="dashboard.vhd.report:report_sections",
        # a few noisy held-out scenes and the main VHR setting only
        demo={
            "n_scenes": 8,
            "max_new_tokens": 32,
            "ablations": False,
            "pope_kinds": ("adversarial",),
            "pope_per_scene": 1,
            "n_stats": 2000,
            "batch_size": 8,
        },
    )
)
