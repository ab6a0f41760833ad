"""LongRoPE (Phi-3 128K, Phi-3.5, Phi-4 mini): position frequencies that depend on the sequence's length.

A LongRoPE model rotates queries and keys with its *short* factors while a sequence is at most
``S = original_max_position_embeddings`` tokens long and with its *long* factors beyond. transformers
picks the factors per forward, from the largest position id in the whole batch, so a short prompt
left-padded beside a long one is rotated as a long one: its numbers depend on its batch. And a
generation that crosses ``S`` would keep keys rotated with the short factors; transformers' ``generate``
therefore recomputes the whole cache at the step that crosses it.

:func:`install` makes the choice per sequence: each row of a batch is rotated with the factors of
its own length (its largest position id + 1), by transformers' own rotary forward run once per
group of rows; a lone sequence gets exactly transformers' numbers. :func:`switch_length` tells the
decoders where to recompute, as ``generate`` does. See docs/models.md (LongRoPE).
"""

from __future__ import annotations

import types

import torch

_ORIGINAL = "_headlab_rope_forward"  # the module's own forward, kept on the module when patched


def _longrope_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """transformers' own LongRoPE rotary modules (not a bridge's wrapper, which forwards to one)."""
    return [
        m
        for m in model.modules()
        if type(m).__module__.startswith("transformers.")
        and vars(m).get("rope_type") == "longrope"
        and _limit(m) is not None
    ]


def _limit(module: torch.nn.Module) -> int | None:
    config = vars(module).get("config")
    params = getattr(config, "rope_parameters", None) or {}
    value = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return value if isinstance(value, int) and value > 0 else None


def switch_length(model: torch.nn.Module) -> int | None:
    """``S``: a sequence longer than this is rotated with the long factors; None without LongRoPE."""
    return next((limit for m in _longrope_modules(model) if (limit := _limit(m)) is not None), None)


def _per_row(
    self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary forward with each row's factors chosen from its own length."""
    original = getattr(self, _ORIGINAL)
    limit = _limit(self)
    if position_ids.shape[0] < 2 or limit is None:
        return original(x, position_ids)
    long = position_ids.amax(dim=-1) + 1 > limit  # [b]
    n_long = int(long.sum())
    if n_long in (0, position_ids.shape[0]):  # one regime: transformers' own choice is each row's
        return original(x, position_ids)
    cos_short, sin_short = original(x, position_ids[~long])
    cos_long, sin_long = original(x, position_ids[long])
    cos = cos_short.new_empty((position_ids.shape[0], *cos_short.shape[1:]))
    sin = torch.empty_like(cos)
    cos[~long], sin[~long] = cos_short, sin_short
    cos[long], sin[long] = cos_long, sin_long
    return cos, sin


def install(model: torch.nn.Module) -> int:
    """Make every LongRoPE rotary module of ``model`` choose its factors per row; returns how many
    were patched (0 for other position schemes). Installing twice is a no-op."""
    patched = 0
    for module in _longrope_modules(model):
        if _ORIGINAL in vars(module):
            continue
        setattr(module, _ORIGINAL, module.forward)
        module.forward = types.MethodType(_per_row, module)
        patched += 1
    return patched


def needs_recompute(limit: int | None, cached: int, total: int) -> bool:
    """Whether a decode step whose cache holds ``cached`` positions, bringing the sequence to
    ``total`` tokens, crosses the LongRoPE switch ``limit`` (:func:`switch_length`): then, as
    transformers' ``generate`` does, the whole sequence is run again (its cached keys were rotated
    with the short factors)."""
    return limit is not None and cached <= limit < total


def check_consistent(
    model: torch.nn.Module | None,
    lengths: list[int],
    max_new_tokens: int,
    who: str,
    *,
    recomputes: bool,
    prefill_chunk: int | None = None,
) -> None:
    """Refuse, before any forward, a generation by ``who`` whose LongRoPE rotation would not be each
    sequence's own: a sequence crossing the switch where ``who`` cannot recompute its cache
    (``recomputes`` false: a cut cache), rows of one batch crossing it at different steps
    (``generate`` recomputes the whole batch at the first one only), or a chunked prefill whose early
    chunks end below the switch of a prompt above it.
    """
    from probe.errors import ConfigError

    limit = None if model is None else switch_length(model)
    if limit is None:
        return
    # the last step feeds the token before the last new one: n + max_new_tokens - 1 tokens in all
    crossing = {n for n in lengths if needs_recompute(limit, cached=n, total=n + max_new_tokens - 1)}
    if crossing and not recomputes:
        raise ConfigError(
            f"this LongRoPE model switches to its long factors past {limit} tokens and a prompt of "
            f"{min(crossing)} plus {max_new_tokens} new tokens crosses it, where {who}'s cut cache cannot be "
            f"recomputed; give a prompt longer than {limit} tokens or at most {limit + 1 - min(crossing)} new tokens"
        )
    # generate recomputes the whole batch when its padded width crosses: a shorter row crossing later
    # keeps keys rotated with the short factors, where alone it would have been recomputed
    if any(n < max(lengths) for n in crossing):
        raise ConfigError(
            f"this LongRoPE model switches to its long factors past {limit} tokens, and prompts of lengths "
            f"{sorted(set(lengths))} with {max_new_tokens} new tokens cross it at different steps, which "
            f"{who} does not rotate as each alone; generate them one at a time"
        )
    if prefill_chunk is not None and max(lengths) > limit and prefill_chunk <= limit:
        raise ConfigError(
            f"this LongRoPE model rotates a prompt longer than {limit} tokens with its long factors, but "
            f"prefill chunks of {prefill_chunk} tokens would rotate the first ones with the short factors; "
            f"give prefill_chunk=None or at least {limit + 1}"
        )
