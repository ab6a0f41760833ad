"""One needle test: the prompt around the context (chat or plain), fitted to an exact number of
tokens, with the token spans of the needle, its answer and the haystack. See docs/analyses/retrieval.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyses.tasks.needles.haystack import ROTATIONS, _fit, _Order, _Orders, _too_long_for_source
from analyses.tasks.needles.spans import _decode, _encode, find_span
from analyses.tasks.needles.templates import PROTOCOLS, Needle, Protocol
from probe.errors import ConfigError, ContextTooLongError
from probe.loading import BosPolicy, LoadedModel, bos_policy

MIN_HAYSTACK_TOKENS = 16


@dataclass(frozen=True)
class NeedleTest:
    """One prompt of the grid: (length, depth, needle). Spans are ``[start, end)`` token indices.

    ``prompt_ids`` include the BOS token when the model's policy (or its chat template) puts one
    first. ``answer_ids == prompt_ids[answer_span[0]:answer_span[1]]``: the answer's tokens as they
    appear in this context (with their leading space merged in, where the tokenizer does that).
    ``haystack_span`` is the whole context (haystack with the needle inside it). ``protocol``: what
    the question asks for, the whole ``needle`` sentence or its ``answer``; :attr:`reference` is the
    text a generation is scored against and :attr:`scored_span` its span.
    """

    prompt_ids: list[int]
    needle_span: tuple[int, int]
    answer_span: tuple[int, int]
    haystack_span: tuple[int, int]
    answer: str
    answer_ids: list[int]
    needle: str
    question: str
    answer_prefix: str  # "" when the prompt ends at the question (plain) or the generation prompt (chat)
    kind: str
    place: str
    length: int  # asked
    depth: float  # asked
    n_tokens: int  # == len(prompt_ids); equals ``length`` unless no haystack cut could give it
    depth_actual: float  # haystack tokens before the needle / haystack tokens (needle excluded)
    seed: int
    needle_index: int
    chat: bool
    bos: bool  # the first prompt token is the BOS token
    novel_answer_tokens: bool  # the answer's tokens were checked to occur nowhere else in the prompt
    protocol: Protocol = "answer"

    @property
    def reference(self) -> str:
        """What the model is asked to produce: the needle sentence or the answer."""
        return self.needle if self.protocol == "needle" else self.answer

    @property
    def scored_span(self) -> tuple[int, int]:
        """The token span of :attr:`reference` in the prompt."""
        return self.needle_span if self.protocol == "needle" else self.answer_span

    def describe(self) -> dict[str, Any]:
        """The test's scalars (no token ids), one row of a results table."""
        return {
            "needle_index": self.needle_index,
            "kind": self.kind,
            "place": self.place,
            "answer": self.answer,
            "length": self.length,
            "depth": self.depth,
            "n_tokens": self.n_tokens,
            "depth_actual": self.depth_actual,
            "needle_start": self.needle_span[0],
            "needle_end": self.needle_span[1],
            "answer_start": self.answer_span[0],
            "answer_end": self.answer_span[1],
            "answer_tokens": len(self.answer_ids),
            "chat": self.chat,
            "bos": self.bos,
            "answer_prefix": self.answer_prefix,
            "seed": self.seed,
            "protocol": self.protocol,
        }


class _Rejected(ConfigError):
    """The needle cannot be used with this tokenizer (its answer's tokens are not unique)."""


@dataclass(frozen=True)
class _Target:
    tokenizer: Any
    name: str
    bos: BosPolicy
    n_ctx: int | None


def _target(model_or_tokenizer: Any, max_context: int | None) -> _Target:
    if isinstance(model_or_tokenizer, LoadedModel):
        m = model_or_tokenizer
        if m.kind != "language":
            raise ConfigError(f"{m.name} is a {m.kind} model; needle tests need a language model")
        limit = m.n_ctx if max_context is None else min(m.n_ctx, max_context)
        return _Target(m.tokenizer, m.name, m.bos, limit)
    tok = model_or_tokenizer
    if not callable(tok) or not hasattr(tok, "decode"):
        raise ConfigError(f"expected a LoadedModel or a tokenizer, got {type(tok).__name__}")
    name = getattr(tok, "name_or_path", "") or type(tok).__name__
    return _Target(tok, name, bos_policy(tok, "default"), max_context)


@dataclass(frozen=True)
class _Frame:
    """The prompt around the context: ``head + context + mid``; ``lead``: the BOS id to put first, if any."""

    head: str
    mid: str
    lead: list[int]
    chat: bool
    prefix: str
    question: str


def _frame(
    target: _Target, needle: Needle, chat: bool | None, answer_prefix: bool, protocol: Protocol
) -> _Frame:
    tok = target.tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise ConfigError(
            f"chat=True but {target.name}'s tokenizer has no chat template; use chat=None or False"
        )
    use_chat = has_template if chat is None else chat
    asked, lead_in = needle.ask(protocol)
    prefix = lead_in if answer_prefix else ""
    question = f"\n\nQuestion: {asked}"
    if use_chat:
        sentinel = "\ue000HEADLAB-CONTEXT\ue000"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": sentinel + question}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            raise ConfigError(f"{target.name}'s chat template does not keep the message text; use chat=False")
        head, tail = rendered.split(sentinel)
        if question not in tail:
            raise ConfigError(f"{target.name}'s chat template changes the question; use chat=False")
        mid = tail + prefix
    else:
        head, mid = "", question + "\nAnswer:" + (" " + prefix if prefix else "")
    bos_tok = getattr(tok, "bos_token", None)
    template_bos = bool(use_chat and bos_tok and head.startswith(bos_tok))
    lead = (
        [target.bos.token_id]
        if target.bos.prepend and target.bos.token_id is not None and not template_bos
        else []
    )
    return _Frame(head=head, mid=mid, lead=lead, chat=use_chat, prefix=prefix, question=asked)


@dataclass
class _Built:
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    text: str
    context: tuple[int, int]  # characters of the context in text
    needle_start: int  # character


def _assemble(target: _Target, order: _Order, frame: _Frame, needle: Needle, depth: float, m: int) -> _Built:
    hay, bounds = order.cut(m)
    b = min(bounds, key=lambda x: (abs(x[1] - depth * m), x[1]))[0]  # nearest; the earlier on a tie
    if b == 0:
        context, offset = needle.sentence + (" " + hay if hay else ""), 0
    else:
        sep = "" if hay[b - 1].isspace() else " "
        context, offset = hay[:b] + sep + needle.sentence + hay[b:], b + len(sep)
    text = frame.head + context + frame.mid
    ids, offsets = _encode(target.tokenizer, text)
    if offsets is not None:
        offsets = [(0, 0)] * len(frame.lead) + offsets
    return _Built(
        ids=frame.lead + ids,
        offsets=offsets,
        text=text,
        context=(len(frame.head), len(frame.head) + len(context)),
        needle_start=len(frame.head) + offset,
    )


_INTERN: dict[int, int] = {}


def _check_length(target: _Target, length: int) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"lengths are prompt sizes in tokens (positive integers), got {length!r}")
    if target.n_ctx is not None and length > target.n_ctx:
        raise ContextTooLongError(target.name, length, target.n_ctx)


def _fit_prompt(
    target: _Target, orders: _Orders, frame: _Frame, needle: Needle, length: int, depth: float
) -> tuple[int, _Built]:
    """The prompt of exactly ``length`` tokens (trying up to :data:`ROTATIONS` haystack texts), else
    the closest shorter one: ``(its token count, the prompt)``."""
    bare = len(_assemble(target, orders[0], frame, needle, depth, 0).ids)
    if length - bare < MIN_HAYSTACK_TOKENS:
        raise ConfigError(
            f"a prompt of {length} tokens cannot hold the needle and question ({bare} tokens) and a haystack "
            f"of at least {MIN_HAYSTACK_TOKENS}; ask for a length of at least {bare + MIN_HAYSTACK_TOKENS}"
        )
    best: tuple[int, Any] | None = None
    for rotate in range(ROTATIONS):
        order = orders[rotate]
        if length - bare > order.capacity:
            raise _too_long_for_source(target.tokenizer, length - bare, order.capacity)

        def build(m: int, order: _Order = order) -> tuple[int, _Built]:
            b = _assemble(target, order, frame, needle, depth, m)
            return len(b.ids), b

        found = _fit(build, length, length - bare, order.capacity)
        if found[0] <= length and (best is None or found[0] > best[0]):
            best = found
        if found[0] == length:
            break
    if best is None:
        raise ConfigError(
            f"could not fit the needle and question into {length} tokens; ask for a longer length"
        )
    return best


@dataclass(frozen=True)
class _Spans:
    """Where the needle, its answer and the whole context lie in the prompt's tokens."""

    needle: tuple[int, int]
    answer: tuple[int, int]
    haystack: tuple[int, int]


def _locate(target: _Target, needle: Needle, built: _Built, ids: list[int], novel: bool) -> _Spans:
    """The token spans of the prompt ``ids``; :class:`_Rejected` if the answer's tokens merge with
    the text around them or (``novel``) occur elsewhere in the prompt."""
    tok = target.tokenizer

    def span(a: int, b: int) -> tuple[int, int]:
        return find_span(tok, ids, a, b, text=built.text, offsets=built.offsets)

    a0 = built.needle_start + needle.answer_offset
    answer_span = span(a0, a0 + len(needle.answer))
    needle_span = span(built.needle_start, built.needle_start + len(needle.sentence))
    haystack_span = span(*built.context)
    answer_ids = ids[answer_span[0] : answer_span[1]]
    if _decode(tok, answer_ids).strip() != needle.answer:
        raise _Rejected(
            f"the answer {needle.answer!r} shares a token with the text around it "
            f"({_decode(tok, answer_ids)!r}); draw another needle"
        )
    if novel:
        elsewhere = set(ids[: answer_span[0]]) | set(ids[answer_span[1] :])
        if elsewhere.intersection(answer_ids):
            raise _Rejected(f"a token of the answer {needle.answer!r} occurs elsewhere in the prompt")
    return _Spans(needle=needle_span, answer=answer_span, haystack=haystack_span)


def _build_test(
    target: _Target,
    orders: _Orders,
    needle: Needle,
    length: int,
    depth: float,
    *,
    seed: int,
    needle_index: int,
    chat: bool | None,
    answer_prefix: bool,
    novel: bool,
    protocol: Protocol = "answer",
) -> NeedleTest:
    _check_length(target, length)
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depths are fractions of the haystack between 0 and 1, got {depth!r}")
    frame = _frame(target, needle, chat, answer_prefix, protocol)
    n, built = _fit_prompt(target, orders, frame, needle, length, depth)
    # One int object per token id across all tests (a 32K prompt: 0.26 MB of pointers, not 1.2 MB).
    ids = [_INTERN.setdefault(i, i) for i in built.ids]
    spans = _locate(target, needle, built, ids, novel)
    hay_len = (spans.haystack[1] - spans.haystack[0]) - (spans.needle[1] - spans.needle[0])
    depth_actual = (spans.needle[0] - spans.haystack[0]) / hay_len if hay_len > 0 else 0.0
    return NeedleTest(
        prompt_ids=ids,
        needle_span=spans.needle,
        answer_span=spans.answer,
        haystack_span=spans.haystack,
        answer=needle.answer,
        answer_ids=ids[spans.answer[0] : spans.answer[1]],
        needle=needle.sentence,
        question=frame.question,
        answer_prefix=frame.prefix,
        kind=needle.kind,
        place=needle.place,
        length=length,
        depth=float(depth),
        n_tokens=n,
        depth_actual=min(1.0, max(0.0, depth_actual)),
        seed=seed,
        needle_index=needle_index,
        chat=frame.chat,
        bos=bool(ids) and target.bos.token_id is not None and ids[0] == target.bos.token_id,
        novel_answer_tokens=novel,
        protocol=protocol,
    )


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")


def make_test(
    model_or_tokenizer: Any,
    length: int,
    depth: float,
    needle: Needle,
    *,
    seed: int = 0,
    needle_index: int = 0,
    chat: bool | None = None,
    answer_prefix: bool = True,
    novel_answer_tokens: bool = True,
    max_context: int | None = None,
    protocol: Protocol = "needle",
) -> NeedleTest:
    """One test: ``needle`` at ``depth`` in a prompt of exactly ``length`` tokens.

    The haystack's paragraph order depends on ``(seed, needle_index)``, as in :func:`make_grid`.
    Raises :class:`~probe.errors.ConfigError` if the answer's tokens occur elsewhere in the prompt
    (with ``novel_answer_tokens``) or merge with the text around them.
    """
    check_protocol(protocol)
    target = _target(model_or_tokenizer, max_context)
    return _build_test(
        target,
        _Orders(target.tokenizer, f"{seed}:{needle_index}"),
        needle,
        length,
        depth,
        seed=seed,
        needle_index=needle_index,
        chat=chat,
        answer_prefix=answer_prefix,
        novel=novel_answer_tokens,
        protocol=protocol,
    )
