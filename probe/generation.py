"""Generation through the bridge: its KV cache is checked at load, and its handles refused if wrong.

``model.generate`` (the native module, SDPA; :func:`generate` is the same) is the recommended
handle. The bridge's attention only extends the KV cache when it arrives as ``past_key_values``,
which transformers 5.24 renamed to ``cache``: :func:`install_cache_alias` passes it under both
names, :func:`cache_problem` checks once per load that a prefill through the bridge fills the
cache, and where it does not, :func:`refuse_bridge_generation` makes the bridge's generation
handles raise a one-line error naming the handles that work, instead of returning wrong tokens.

See docs/models.md (generating text).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from probe.errors import HeadlabError
from probe.model import Batch, LoadedModel

_ALIAS_FLAG = "_headlab_cache_alias"


def _alias_cache(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    if cache is not None and kwargs.get("past_key_values") is None:
        kwargs["past_key_values"] = cache
    return args, kwargs


def install_cache_alias(bridge: torch.nn.Module) -> int:
    """Give every bridge attention component the KV cache under ``past_key_values`` too.

    A forward pre-hook (kept for the model's lifetime, idempotent) copies a ``cache`` keyword into
    ``past_key_values`` when only the former is given. Returns how many components it covers.
    """
    count = 0
    for module in bridge.modules():
        if not hasattr(module, "_update_kv_cache"):
            continue
        if not getattr(module, _ALIAS_FLAG, False):
            module.register_forward_pre_hook(_alias_cache, with_kwargs=True)
            setattr(module, _ALIAS_FLAG, True)
        count += 1
    return count


def _seq_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer


@torch.no_grad()
def cache_problem(model: LoadedModel) -> str | None:
    """Why cached generation through the bridge would be wrong, or None when a prefill fills the cache.

    Runs two tokens through ``model.hf_model`` (the bridged module) with a cache and checks that the
    cache holds both afterwards. Costs one two-token forward.
    """
    ids = torch.tensor([[_probe_token(model)] * 2], device=model.device)
    out = model.hf_model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    got = _seq_length(cache)
    if got == ids.shape[1]:
        return None
    return (
        f"a {ids.shape[1]}-token prefill through the TransformerBridge left {got} positions in the KV "
        "cache, so cached generation through the bridge would see one token per step"
    )


def _probe_token(model: LoadedModel) -> int:
    tok = model.tokenizer
    for candidate in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def refuse_bridge_generation(model: LoadedModel, problem: str) -> None:
    """Make ``model.hf_model.generate`` (with a cache) and the bridge's generate methods raise.

    ``hf_model.generate(..., use_cache=False)`` stays allowed: without a cache every step runs the
    whole sequence through the bridge, which is right (and slow).
    """
    from importlib.metadata import version

    why = (
        f"{problem} (transformers {version('transformers')}, transformer-lens {version('transformer-lens')}); "
        "generate with model.generate(...) or model.native_model.generate(...) instead, which run the "
        "same weights without the bridge, or pass use_cache=False to model.hf_model.generate"
    )
    hf_generate: Any = model.hf_model.generate

    @functools.wraps(hf_generate)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache", True) is not False:
            raise GenerationError(f"model.hf_model.generate with a KV cache: {why}")
        return hf_generate(*args, **kwargs)

    def refused(name: str) -> Any:
        def method(*args: Any, **kwargs: Any) -> Any:
            raise GenerationError(f"model.bridge.{name}: {why}")

        return method

    object.__setattr__(model.hf_model, "generate", guarded)
    if model.bridge is not None:
        for name in ("generate", "generate_stream", "hf_generate"):
            if hasattr(model.bridge, name):
                object.__setattr__(model.bridge, name, refused(name))


class GenerationError(HeadlabError, RuntimeError):
    """A generation handle that would give wrong tokens; the message names the one that works."""


def prepare_bridge_generation(model: LoadedModel) -> None:
    """Install the cache alias and check it; refuse the bridge's handles if the cache stays empty."""
    if model.bridge is None:
        return
    install_cache_alias(model.bridge)
    problem = cache_problem(model)
    if problem is not None:
        refuse_bridge_generation(model, problem)
    model.extra["bridge_generation"] = "ok" if problem is None else f"refused: {problem}"


def generate(
    model: LoadedModel,
    prompts: str | Sequence[str] | Batch,
    *,
    max_new_tokens: int = 32,
    use_cache: bool = True,
    do_sample: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Greedy continuation (by default) of ``prompts`` by the native model with its SDPA kernel.

    The same as ``model.generate(prompts, ...)`` (:meth:`probe.model.LoadedModel.generate`): texts
    or a :class:`~probe.model.Batch` in, token ids ``[batch, prompt + new]`` out, exactly as
    transformers' ``generate`` returns them on the same checkpoint.
    """
    return model.generate(
        prompts, max_new_tokens=max_new_tokens, use_cache=use_cache, do_sample=do_sample, **kwargs
    )
