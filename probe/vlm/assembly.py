"""Assembling a LLaVA from a CLIP image tower and a causal language model, and merging LoRA deltas.

See docs/models.md (vision-language models).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from probe.assemblies import IMAGE_TOKEN, FeatureStrategy
from probe.errors import ConfigError, HeadlabError

KIND: Literal["vision-language"] = "vision-language"


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
        vision_model.config,
        lm_config,
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
    )
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
