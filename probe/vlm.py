"""Vision-language models in probe: a LLaVA assembled from parts, loaded, prompted, generated from, hooked.

Background
----------
A LLaVA-style model (Liu et al. 2023) reads an image through a vision transformer, takes the hidden
states of one of its layers (``vision_feature_layer``; LLaVA-1.5 uses ``-2``, the penultimate one),
drops the CLS token (``vision_feature_select_strategy="default"``; ``"full"`` keeps it), maps each
patch feature through a two-layer MLP *projector* (Linear, GELU, Linear) into the language model's
embedding space, and writes the results over the ``image_seq_length`` copies of the image token
(``<image>``) in the prompt (196 for a 224-pixel image and 16-pixel patches). The language model
then runs as usual: its heads read image tokens like any other tokens.

No pretrained vision-language model can be had offline, so the workbench builds a small real one,
``scene-llava``: the ``clip-vit-b16`` image tower (frozen) + a projector trained by
``headlab train scene-llava`` (``data/scene_llava_projector.safetensors``, optionally with LoRA
deltas for the language model's attention, merged into its weights on load) + ``smollm2-135m``
(SmolLM2-135M-Instruct, prompted with its own chat template). It is assembled as a transformers
``LlavaForConditionalGeneration``, so every real LLaVA checkpoint directory goes through the same
code (``probe.load_model(directory)``); ``tiny-llava`` is a random tiny one for tests.

What probe gives
----------------
* :func:`assemble`: vision tower + causal LM + tokenizer (+ projector weights) -> a LLaVA and its
  tokenizer with ``<image>`` added (the language model's embedding grows by one row, the mean of
  the others; the row is always overwritten by image features and never generated).
* :func:`load_assembly` (``scene-llava``), :func:`load_llava_dir` (any local LLaVA checkpoint) and
  the ``tiny-llava`` builder, all through ``probe.load_model``: a :class:`~probe.loading.LoadedModel`
  of ``kind="vision-language"`` whose ``n_layers``/``n_heads``/... are the language model's,
  ``image`` is the tower's preprocessing and ``extra`` records the image token, the feature layer,
  the projector file and the module layout.
* Prompts: :func:`format_prompt` (the tokenizer's chat template, else LLaVA-1.5's ``USER: <image>\\n…
  ASSISTANT:``), :func:`encode_prompts` (image token expanded, left-padded, with or without image).
* :func:`generate` (greedy, batched, through the model's own ``generate`` with SDPA attention and
  a KV cache) and :func:`answer_yes_no` (the same, plus the first step's Yes-minus-No logit).
* Hooks. TransformerLens 4.3 has a LLaVA adapter: ``model.bridge`` is a ``TransformerBridge`` over
  the whole model, ``model.bridge(ids, pixel_values=pixels)`` runs it, and the language model's heads
  have the usual hook points (``blocks.{l}.attn.hook_z``: ``[batch, T, heads, d_head]``, the heads'
  outputs before ``o_proj``), so :mod:`probe.hooks` and the eager captures work unchanged. The
  bridge's boot would also try to load a multimodal processor and, failing (offline, or no processor
  files), ``pip install torchvision``; probe does its own preprocessing, so that step is skipped.
  For the fast path (generation with SDPA and a KV cache) :func:`capture_head_outputs` reads the
  same per-head outputs with plain torch pre-hooks on ``o_proj`` of the native modules.

Usage
-----
::

    import probe
    from probe import vlm

    model = probe.load_model("scene-llava")          # or "tiny-llava", or a LLaVA checkpoint dir
    texts = vlm.generate(model, images, "Describe the image.")        # greedy, batched
    with vlm.capture_head_outputs(model, layers=[3]) as cap:
        vlm.generate(model, images[:1], "Describe the image.", max_new_tokens=4)
    cap.outputs[3][0].shape        # [1, T_prompt, heads, d_head]; then one [1, 1, heads, d_head] per step
    batch = vlm.encode_prompts(model, ["Describe the image."], image=False)   # the same prompt, no image

References
----------
* Liu, Li, Wu & Lee (2023). Visual Instruction Tuning. NeurIPS. (LLaVA.)
* Liu, Li, Li & Lee (2024). Improved Baselines with Visual Instruction Tuning. CVPR. (LLaVA-1.5: MLP
  projector, penultimate-layer features.)
* Hu et al. (2022). LoRA: Low-Rank Adaptation of Large Language Models. ICLR.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from probe import cache, vision, zoo
from probe.assemblies import ASSEMBLIES, IMAGE_TOKEN, AssemblySpec, FeatureStrategy
from probe.checkpoints import check_checkpoint_files, load_language_dir, quiet_transformers
from probe.checksums import checkpoint_sha256
from probe.checksums import state_sha256 as _state_sha256
from probe.errors import CaptureError, ConfigError, HeadlabError
from probe.generation import prepare_bridge_generation
from probe.images import ImageInput, ImageSpec
from probe.kernels import native_attention
from probe.model import Batch, BosMode, LoadedModel, bos_policy
from probe.sources import ASSEMBLY, DIRECTORY, TINY, ModelRequest, ModelSource, register
from probe.tiny import TINY_BUILDERS, TinyBuilder, build_tiny_clip_vision, build_tiny_llama
from probe.tiny import register as register_tiny

KIND: Literal["vision-language"] = "vision-language"
PROJECTOR_FORMAT = "headlab-llava-projector/1"
MAX_PROJECTOR_BYTES = 10 * 1024 * 1024  # the projector file is committed to data/: keep it small
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."

__all__ = [
    "ASSEMBLIES",
    "IMAGE_TOKEN",
    "LAYOUT",
    "AssemblySpec",
    "HeadOutputs",
    "LlavaLayout",
    "ProjectorFile",
    "YesNoAnswer",
    "add_image_token",
    "answer_yes_no",
    "apply_projector",
    "assemble",
    "capture_head_outputs",
    "encode_prompts",
    "format_prompt",
    "generate",
    "image_features",
    "is_llava_config",
    "llava_config",
    "load_assembly",
    "load_llava_dir",
    "merge_lora",
    "parts_meta",
    "projector_module",
    "prompt_ids",
    "read_projector",
    "save_checkpoint",
    "wrap_vlm",
    "write_projector",
]


# ============================================================================== layout


@dataclass(frozen=True)
class LlavaLayout:
    """Where ``LlavaForConditionalGeneration`` keeps its parts (module paths from the top model).

    The language model's blocks are ``{layers}.{i}``; per block, ``attention`` computes the heads and
    ``out_proj``'s input is their outputs concatenated, ``[batch, T, heads × d_head]``.
    """

    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    language_model: str = "model.language_model"
    embed_tokens: str = "model.language_model.embed_tokens"
    layers: str = "model.language_model.layers"
    attention: str = "self_attn"
    out_proj: str = "self_attn.o_proj"
    lm_head: str = "lm_head"

    def block(self, layer: int, part: str) -> str:
        return f"{self.layers}.{layer}.{part}"


LAYOUT = LlavaLayout()


# ============================================================================== assembly


def is_llava_config(config_json: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``config.json`` is a vision-language model; raises for unsupported kinds."""
    model_type = str(config_json.get("model_type", ""))
    if model_type == "llava":
        return True
    if model_type in {"llava_next", "llava_onevision", "llava_next_video", "vipllava", "mistral3"}:
        raise HeadlabError(
            f"model_type {model_type!r} is a LLaVA variant whose image pipeline probe does not handle yet; "
            "supported vision-language checkpoints have model_type 'llava'"
        )
    return False


def add_image_token(tokenizer: Any, token: str = IMAGE_TOKEN) -> int:
    """Add ``token`` to ``tokenizer`` as a special token (once) and return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise HeadlabError(f"could not add the image token {token!r} to the tokenizer")
    return token_id


def _image_seq_length(vision_config: Any, strategy: str) -> int:
    size = (
        vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    )
    patch = (
        vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    )
    return (int(size) // int(patch)) ** 2 + (1 if strategy == "full" else 0)


def llava_config(
    vision_config: Any,
    text_config: Any,
    *,
    image_token_id: int,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: FeatureStrategy = "default",
    projector_hidden_act: str = "gelu",
) -> Any:
    """A ``LlavaConfig`` joining a CLIP vision config and a causal LM's config.

    ``image_seq_length`` follows from the tower: ``(image_size / patch_size)²`` patch tokens, plus CLS
    with the ``"full"`` strategy.
    """
    from transformers import LlavaConfig

    if vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(
            f"vision_feature_select_strategy must be 'default' (drop CLS) or 'full', got "
            f"{vision_feature_select_strategy!r}"
        )
    n_vision_layers = int(vision_config.num_hidden_layers)
    if not -n_vision_layers - 1 <= vision_feature_layer <= n_vision_layers:
        raise ConfigError(
            f"vision_feature_layer {vision_feature_layer} is outside the tower's hidden states "
            f"(0 to {n_vision_layers}, or -1 to -{n_vision_layers + 1}); LLaVA-1.5 uses -2"
        )
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=_image_seq_length(vision_config, vision_feature_select_strategy),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def _vision_tower_state(vision_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of a CLIP image tower without its projection head (LLaVA reads hidden states)."""
    inner = getattr(vision_model, "vision_model", None)  # CLIPVisionModelWithProjection wraps one
    tower = inner if isinstance(inner, torch.nn.Module) else vision_model
    return dict(tower.state_dict())


def assemble(
    vision_model: torch.nn.Module,
    language_model: torch.nn.Module,
    tokenizer: Any,
    *,
    projector_state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: FeatureStrategy = "default",
    projector_hidden_act: str = "gelu",
) -> tuple[Any, Any]:
    """Build a ``LlavaForConditionalGeneration`` from a CLIP image tower and a causal LM (float32, CPU).

    Every weight of the tower (its projection head excepted) and of the language model is copied;
    the tokenizer (a copy) gets the image token, and the language model's embedding (and untied
    output) matrix one more row for it: the mean of the others. The projector comes from
    ``projector_state`` (keys ``linear_1.weight``, … as in ``LlavaMultiModalProjector``) or, without
    one, is initialised as ``nn.Linear`` does from ``seed``. Returns (model, tokenizer).
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    tokenizer = copy.deepcopy(tokenizer)
    image_token_id = add_image_token(tokenizer)
    causal_lm: Any = language_model
    lm_config = copy.deepcopy(causal_lm.config)
    old_vocab = int(lm_config.vocab_size)
    lm_config.vocab_size = max(old_vocab, len(tokenizer))
    config = llava_config(
        vision_model.config, lm_config, image_token_id=image_token_id, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy, projector_hidden_act=projector_hidden_act,
    )  # fmt: skip
    model: Any
    with no_init_weights():  # every weight is copied in below; random init would only cost time
        model = LlavaForConditionalGeneration(config)
    model = model.float()
    base = getattr(language_model, "model", None)
    if not isinstance(base, torch.nn.Module) or not hasattr(language_model, "lm_head"):
        raise HeadlabError(
            f"{type(language_model).__name__} is not a causal LM with .model and .lm_head; pass e.g. a "
            "LlamaForCausalLM"
        )
    lm_state = {k: v.detach().to(torch.float32) for k, v in base.state_dict().items()}
    embed = lm_state["embed_tokens.weight"]
    extra_rows = lm_config.vocab_size - embed.shape[0]
    if extra_rows:
        lm_state["embed_tokens.weight"] = torch.cat(
            [embed, embed.mean(0, keepdim=True).expand(extra_rows, -1)]
        )
    with torch.no_grad():
        model.get_submodule(LAYOUT.vision_tower).load_state_dict(
            _vision_tower_state(vision_model), strict=True
        )
        model.get_submodule(LAYOUT.language_model).load_state_dict(lm_state, strict=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        else:
            head = causal_lm.lm_head.weight.detach().to(torch.float32)
            if extra_rows:
                head = torch.cat([head, head.mean(0, keepdim=True).expand(extra_rows, -1)])
            model.lm_head.weight.copy_(head)
        projector = model.get_submodule(LAYOUT.projector)
        if projector_state is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for module in projector.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.reset_parameters()
        else:
            _load_projector_state(projector, projector_state)
    return model.eval(), tokenizer


def _load_projector_state(projector: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        raise HeadlabError(
            f"the projector weights do not fit this model: expected {expected}, got {given}; the file was "
            "trained for other vision/language parts (check its .json) — train one for these parts"
        )
    projector.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


# ============================================================================== LoRA


def lora_module_name(layer: int, target: str) -> str:
    """The attention projection a LoRA delta of ``target`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) adapts."""
    return LAYOUT.block(layer, f"self_attn.{target}")


def merge_lora(model: torch.nn.Module, lora_state: Mapping[str, torch.Tensor], scale: float) -> int:
    """Add ``scale · B @ A`` to each adapted projection's weight (in place); returns how many were merged.

    ``lora_state`` keys are ``{layer}.{target}.A`` (``[rank, in]``) and ``{layer}.{target}.B``
    (``[out, rank]``), as :mod:`probe.vlm_train` writes them.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state.items():
        stem, _, part = key.rpartition(".")
        if part not in ("A", "B"):
            raise HeadlabError(f"unexpected LoRA tensor {key!r}; expected '<layer>.<target>.A' or '.B'")
        pairs.setdefault(stem, {})[part] = tensor
    with torch.no_grad():
        for stem, parts in pairs.items():
            layer_text, _, target = stem.partition(".")
            if set(parts) != {"A", "B"} or not layer_text.isdigit():
                raise HeadlabError(f"LoRA entry {stem!r} needs both A and B and a layer index")
            linear = model.get_submodule(lora_module_name(int(layer_text), target))
            if not isinstance(linear, torch.nn.Linear):
                raise HeadlabError(f"LoRA target {stem!r} is not a linear layer")
            delta = scale * (parts["B"].to(torch.float32) @ parts["A"].to(torch.float32))
            if tuple(delta.shape) != tuple(linear.weight.shape):
                raise HeadlabError(
                    f"LoRA delta for {stem} has shape {tuple(delta.shape)}, the weight {tuple(linear.weight.shape)}"
                )
            linear.weight.add_(delta.to(linear.weight.device, linear.weight.dtype))
    return len(pairs)


# ============================================================================== projector files


@dataclass
class ProjectorFile:
    """What a projector file holds: the projector's weights, optional LoRA deltas, and its metadata.

    ``meta`` records the assembly it belongs to (``vision``, ``language``, ``vision_feature_layer``,
    ``vision_feature_select_strategy``, ``projector_hidden_act``, ``image_token``) and, for LoRA,
    ``lora_rank``, ``lora_alpha`` and ``lora_targets``.
    """

    projector: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_scale(self) -> float:
        rank = int(self.meta.get("lora_rank") or 0)
        return float(self.meta.get("lora_alpha", rank)) / rank if rank else 0.0


def write_projector(path: str | Path, file: ProjectorFile) -> Path:
    """Write ``file`` as safetensors (float32) atomically; refuses files over :data:`MAX_PROJECTOR_BYTES`."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in file.projector.items()
    }
    tensors.update(
        {LORA_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in file.lora.items()}
    )
    size = sum(t.numel() * 4 for t in tensors.values())
    if size > MAX_PROJECTOR_BYTES:
        raise ConfigError(
            f"the projector file would be {size / 2**20:.1f} MiB, over the {MAX_PROJECTOR_BYTES / 2**20:.0f} MiB "
            "allowed in data/; lower lora_rank or adapt fewer projections (lora_targets)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": PROJECTOR_FORMAT, "headlab": json.dumps(file.meta)})
    tmp.replace(path)
    return path


def read_projector(path: str | Path) -> ProjectorFile:
    """Read a projector file written by :func:`write_projector` (clear errors for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise HeadlabError(f"no projector file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (safe_open is no mapping)
    except Exception as err:  # safetensors raises its own error types
        raise HeadlabError(f"{path} is not a readable safetensors file ({err}); train it again") from None
    if metadata.get("format") != PROJECTOR_FORMAT:
        raise HeadlabError(
            f"{path} is not a headlab projector file (format {metadata.get('format')!r}, expected "
            f"{PROJECTOR_FORMAT!r}); write it with probe.vlm.write_projector"
        )
    return ProjectorFile(
        projector={
            k.removeprefix(PROJECTOR_PREFIX): v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)
        },
        lora={k.removeprefix(LORA_PREFIX): v for k, v in tensors.items() if k.startswith(LORA_PREFIX)},
        meta=json.loads(metadata.get("headlab", "{}")),
    )



def _converted(name: str, fetch_if_missing: bool) -> tuple[Path, dict[str, Any]]:
    """The converted directory of catalogue model ``name`` and its marker, content-checked first."""
    return zoo.verified_cache(zoo.get_spec(name), fetch_if_missing=fetch_if_missing)


def load_parts(
    spec: AssemblySpec, *, fetch_if_missing: bool = True
) -> tuple[torch.nn.Module, torch.nn.Module, Any, ImageSpec, dict[str, Any]]:
    """Load an assembly's image tower and language model (float32, CPU) from the converted cache.

    Returns (vision model, language model, tokenizer, image spec, provenance of both parts).
    """
    vision_dir, vision_marker = _converted(spec.vision, fetch_if_missing)
    language_dir, language_marker = _converted(spec.language, fetch_if_missing)
    vision_model, family, image = vision.load_checkpoint(vision_dir, torch.float32)
    if family != "clip":
        raise HeadlabError(f"{spec.vision} is a {family} model; LLaVA assemblies take a CLIP image tower")
    language_model, tokenizer = load_language_dir(language_dir, torch.float32)
    parts = {}
    for role, name, directory, marker in (
        ("vision", spec.vision, vision_dir, vision_marker),
        ("language", spec.language, language_dir, language_marker),
    ):
        part = zoo.CATALOGUE[name]
        parts[role] = {
            "name": name, "path": str(directory), "weight_sha256": str(marker.get("source_sha256")),
            "caveat": part.caveat, "licence": part.licence,
        }  # fmt: skip
    return vision_model, language_model, tokenizer, image, parts


def load_assembly(
    name: str,
    *,
    projector: str | Path | Literal["fresh"] | None = None,
    device: torch.device,
    dtype: torch.dtype,
    bos: BosMode = "default",
    seed: int = 0,
    fetch_if_missing: bool = True,
) -> LoadedModel:
    """Load assembly ``name`` (e.g. ``scene-llava``) with its trained projector.

    ``projector``: a projector file (default: the assembly's file in ``data/``) or ``"fresh"`` for a
    projector initialised from ``seed`` (what training starts from). A missing file is an error that
    names the training command.
    """
    if name not in ASSEMBLIES:
        raise HeadlabError(f"unknown assembly {name!r}; known: {', '.join(ASSEMBLIES)}")
    spec = ASSEMBLIES[name]
    trained: ProjectorFile | None = None
    projector_path: Path | None = None
    if projector != "fresh":
        projector_path = Path(projector) if projector is not None else spec.projector_path
        if not projector_path.is_file():
            raise HeadlabError(
                f"{name} needs its trained projector {projector_path}, which does not exist yet; train it "
                f"with: {spec.train_command} (a GPU run, see `{spec.train_command} --help`), or load the "
                f"untrained assembly with probe.vlm.load_assembly({name!r}, projector='fresh')"
            )
        trained = read_projector(projector_path)
        wanted = spec.describe_parts()
        got = {k: trained.meta.get(k) for k in wanted}
        if got != wanted:
            raise HeadlabError(
                f"{projector_path} was trained for {got}, not for {name} ({wanted}); train it again with: "
                f"{spec.train_command}"
            )
    vision_model, language_model, tokenizer, image, parts = load_parts(
        spec, fetch_if_missing=fetch_if_missing
    )
    hf_model, tokenizer = assemble(
        vision_model, language_model, tokenizer, seed=seed,
        projector_state=trained.projector if trained is not None else None,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act=spec.projector_hidden_act,
    )  # fmt: skip
    del vision_model, language_model
    lora_merged = 0
    if trained is not None and trained.lora:
        lora_merged = merge_lora(hf_model, trained.lora, trained.lora_scale)
    digest = hashlib.sha256()
    for role in ("vision", "language"):
        digest.update(parts[role]["weight_sha256"].encode())
    projector_sha = cache.sha256_file(projector_path) if projector_path is not None else f"fresh-seed-{seed}"
    digest.update(projector_sha.encode())
    caveats = [
        f"{parts[r]['name']}: {parts[r]['caveat']}" for r in ("vision", "language") if parts[r]["caveat"]
    ]
    if trained is None:
        caveats.append(f"untrained projector (random, seed {seed})")
    if lora_merged:
        caveats.append(f"language model changed by {lora_merged} merged LoRA deltas")
    return wrap_vlm(
        name, "assembled", hf_model, tokenizer, image, device=device, dtype=dtype, bos=bos,
        weight_sha256=digest.hexdigest(), path=None, caveat="; ".join(caveats),
        licence=f"{parts['vision']['name']}: {parts['vision']['licence']}; "
        f"{parts['language']['name']}: {parts['language']['licence']}",
        extra={
            "parts": parts,
            "projector": {
                "path": str(projector_path) if projector_path else None,
                "sha256": projector_sha,
                "trained": trained.meta.get("training") if trained is not None else None,
                "lora_merged": lora_merged,
            },
            "train_command": spec.train_command,
            "parts_meta": spec.describe_parts(),
        },
    )  # fmt: skip


def load_llava_dir(
    directory: Path, *, device: torch.device, dtype: torch.dtype, bos: BosMode = "default"
) -> LoadedModel:
    """Load a local ``LlavaForConditionalGeneration`` checkpoint (config, weights, tokenizer, and
    ``preprocessor_config.json`` if present, else CLIP's preprocessing for the tower's size)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    check_checkpoint_files(directory, tokenizer=True)
    try:
        with quiet_transformers():
            loaded: Any = LlavaForConditionalGeneration.from_pretrained(
                str(directory), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
            )
        model, info = loaded
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise HeadlabError(
            f"could not load the LLaVA checkpoint in {directory}: {str(err).splitlines()[0]}; it needs "
            "config.json, model.safetensors and the tokenizer files written by save_pretrained"
        ) from None
    missing = [
        k for k in info.get("missing_keys", []) if "lm_head" not in k or not model.config.tie_word_embeddings
    ]
    if missing:
        raise HeadlabError(
            f"the checkpoint in {directory} lacks weights: {sorted(missing)[:4]}; they would be random. "
            "Re-save the full model with save_pretrained"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    image = _image_spec(model.config.vision_config, directory / "preprocessor_config.json")
    return wrap_vlm(
        directory.name, "local", model, tokenizer, image, device=device, dtype=dtype, bos=bos,
        weight_sha256=checkpoint_sha256(directory, name_files_if_no_weights=True), path=str(directory),
    )  # fmt: skip


def _image_spec(vision_config: Any, processor_file: Path | None = None) -> ImageSpec:
    if str(getattr(vision_config, "model_type", "")) not in ("clip_vision_model", "clip"):
        raise HeadlabError(
            f"the image tower is a {vision_config.model_type!r} model; probe's LLaVA support covers CLIP towers"
        )
    size = int(
        vision_config.image_size if isinstance(vision_config.image_size, int) else vision_config.image_size[0]
    )
    patch = int(
        vision_config.patch_size if isinstance(vision_config.patch_size, int) else vision_config.patch_size[0]
    )
    arch = vision.ARCHITECTURES["clip"]
    if processor_file is not None and processor_file.is_file():
        try:
            processor = json.loads(processor_file.read_text())
        except json.JSONDecodeError as err:
            raise HeadlabError(f"{processor_file} is not valid JSON ({err}); fix or delete it") from None
        processor = processor.get("image_processor", processor)  # a processor_config nests it
        return ImageSpec.from_processor_config(
            processor, image_size=size, patch_size=patch, prefix_names=arch.prefix_names
        )
    return arch.default_image(size, patch)


def save_checkpoint(model: LoadedModel, directory: str | Path) -> Path:
    """Save a vision-language model as a plain LLaVA checkpoint directory that :func:`load_llava_dir` reads."""
    _require_vlm(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    native: Any = model.native_model
    native.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    if model.image is not None:
        (directory / "preprocessor_config.json").write_text(
            json.dumps(model.image.to_processor_config(), indent=2)
        )
    return directory


# ============================================================================== wrapping


@contextmanager
def _no_processor_download() -> Iterator[None]:
    """Skip the bridge's multimodal-processor step: offline it fails and then pip-installs torchvision."""
    from transformer_lens.model_bridge.sources.transformers import source

    saved = getattr(source, "load_modality_processor", None)
    if saved is None:  # another TransformerLens version: nothing to skip
        yield
        return
    source.load_modality_processor = lambda *args, **kwargs: None
    try:
        yield
    finally:
        source.load_modality_processor = saved


def _force_eager(hf_model: torch.nn.Module) -> None:
    """Eager attention everywhere (the bridge reads patterns; the vision tower returns weights)."""
    top: Any = hf_model.config
    configs: list[Any] = [top, top.text_config, top.vision_config]
    for module in hf_model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in configs):
            configs.append(cfg)
    for cfg in configs:
        cfg._attn_implementation = "eager"


def wrap_vlm(
    name: str, source: str, hf_model: torch.nn.Module, tokenizer: Any, image: ImageSpec | None = None, *,
    device: torch.device, dtype: torch.dtype, bos: BosMode = "default", weight_sha256: str, path: str | None,
    caveat: str = "", licence: str = "", extra: Mapping[str, Any] | None = None,
) -> LoadedModel:  # fmt: skip
    """Wrap a ``LlavaForConditionalGeneration``: frozen, eager, a TransformerBridge, a native twin."""
    from transformer_lens.model_bridge import TransformerBridge

    config: Any = hf_model.config
    if getattr(config, "model_type", None) != "llava":
        raise HeadlabError(f"{name} is a {getattr(config, 'model_type', '?')!r} model, not a LLaVA")
    image = image or _image_spec(config.vision_config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    _force_eager(hf_model)
    # A module tree of its own for the fast path (SDPA, generate), sharing every parameter and buffer.
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    native_model = copy.deepcopy(hf_model, memo=dict(shared))
    bridge_tokenizer = copy.deepcopy(tokenizer)
    if "name_or_path" not in bridge_tokenizer.init_kwargs:
        bridge_tokenizer.init_kwargs.update(name_or_path=name, add_bos_token=True)
    with _no_processor_download():
        bridge = TransformerBridge.boot_transformers(
            path or name, hf_model=hf_model, tokenizer=bridge_tokenizer, device=device, dtype=dtype
        )
    text = config.text_config
    n_heads = int(text.num_attention_heads)
    d_model = int(text.hidden_size)
    n_layers = int(text.num_hidden_layers)
    vision_cfg = config.vision_config
    info = {
        **dict(extra or {}),
        "image_token": IMAGE_TOKEN,
        "image_token_id": int(config.image_token_id),
        "image_seq_length": int(config.image_seq_length),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision": {
            "model_type": vision_cfg.model_type,
            "n_layers": int(vision_cfg.num_hidden_layers),
            "n_heads": int(vision_cfg.num_attention_heads),
            "d_model": int(vision_cfg.hidden_size),
        },
        "modules": {
            "layers": [f"{LAYOUT.layers}.{i}" for i in range(n_layers)],
            "attention": [LAYOUT.block(i, LAYOUT.attention) for i in range(n_layers)],
            "out_proj": [LAYOUT.block(i, LAYOUT.out_proj) for i in range(n_layers)],
            "projector": LAYOUT.projector,
            "vision_tower": LAYOUT.vision_tower,
        },
    }
    expected = int(config.image_seq_length)
    if image.n_patches + (1 if config.vision_feature_select_strategy == "full" else 0) != expected:
        raise HeadlabError(
            f"{name}: image_seq_length is {expected} but a {image.image_size}-pixel image with patch "
            f"{image.patch_size} gives {image.n_patches} patch tokens; the checkpoint's config is inconsistent"
        )
    loaded = LoadedModel(
        name=name, kind=KIND, family="llava", source=source, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
        d_head=int(getattr(text, "head_dim", None) or d_model // n_heads), d_model=d_model,
        n_ctx=int(text.max_position_embeddings), tokenizer=tokenizer, bos=bos_policy(tokenizer, bos),
        device=device, dtype=dtype, hf_model=hf_model, bridge=bridge, native_model=native_model,
        weight_sha256=weight_sha256, path=path, caveat=caveat, licence=licence, extra=info, image=image,
    )  # fmt: skip
    prepare_bridge_generation(loaded)
    return loaded


def _require_vlm(model: LoadedModel) -> None:
    if model.kind != KIND or model.native_model is None:
        raise ConfigError(
            f"{model.name} is a {model.kind} model; probe.vlm works on vision-language models "
            "(probe.load_model('scene-llava'), 'tiny-llava' or a LLaVA checkpoint directory)"
        )


# ============================================================================== prompts


def format_prompt(model: LoadedModel, text: str, *, image: bool = True) -> str:
    """The user turn ``text`` (after the image placeholder) as the model's prompt, ready to answer.

    Uses the tokenizer's chat template (SmolLM2's for ``scene-llava``) with the generation prompt;
    without one, LLaVA-1.5's ``USER: <image>\\n{text} ASSISTANT:``. ``image=False`` leaves the image
    placeholder out (the text-only twin of the same prompt).
    """
    _require_vlm(model)
    content = f"{IMAGE_TOKEN}\n{text}" if image else text
    if getattr(model.tokenizer, "chat_template", None):
        return str(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"USER: {content} ASSISTANT:"


def _expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([image_token_id] * n if t == image_token_id else [t])
    return out


def prompt_ids(model: LoadedModel, text: str, *, image: bool = True) -> list[int]:
    """Token ids of :func:`format_prompt` (no BOS), the image token expanded to ``image_seq_length`` copies."""
    ids = model.tokenizer(format_prompt(model, text, image=image), add_special_tokens=False)["input_ids"]
    image_id = int(model.extra["image_token_id"])
    if image and ids.count(image_id) != 1:
        raise HeadlabError(f"the prompt should hold one image token, found {ids.count(image_id)}")
    return _expand_image_tokens(ids, image_id, int(model.extra["image_seq_length"]))


def encode_prompts(model: LoadedModel, texts: Sequence[str], *, image: bool = True) -> Batch:
    """Prompts as a left-padded :class:`~probe.loading.Batch` under the model's BOS policy."""
    _require_vlm(model)
    return model.batch_from_ids([prompt_ids(model, t, image=image) for t in texts])


def _as_list(prompts: str | Sequence[str], n: int) -> list[str]:
    items = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(items) != n:
        raise ConfigError(f"{len(items)} prompts for {n} images; give one prompt, or one per image")
    return items


# ============================================================================== generation


def image_features(model: LoadedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the projector reads: the tower's hidden states at ``vision_feature_layer`` with the strategy
    applied, ``[N, image_seq_length, d_vision]`` (the computation of ``LlavaModel.get_image_features``
    before its projector, so that training can cache it)."""
    _require_vlm(model)
    native = model.native_model
    assert native is not None
    tower = native.get_submodule(LAYOUT.vision_tower)
    out = tower(pixel_values.to(model.device, model.dtype), output_hidden_states=True)
    layer = model.extra["vision_feature_layer"]
    layers = [layer] if isinstance(layer, int) else list(layer)
    hidden = [out.hidden_states[i] for i in layers]
    if model.extra["vision_feature_select_strategy"] == "default":
        hidden = [h[:, 1:] for h in hidden]
    return torch.cat(hidden, dim=-1)


def _native_generate(
    model: LoadedModel, pixels: torch.Tensor | None, batch: Batch, max_new_tokens: int, scores: bool
) -> Any:
    from transformers import GenerationConfig

    tok = model.tokenizer
    # A fresh config: plain greedy decoding whatever a checkpoint's generation_config.json asks for
    # (sampling, repetition penalties), so that every model is scored the same way.
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        suppress_tokens=[int(model.extra["image_token_id"])],  # never write an image placeholder
        return_dict_in_generate=True,
        output_scores=scores,
    )
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if pixels is not None:
        kwargs["pixel_values"] = pixels.to(model.device, model.dtype)
    with torch.no_grad(), native_attention(model, "sdpa") as native:
        generator: Any = native
        return generator.generate(generation_config=greedy, **kwargs)


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    return range(0, n, batch_size)


def _image_list(images: ImageInput) -> Any:
    """Images as something sliceable whose items are one image each (pixel tensors stay tensors)."""
    if isinstance(images, torch.Tensor):
        return images if images.dim() == 4 else images.unsqueeze(0)
    if hasattr(images, "ndim") and getattr(images, "ndim", 0) == 3:  # one [H, W, 3] array
        return [images]
    if hasattr(images, "ndim") or isinstance(images, Sequence):
        return images
    return [images]


def _pixels(model: LoadedModel, images: Sequence[Any], start: int, stop: int) -> torch.Tensor:
    """Pixel values of ``images[start:stop]`` (preprocessed per batch, so memory stays one batch)."""
    chunk = images[start:stop]
    return model.preprocess(
        chunk if isinstance(chunk, torch.Tensor) or hasattr(chunk, "ndim") else list(chunk)
    )


def generate(
    model: LoadedModel,
    images: ImageInput | None,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``prompts`` (one, or one per image) about ``images``, decoded without special
    tokens. ``images=None`` asks text-only prompts (no image placeholder); then ``prompts`` is a list."""
    _require_vlm(model)
    from tqdm.auto import tqdm

    items = _image_list(images) if images is not None else None
    if items is None and isinstance(prompts, str):
        raise ConfigError("without images give a list of prompts (one per answer)")
    n = len(items) if items is not None else len(prompts)
    texts = _as_list(prompts, n)
    out: list[str] = []
    for start in tqdm(_batches(n, batch_size), desc="generate", disable=not progress, leave=False):
        rows = texts[start : start + batch_size]
        batch = encode_prompts(model, rows, image=items is not None)
        px = _pixels(model, items, start, start + batch_size) if items is not None else None
        result = _native_generate(model, px, batch, max_new_tokens, scores=False)
        new = result.sequences[:, batch.input_ids.shape[1] :]
        out += [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


@dataclass(frozen=True)
class YesNoAnswer:
    """A generated answer and, at its first step, logit(first token of "Yes") − logit(first token of "No")."""

    text: str
    yes_minus_no: float


def answer_yes_no(
    model: LoadedModel,
    images: ImageInput,
    questions: str | Sequence[str],
    *,
    max_new_tokens: int = 4,
    batch_size: int = 16,
    progress: bool = False,
) -> list[YesNoAnswer]:
    """Greedy answers to yes/no ``questions`` (one per image), with the first step's Yes−No logit margin."""
    _require_vlm(model)
    from tqdm.auto import tqdm

    items = _image_list(images)
    texts = _as_list(questions, len(items))
    tok = model.tokenizer
    yes_id = tok("Yes", add_special_tokens=False)["input_ids"][0]
    no_id = tok("No", add_special_tokens=False)["input_ids"][0]
    out: list[YesNoAnswer] = []
    for start in tqdm(_batches(len(texts), batch_size), desc="yes/no", disable=not progress, leave=False):
        batch = encode_prompts(model, texts[start : start + batch_size])
        px = _pixels(model, items, start, start + batch_size)
        result = _native_generate(model, px, batch, max_new_tokens, scores=True)
        first = result.scores[0].float()
        margin = (first[:, yes_id] - first[:, no_id]).tolist()
        decoded = tok.batch_decode(result.sequences[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        out += [YesNoAnswer(t.strip(), float(m)) for t, m in zip(decoded, margin, strict=True)]
    return out


# ============================================================================== hooks on the native modules


@dataclass
class HeadOutputs:
    """Per-head outputs before ``o_proj`` recorded by :func:`capture_head_outputs`.

    ``outputs[layer]`` lists one tensor ``[batch, T, heads, d_head]`` per forward pass of the native
    model in the block (generation: the prompt, then one ``T = 1`` step per new token), on the CPU.
    """

    layers: list[int]
    n_heads: int
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    fired: dict[int, int] = field(default_factory=dict)

    def check_fired(self) -> None:
        silent = [layer for layer in self.layers if not self.fired.get(layer)]
        if silent:
            raise CaptureError(
                f"o_proj hooks of layers {silent[:6]} never fired; the native model did not run them"
            )


@contextmanager
def capture_head_outputs(
    model: LoadedModel, layers: Sequence[int] | None = None, *, keep: bool = True
) -> Iterator[HeadOutputs]:
    """Record the language model's per-head outputs (``o_proj`` inputs) at every native forward in the block.

    Torch pre-hooks on the native modules, so this works under SDPA and with a KV cache (inside
    :func:`generate`); the bridge's ``blocks.{l}.attn.hook_z`` gives the same tensors on eager runs.
    Hooks are removed on exit, also after an error; ``keep=False`` only counts calls.
    """
    _require_vlm(model)
    native = model.native_model
    assert native is not None
    chosen = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [layer for layer in chosen if not 0 <= layer < model.n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; {model.name} has layers 0 to {model.n_layers - 1}")
    record = HeadOutputs(layers=chosen, n_heads=model.n_heads, outputs={layer: [] for layer in chosen})
    handles = []

    def make(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            record.fired[layer] = record.fired.get(layer, 0) + 1
            if keep:
                z = args[0].detach()
                record.outputs[layer].append(z.reshape(*z.shape[:-1], model.n_heads, -1).to("cpu"))

        return hook

    try:
        for layer in chosen:
            module = native.get_submodule(LAYOUT.block(layer, LAYOUT.out_proj))
            handles.append(module.register_forward_pre_hook(make(layer)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


# ============================================================================== projectors of loaded models


def parts_meta(model: LoadedModel) -> dict[str, Any]:
    """What a projector file trained on ``model`` must record to fit it again (see :class:`ProjectorFile`)."""
    _require_vlm(model)
    if "parts_meta" in model.extra:
        return dict(model.extra["parts_meta"])
    return {
        "vision": f"{model.name} (image tower)",
        "language": f"{model.name} (language model)",
        "vision_feature_layer": model.extra["vision_feature_layer"],
        "vision_feature_select_strategy": model.extra["vision_feature_select_strategy"],
        "projector_hidden_act": str(getattr(model.hf_model, "config").projector_hidden_act),  # noqa: B009
        "image_token": IMAGE_TOKEN,
    }


def apply_projector(model: LoadedModel, projector: str | Path | ProjectorFile) -> LoadedModel:
    """Put a projector file's weights into ``model`` (in place) and merge its LoRA deltas; returns it.

    The file must have been trained for the same parts (its metadata is checked). The weight
    checksum is recomputed.
    """
    _require_vlm(model)
    file = projector if isinstance(projector, ProjectorFile) else read_projector(projector)
    wanted = parts_meta(model)
    got = {k: file.meta.get(k) for k in wanted}
    if got != wanted:
        raise HeadlabError(f"this projector was trained for {got}, not for {model.name} ({wanted})")
    native = model.native_model
    assert native is not None
    module = native.get_submodule(LAYOUT.projector)
    with torch.no_grad():
        for key, param in module.state_dict().items():
            if key not in file.projector or tuple(file.projector[key].shape) != tuple(param.shape):
                raise HeadlabError(f"the projector file's {key!r} does not fit {model.name}'s projector")
            param.copy_(file.projector[key].to(param.dtype))
    if file.lora:
        merge_lora(native, file.lora, file.lora_scale)
    model.weight_sha256 = state_sha256(model)
    return model


# ============================================================================== helpers for training


def projector_module(model: LoadedModel) -> torch.nn.Module:
    """The projector of the native model (its parameters are the bridged model's too)."""
    _require_vlm(model)
    assert model.native_model is not None
    return model.native_model.get_submodule(LAYOUT.projector)


def state_sha256(model: LoadedModel) -> str:
    """sha256 of the model's current weights (after training changed them in place)."""
    assert model.native_model is not None
    return _state_sha256(model.native_model)


# ============================================================================== model sources


def build_tiny_llava(seed: int = 0, words: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """A LLaVA of the tiny CLIP tower (layer -2, CLS dropped: 16 image tokens) and the tiny Llama."""
    tower, _ = build_tiny_clip_vision(seed)
    language, tok = build_tiny_llama(seed, words)
    return assemble(tower, language, tok, seed=seed)


register_tiny(
    TinyBuilder(
        "tiny-llava",
        "vision-language",
        "llava",
        "random LLaVA: tiny-clip-vision (layer -2, 16 image tokens) -> 2-layer MLP projector -> tiny-llama",
        build_tiny_llava,
    )
)


def _is_tiny(request: ModelRequest) -> bool:
    builder = TINY_BUILDERS.get(request.name)
    return builder is not None and builder.kind == KIND


def _load_tiny(request: ModelRequest) -> LoadedModel:
    model, tokenizer = TINY_BUILDERS[request.name].build(request.seed, request.tiny_words)
    return wrap_vlm(
        request.name,
        "tiny",
        model,
        tokenizer,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        weight_sha256=_state_sha256(model),
        path=None,
        licence="n/a (random weights)",
    )


def _load_assembly(request: ModelRequest) -> LoadedModel:
    return load_assembly(
        request.name,
        device=request.device,
        dtype=request.dtype,
        bos=request.bos,
        fetch_if_missing=request.fetch_if_missing,
    )


def _is_llava_dir(request: ModelRequest) -> bool:
    return request.path.is_dir() and is_llava_config(request.config)


def _load_llava_dir(request: ModelRequest) -> LoadedModel:
    return load_llava_dir(request.path, device=request.device, dtype=request.dtype, bos=request.bos)


register(ModelSource("tiny-vision-language", TINY + 20, "a tiny random LLaVA built in memory", _is_tiny, _load_tiny))
register(
    ModelSource(
        "assembly",
        ASSEMBLY,
        "a vision-language model assembled from two catalogue models and a projector trained here",
        lambda request: request.name in ASSEMBLIES,
        _load_assembly,
    )
)
register(
    ModelSource(
        "llava-directory",
        DIRECTORY + 10,
        "a local LLaVA checkpoint directory (model_type llava)",
        _is_llava_dir,
        _load_llava_dir,
    )
)
