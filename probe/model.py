"""The loaded model: :class:`LoadedModel`, the one wrapper every part of headlab studies, and its inputs.

A :class:`LoadedModel` holds a language, vision or vision-language model with its head counts,
tokenizer, BOS policy (:class:`BosPolicy`), device, dtype and provenance; :class:`Batch` is what
``encode`` makes of texts. :func:`probe.loading.load_model` builds one from a model source (see
docs/models.md). This module imports only leaf modules of probe (errors, images, kernels, devicemap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from probe import devicemap, rope
from probe.errors import ConfigError, ContextTooLongError
from probe.images import ImageInput, ImageSpec
from probe.kernels import attention_modules, fast_implementation, native_attention

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

BosMode = Literal["default", "always", "never"]


@dataclass(frozen=True)
class BosPolicy:
    """Whether a BOS token is put in front of every sequence, and which.

    ``mode="default"`` follows the tokenizer's own default (GPT-2: none; Llama and Gemma: BOS), as
    the sink papers do; ``always``/``never`` override it. ``prepend`` is the resolved decision.
    """

    mode: BosMode
    prepend: bool
    token_id: int | None
    token: str | None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "prepend": self.prepend, "token_id": self.token_id, "token": self.token}


@dataclass
class Batch:
    """Token ids left-padded to a common length; ``lengths`` are the real lengths (BOS included)."""

    input_ids: torch.Tensor  # [batch, T]
    attention_mask: torch.Tensor  # [batch, T], 1 = real token
    lengths: torch.Tensor  # [batch]

    @property
    def pad_offsets(self) -> torch.Tensor:
        return self.input_ids.shape[1] - self.lengths


@dataclass
class LoadedModel:
    name: str
    kind: Literal["language", "vision", "vision-language"]
    family: str
    source: str  # embedded | tiny | local | gguf | hub | memory (probe.wrap)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    tokenizer: Any
    bos: BosPolicy
    device: torch.device
    dtype: torch.dtype
    hf_model: torch.nn.Module  # the transformers model, its modules replaced by the bridge's
    bridge: TransformerBridge | None
    native_model: torch.nn.Module | None  # same weights, original modules: fast, hook-free path
    weight_sha256: str
    path: str | None = None
    caveat: str = ""
    licence: str = ""
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image: ImageSpec | None = None  # vision models: token grid and preprocessing
    # module name -> device when accelerate spread the model over several devices (then ``device``
    # is where inputs go: the input embedding's device); None on one device
    device_map: dict[str, str] | None = None

    def layer_devices(self) -> list[torch.device]:
        """The device each layer's attention computes on (``device`` for all without a device map)."""
        if not self.device_map or self.native_model is None:
            return [self.device] * self.n_layers
        return devicemap.layer_devices(
            self.native_model, attention_modules(self), self.device_map, self.device
        )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window (keys a query sees, itself included) of ``layer``, or None where it
        attends to the whole prefix."""
        types = self.layer_types or []
        if self.sliding_window and layer < len(types) and types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    # ---------------------------------------------------------------- heads
    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for plain multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        return head // self.group_size

    # ---------------------------------------------------------------- inputs
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """uint8 RGB images ``[H, W, 3]`` -> pixel values ``[N, 3, S, S]`` (vision models only)."""
        if self.image is None:
            raise ConfigError(f"{self.name} is a {self.kind} model and takes text; use model.encode(texts)")
        return self.image.preprocess(images)

    def _require_text(self) -> None:
        if self.kind == "vision" or self.tokenizer is None:
            raise ConfigError(
                f"{self.name} is a {self.kind} model and takes images, not text; "
                "make pixel values with model.preprocess(images)"
            )

    def check_context(self, n_tokens: int) -> None:
        self._require_text()  # a vision model's token count is fixed by its image size
        if n_tokens > self.n_ctx:
            raise ContextTooLongError(self.name, n_tokens, self.n_ctx, bos=self.bos.prepend)

    def encode(self, texts: list[str], *, max_tokens: int | None = None) -> Batch:
        """Tokenize under the model's BOS policy, truncate to ``max_tokens``, left-pad."""
        self._require_text()
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return self.batch_from_ids(rows, max_tokens=max_tokens)

    def batch_from_ids(self, rows: list[list[int]], *, max_tokens: int | None = None) -> Batch:
        """Apply the BOS policy to raw token rows (without BOS), truncate, left-pad."""
        self._require_text()
        if not rows:
            raise ConfigError("no sequences given; pass at least one text")
        prefix = [self.bos.token_id] if self.bos.prepend and self.bos.token_id is not None else []
        full = [prefix + list(r) for r in rows]
        if max_tokens is not None:
            full = [r[:max_tokens] for r in full]
        lengths = [len(r) for r in full]
        if min(lengths) == 0:
            raise ConfigError("an input sequence is empty after tokenization; give non-empty texts")
        width = max(lengths)
        self.check_context(width)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = torch.full((len(full), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(full), width), dtype=torch.long)
        for i, r in enumerate(full):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return Batch(ids.to(self.device), mask.to(self.device), torch.tensor(lengths, device=self.device))

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str] | Batch,
        *,
        max_new_tokens: int = 32,
        use_cache: bool = True,
        do_sample: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy continuation (by default) of ``prompts`` by the native model with its SDPA kernel
        (eager where SDPA cannot compute the model's attention: soft-capped logits, ALiBi masks).

        ``prompts`` are texts (encoded under the model's BOS policy and left-padded) or a
        :class:`Batch`. Returns the token ids ``[batch, prompt + new]`` exactly as transformers'
        ``generate`` returns them on the same checkpoint. Further keyword arguments go to
        ``generate``. Vision-language models: pass ``pixel_values`` with prompts made by
        :func:`probe.vlm.encode_prompts`, or use :func:`probe.vlm.generate`.
        """
        if self.kind == "vision":
            raise ConfigError(
                f"{self.name} is an image encoder and does not generate text; use probe.vision.embed(model, pixels)"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if isinstance(prompts, Batch):
            batch = prompts
        else:
            batch = self.encode([prompts] if isinstance(prompts, str) else list(prompts))
        self.check_context(int(batch.input_ids.shape[1]) + max_new_tokens)
        rope.check_consistent(
            self.native_model,
            [int(n) for n in batch.lengths.tolist()],
            max_new_tokens,
            "generate",
            recomputes=True,
        )
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with native_attention(self, fast_implementation(self)) as native:
            generator: Any = native
            out = generator.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_cache=use_cache,
                pad_token_id=pad,
                **kwargs,
            )
        return out if isinstance(out, torch.Tensor) else out.sequences

    # ---------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """What a run records about the model (manifest.json)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "source": self.source,
            "path": self.path,
            "weight_sha256": self.weight_sha256,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "n_ctx": self.n_ctx,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "bos": self.bos.describe(),
            "layer_types": self.layer_types,
            "sliding_window": self.sliding_window,
            "caveat": self.caveat,
            "licence": self.licence,
            **({"image": self.image.describe()} if self.image is not None else {}),
            **({"device_map": dict(self.device_map)} if self.device_map else {}),
        }


def bos_policy(tokenizer: Any, mode: BosMode) -> BosPolicy:
    if mode not in ("default", "always", "never"):
        raise ConfigError(f"unknown BOS mode {mode!r}; choose default, always or never")
    token_id = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    tokenizer_adds = token_id is not None and len(with_special) > len(without) and with_special[0] == token_id
    prepend = {"default": tokenizer_adds, "always": True, "never": False}[mode]
    if prepend and token_id is None:
        raise ConfigError(
            "BOS mode 'always' asked for, but this tokenizer has no BOS token; use default or never"
        )
    return BosPolicy(mode=mode, prepend=prepend, token_id=token_id, token=tokenizer.bos_token)
