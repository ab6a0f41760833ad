"""The grid of needle tests: every (needle, length, depth), needle-major."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from analyses.tasks.needles.draw import _Drawer
from analyses.tasks.needles.haystack import _Orders
from analyses.tasks.needles.prompts import (
    NeedleTest,
    _build_test,
    _check_length,
    _Rejected,
    _target,
    check_protocol,
)
from analyses.tasks.needles.templates import Protocol
from probe.errors import ConfigError


def iter_grid(
    model_or_tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 3,
    seed: int = 0,
    *,
    answer_words: int = 3,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
    progress: bool = False,
    protocol: Protocol = "needle",
    exclude: Sequence[str] = (),
) -> Iterator[NeedleTest]:
    """The tests of :func:`make_grid`, one at a time (a long grid need not be held in memory)."""
    check_protocol(protocol)
    target = _target(model_or_tokenizer, max_context)
    lengths, depths = list(lengths), [float(d) for d in depths]
    if not lengths or not depths:
        raise ConfigError("give at least one length and one depth")
    for length in lengths:
        _check_length(target, length)
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ConfigError(f"depths are fractions of the haystack between 0 and 1, got {bad}")
    if n_needles < 1:
        raise ConfigError(f"n_needles must be at least 1, got {n_needles}")
    from tqdm.auto import tqdm

    drawer = _Drawer(seed, target.tokenizer, answer_words, novel_answer_tokens, exclude)
    bar = tqdm(
        total=n_needles * len(lengths) * len(depths),
        desc="needles",
        unit="test",
        disable=not progress,
        leave=False,
    )
    try:
        for index in range(n_needles):
            orders = _Orders(target.tokenizer, f"{seed}:{index}", hint=max(lengths))
            for attempt in range(100):
                needle = drawer.draw(index)
                try:
                    tests = [
                        _build_test(
                            target,
                            orders,
                            needle,
                            length,
                            depth,
                            seed=seed,
                            needle_index=index,
                            chat=chat,
                            answer_prefix=answer_prefix,
                            novel=novel_answer_tokens,
                            protocol=protocol,
                        )
                        for length in lengths
                        for depth in depths
                    ]
                except _Rejected as err:
                    if attempt == 99:
                        raise ConfigError(
                            f"100 needles in a row were unusable: {err}; try another seed, fewer answer_words, "
                            "or novel_answer_tokens=False (a byte-level tokenizer cannot have unseen answer tokens)"
                        ) from err
                    continue
                bar.update(len(tests))
                yield from tests
                break
    finally:
        bar.close()


def make_grid(
    model_or_tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_needles: int = 3,
    seed: int = 0,
    *,
    answer_words: int = 3,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
    progress: bool = False,
    protocol: Protocol = "needle",
    exclude: Sequence[str] = (),
) -> list[NeedleTest]:
    """Every (needle, length, depth) test, needle-major, then length, then depth.

    ``model_or_tokenizer``: a :class:`~probe.loading.LoadedModel` (its tokenizer, BOS policy and
    context length apply) or a bare tokenizer (BOS as the tokenizer adds it; no context limit unless
    ``max_context``). ``lengths``: prompt sizes in tokens, met exactly; a length beyond the model's
    context raises :class:`~probe.errors.ContextTooLongError`, one too small for the needle and
    question a :class:`~probe.errors.ConfigError`. ``depths``: fractions in ``[0, 1]``. Each needle has
    its own haystack order, drawn from ``(seed, needle index)``. The paper's grid is 20 lengths x 10
    depths x 3 needles. ``protocol``: the question asks for the whole ``needle`` sentence (the
    paper's task) or for its ``answer``. ``exclude``: answers not to draw (another grid's).
    """
    return list(
        iter_grid(
            model_or_tokenizer,
            lengths,
            depths,
            n_needles,
            seed,
            answer_words=answer_words,
            chat=chat,
            answer_prefix=answer_prefix,
            novel_answer_tokens=novel_answer_tokens,
            max_context=max_context,
            progress=progress,
            protocol=protocol,
            exclude=exclude,
        )
    )
