"""Needle-in-a-haystack generator: exact lengths, spans, unique answers, prose haystacks, scoring."""

from __future__ import annotations

import re
from typing import Any

import pytest

from analyses.tasks import needles
from analyses.tasks.needles import Needle, NeedleTest, find_span, rouge1_recall, rouge_tokens
from probe import zoo
from probe.errors import ConfigError, ContextTooLongError
from probe.loading import LoadedModel
from probe.tiny import byte_tokenizer

REAL = ("smollm2-135m", "gemma3-270m")
_TOKENIZERS: dict[str, Any] = {}


def tokenizer(name: str) -> Any:
    """The real models' own tokenizers (from the converted cache, fetched on first use) or the byte one."""
    if name not in _TOKENIZERS:
        if name == "byte":
            _TOKENIZERS[name] = byte_tokenizer(prepend_bos=True)
        else:
            from transformers import AutoTokenizer

            directory = zoo.converted_dir(zoo.CATALOGUE[name]) or zoo.fetch(name)
            _TOKENIZERS[name] = AutoTokenizer.from_pretrained(str(directory))
    return _TOKENIZERS[name]


def novel(name: str) -> bool:
    return name != "byte"  # every byte occurs in prose: no answer can have unseen tokens


def decode(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


def haystack_text(tok: Any, t: NeedleTest) -> str:
    """The context without the needle."""
    before = decode(tok, t.prompt_ids[t.haystack_span[0] : t.needle_span[0]])
    after = decode(tok, t.prompt_ids[t.needle_span[1] : t.haystack_span[1]])
    return before + after


class SlowTokenizer:
    """A tokenizer without offset mappings (like a Python 'slow' tokenizer): find_span must decode."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bos_token, self.bos_token_id, self.chat_template = inner.bos_token, inner.bos_token_id, None
        self.name_or_path = "slow-wrapper"

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        if kwargs.get("return_offsets_mapping"):
            raise AssertionError("a slow tokenizer has no offsets")
        return self.inner(text, **kwargs)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self.inner.decode(ids, **kwargs))


def word_tokenizer() -> Any:
    """Whitespace-split words: punctuation stays glued to the word before it ("falcon.")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "[UNK]",
        "The",
        "passphrase",
        "is",
        "amber",
        "falcon",
        "falcon.",
        "is:amber",
        '"amber',
        'falcon"',
    ]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


# ---------------------------------------------------------------------------------------- scoring


def test_rouge1_recall_known_cases() -> None:
    assert rouge1_recall("amber falcon lantern", "amber falcon lantern") == 1.0
    assert rouge1_recall(" amber falcon", "amber falcon lantern") == pytest.approx(2 / 3)
    assert rouge1_recall("The passphrase is Amber, FALCON; lantern.", "amber falcon lantern") == 1.0
    assert rouge1_recall("lantern falcon amber", "amber falcon lantern") == 1.0  # unigrams: order is free
    assert rouge1_recall("amber falcon", "amber amber falcon") == pytest.approx(2 / 3)  # counts are clipped
    assert rouge1_recall("amber amber amber", "amber falcon") == 0.5  # not above the paper's gate
    assert not rouge1_recall("amber amber amber", "amber falcon") > needles.RECALL_GATE
    assert rouge1_recall("", "amber falcon") == 0.0
    assert rouge1_recall("falcons", "falcon") == 0.0  # no stemming
    with pytest.raises(ConfigError, match="no words"):
        rouge1_recall("amber", " ... ")


# ---------------------------------------------------------------------------------------- find_span


@pytest.mark.parametrize("name", [*REAL, "byte"])
@pytest.mark.parametrize(
    "text",
    [
        "The passphrase is amber falcon.",  # after a space, punctuation after
        "The passphrase is:amber falcon!",  # no space before
        "amber falcon",  # at the very start, nothing after
        'It said "amber falcon", twice.',  # quotes and a comma around it
        "Line one.\namber falcon\nLine three.",  # after a newline
    ],
)
def test_find_span_covers_exactly_the_answer(name: str, text: str) -> None:
    tok = tokenizer(name)
    start = text.index("amber falcon")
    end = start + len("amber falcon")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s, e = find_span(tok, ids, start, end, text=text)
    assert decode(tok, ids[s:e]).strip() == "amber falcon"
    assert "amber" not in decode(tok, ids[s + 1 : e]) and "falcon" not in decode(
        tok, ids[s : e - 1]
    )  # minimal
    # The same span without offsets (incremental decoding), and shifted by one behind a BOS token.
    assert find_span(SlowTokenizer(tok), ids, start, end, text=text) == (s, e)
    bos = [tok.bos_token_id]
    assert find_span(tok, bos + ids, start, end, text=text) == (s + 1, e + 1)
    assert find_span(SlowTokenizer(tok), bos + ids, start, end, text=text) == (s + 1, e + 1)


@pytest.mark.parametrize("name", REAL)
def test_answer_ids_in_context_differ_from_standalone_ids(name: str) -> None:
    """Why spans are found by characters: "amber" alone and " amber" after a word are other tokens."""
    tok = tokenizer(name)
    text = "The passphrase is amber falcon."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    alone = tok("amber falcon", add_special_tokens=False)["input_ids"]
    assert not any(ids[i : i + len(alone)] == alone for i in range(len(ids)))
    s, e = find_span(tok, ids, text.index("amber"), len(text) - 1, text=text)
    assert decode(tok, ids[s:e]) == " amber falcon"


def test_find_span_with_punctuation_glued_to_the_answer() -> None:
    tok = word_tokenizer()
    text = "The passphrase is amber falcon."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["The", "passphrase", "is", "amber", "falcon."]
    assert find_span(tok, ids, 18, 30, text=text) == (3, 5)  # "falcon." is in the span, whole
    text2 = "The passphrase is:amber falcon."
    ids2 = tok(text2, add_special_tokens=False)["input_ids"]
    assert find_span(tok, ids2, 18, 30, text=text2) == (2, 4)  # "is:amber" holds the answer's start
    assert find_span(tok, ids, 18, 30, offsets=[(0, 3), (4, 14), (15, 17), (18, 23), (24, 31)]) == (3, 5)


def test_find_span_rejects_bad_input() -> None:
    tok = tokenizer("byte")
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="not the tokenization"):
        find_span(tok, ids, 0, 1, text="xyz")
    with pytest.raises(ConfigError, match="empty"):
        find_span(tok, ids, 2, 2, text="abc")
    with pytest.raises(ConfigError, match="offsets"):
        find_span(tok, ids, 0, 1, offsets=[(0, 1)])


# ---------------------------------------------------------------------------------------- needles


def test_needles_are_seeded_distinct_and_of_every_kind() -> None:
    a = needles.make_needles(12, seed=3)
    assert a == needles.make_needles(12, seed=3)
    assert a != needles.make_needles(12, seed=4)
    assert len({n.answer for n in a}) == 12 and len({n.place for n in a}) == 12
    assert {n.kind for n in a} == {t.kind for t in needles.TEMPLATES} and len(needles.TEMPLATES) >= 3
    for n in a:
        assert len(n.answer.split()) == 3
        assert n.sentence[n.answer_offset : n.answer_offset + len(n.answer)] == n.answer
        assert n.sentence.startswith(n.prefix) and n.place in n.question and n.answer not in n.question
    assert all(len(n.answer.split()) == 5 for n in needles.make_needles(3, answer_words=5))


@pytest.mark.parametrize("name", REAL)
def test_answer_words_are_filtered_to_tokens_unseen_in_the_source(name: str) -> None:
    tok = tokenizer(name)
    stats = needles.source_stats(tok)
    assert stats["answer_words"] >= 50
    vocabulary = needles.haystack._source(tok).vocabulary
    for n in needles.make_needles(20, seed=0, tokenizer=tok):
        ids = tok(" " + n.answer, add_special_tokens=False)["input_ids"]
        assert not vocabulary.intersection(ids), n.answer


def test_byte_tokenizer_needs_novel_answer_tokens_off() -> None:
    with pytest.raises(ConfigError, match="novel_answer_tokens=False"):
        needles.make_grid(tokenizer("byte"), [400], [0.5], 1)


# ---------------------------------------------------------------------------------------- source


def test_source_is_distinct_prose_without_needle_words() -> None:
    paragraphs = needles.haystack_paragraphs()
    sentences = [" ".join(s.lower().split()) for p in paragraphs for s in p]
    assert len(sentences) == len(set(sentences))  # no sentence twice in the whole source
    keywords = re.compile(r"\b(passphrase|code name|expedition|greeted|sailed)\b", re.IGNORECASE)
    assert not any(keywords.search(s) for p in paragraphs for s in p)
    assert len(paragraphs) > 1000


@pytest.mark.parametrize("name", REAL)
def test_source_holds_enough_prose_for_a_32k_haystack(name: str) -> None:
    stats = needles.source_stats(tokenizer(name))
    assert stats["tokens"] >= 40_000 and stats["tokens"] > 2 * 32_768


@pytest.mark.parametrize("name", [*REAL, "byte"])
def test_build_haystack_is_exact_and_seeded(name: str) -> None:
    tok = tokenizer(name)
    for n in (1, 37, 500, 3000):
        text = needles.build_haystack(tok, n, seed=5)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == n
    assert needles.build_haystack(tok, 300, seed=5) == needles.build_haystack(tok, 300, seed=5)
    assert needles.build_haystack(tok, 300, seed=5) != needles.build_haystack(tok, 300, seed=6)


# ---------------------------------------------------------------------------------------- the grid


def grid(name: str, lengths: list[int], depths: list[float], **kw: Any) -> list[NeedleTest]:
    kw.setdefault("novel_answer_tokens", novel(name))
    return needles.make_grid(tokenizer(name), lengths, depths, **kw)


@pytest.mark.parametrize(
    ("name", "chat"), [("smollm2-135m", None), ("smollm2-135m", False), ("gemma3-270m", None)]
)
def test_real_tokenizers_meet_every_length_exactly(name: str, chat: bool | None) -> None:
    lengths = [256, 257, 300, 512, 1000, 1024, 2047, 4096, 8192]
    tests = grid(name, lengths, [0.0, 0.3, 1.0], n_needles=1, seed=2, chat=chat)
    assert len(tests) == len(lengths) * 3
    for t in tests:
        assert t.n_tokens == t.length == len(t.prompt_ids), t.describe()


def test_byte_tokenizer_meets_every_length_exactly() -> None:
    tests = grid("byte", [240, 241, 333, 512, 999, 2048], [0.0, 0.5, 1.0], n_needles=2, seed=1)
    assert all(t.n_tokens == t.length == len(t.prompt_ids) for t in tests)


@pytest.mark.parametrize("name", [*REAL, "byte"])
def test_spans_decode_to_the_needle_and_answer(name: str) -> None:
    tok = tokenizer(name)
    for t in grid(name, [300, 1500], [0.0, 0.5, 1.0], n_needles=3, seed=0):
        a, b = t.answer_span
        assert t.prompt_ids[a:b] == t.answer_ids
        assert decode(tok, t.answer_ids).strip() == t.answer
        assert decode(tok, t.prompt_ids[t.needle_span[0] : t.needle_span[1]]).strip() == t.needle
        assert t.haystack_span[0] <= t.needle_span[0] <= a < b <= t.needle_span[1] <= t.haystack_span[1]
        assert t.question in decode(tok, t.prompt_ids[t.haystack_span[1] :])


@pytest.mark.parametrize("name", REAL)
def test_answer_tokens_occur_nowhere_else_in_the_prompt(name: str) -> None:
    for t in grid(name, [512, 4096], [0.0, 0.5, 1.0], n_needles=3, seed=0):
        assert t.novel_answer_tokens
        haystack = (
            t.prompt_ids[t.haystack_span[0] : t.needle_span[0]]
            + t.prompt_ids[t.needle_span[1] : t.haystack_span[1]]
        )
        assert not set(t.answer_ids) & set(haystack)
        rest = t.prompt_ids[: t.answer_span[0]] + t.prompt_ids[t.answer_span[1] :]
        assert not set(t.answer_ids) & set(rest)


def test_an_answer_made_of_haystack_words_is_rejected() -> None:
    tok = tokenizer("gemma3-270m")
    needle = needles.TEMPLATES[0].fill("Quillhaven", "the function returns")
    with pytest.raises(ConfigError, match="occurs elsewhere"):
        needles.make_test(tok, 600, 0.5, needle)
    t = needles.make_test(tok, 600, 0.5, needle, novel_answer_tokens=False)  # allowed when asked for
    assert decode(tok, t.answer_ids).strip() == "the function returns" and not t.novel_answer_tokens


def test_an_answer_glued_to_punctuation_is_rejected() -> None:
    needle = Needle(
        "passphrase", "Quillhaven", "amber falcon", "The passphrase is amber falcon.", "?", "", 18
    )
    with pytest.raises(ConfigError, match="shares a token"):
        needles.make_test(word_tokenizer(), 200, 0.5, needle, novel_answer_tokens=False)


@pytest.mark.parametrize(("name", "length"), [("smollm2-135m", 2000), ("gemma3-270m", 2000), ("byte", 8000)])
def test_depth_0_and_1_put_the_needle_first_and_last(name: str, length: int) -> None:
    tests = grid(name, [length], [0.0, 0.25, 0.5, 0.75, 1.0], n_needles=1, seed=0)
    first, *middle, last = tests
    assert first.needle_span[0] == first.haystack_span[0] and first.depth_actual == 0.0
    assert last.needle_span[1] == last.haystack_span[1] and last.depth_actual == 1.0
    starts = [t.needle_span[0] for t in tests]
    assert starts == sorted(starts) and len(set(starts)) == 5
    for t in middle:  # the nearest sentence boundary: within a sentence or two of the depth asked
        assert abs(t.depth_actual - t.depth) < 0.08, t.describe()


@pytest.mark.parametrize("name", REAL)
def test_haystack_is_real_prose_with_no_paragraph_twice(name: str) -> None:
    tok = tokenizer(name)
    t = grid(name, [8192], [0.5], n_needles=1, seed=7)[0]
    text = haystack_text(tok, t)
    assert t.needle not in text and text.count(t.answer.split()[0]) == 0
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) > 20
    assert len(paragraphs) == len(set(paragraphs))
    sentences = [s for p in paragraphs for s in needles.haystack._sentences(p) if len(s.split()) >= 3]
    assert len(sentences) == len(set(sentences))
    source = {" ".join(p) for p in needles.haystack_paragraphs()}
    assert all(p in source for p in paragraphs[:-1])  # verbatim, all but the last one, which is cut short


def test_grid_is_deterministic_per_seed_and_seeds_differ() -> None:
    tok = tokenizer("smollm2-135m")
    a = grid("smollm2-135m", [512, 1024], [0.0, 0.5], n_needles=2, seed=11)
    assert a == grid("smollm2-135m", [512, 1024], [0.0, 0.5], n_needles=2, seed=11)
    b = grid("smollm2-135m", [512, 1024], [0.0, 0.5], n_needles=2, seed=12)
    assert [t.prompt_ids for t in a] != [t.prompt_ids for t in b]
    assert {t.answer for t in a}.isdisjoint({t.answer for t in b})
    assert haystack_text(tok, a[0])[:200] != haystack_text(tok, b[0])[:200]  # another paragraph order
    # needles of one grid have their own haystacks; one needle's haystacks are cut from one text
    assert haystack_text(tok, a[0])[:200] != haystack_text(tok, a[4])[:200]
    assert haystack_text(tok, a[2]).startswith(haystack_text(tok, a[0])[:500])
    assert [t.needle_index for t in a] == [0, 0, 0, 0, 1, 1, 1, 1] and [t.seed for t in a] == [11] * 8


def test_chat_template_and_answer_prefix() -> None:
    """The answer protocol: the question asks for the answer and the answer turn starts with the
    needle's own lead-in."""
    smol, gemma = tokenizer("smollm2-135m"), tokenizer("gemma3-270m")
    t = grid("smollm2-135m", [400], [0.5], n_needles=1, protocol="answer")[0]
    text = decode(smol, t.prompt_ids)
    assert t.chat and text.startswith("<|im_start|>system\n")
    assert text.endswith(f"Question: {t.question}<|im_end|>\n<|im_start|>assistant\n{t.answer_prefix}")
    assert t.answer_prefix == t.needle[: t.needle.index(t.answer)].strip()
    assert t.reference == t.answer and t.scored_span == t.answer_span and t.protocol == "answer"
    assert (
        t.bos and t.prompt_ids.count(smol.bos_token_id) == 3
    )  # the template's own <|im_start|>s, none added
    bare = grid("smollm2-135m", [400], [0.5], n_needles=1, answer_prefix=False, protocol="answer")[0]
    assert bare.answer_prefix == "" and decode(smol, bare.prompt_ids).endswith("<|im_start|>assistant\n")
    plain = grid("smollm2-135m", [400], [0.5], n_needles=1, chat=False, protocol="answer")[0]
    assert not plain.chat and decode(smol, plain.prompt_ids).endswith(f"\nAnswer: {plain.answer_prefix}")
    g = grid("gemma3-270m", [400], [0.5], n_needles=1, protocol="answer")[0]  # a base model: no chat template
    assert (
        not g.chat
        and g.bos
        and g.prompt_ids[0] == gemma.bos_token_id
        and g.prompt_ids.count(gemma.bos_token_id) == 1
    )
    assert decode(gemma, g.prompt_ids).endswith(f"\n\nQuestion: {g.question}\nAnswer: {g.answer_prefix}")
    with pytest.raises(ConfigError, match="no chat template"):
        grid("gemma3-270m", [400], [0.5], n_needles=1, chat=True)


@pytest.mark.parametrize("name", REAL)
def test_the_needle_protocol_asks_for_the_whole_needle_by_its_place_alone(name: str) -> None:
    """The default (the paper's task): the question names the needle's place and asks for the
    sentence; the lead-in opens a quotation; the reference is the needle, its span the scored one."""
    tok = tokenizer(name)
    for t in grid(name, [400], [0.0, 0.5, 1.0], n_needles=2):
        assert t.protocol == "needle" and t.reference == t.needle and t.scored_span == t.needle_span
        assert t.question == needles.NEEDLE_QUESTION.format(place=t.place)
        assert t.answer_prefix == needles.NEEDLE_PREFIX.format(place=t.place)
        tail = decode(tok, t.prompt_ids[t.haystack_span[1] :])
        assert tail.rstrip().endswith(t.answer_prefix.rstrip())
        # nothing of the needle but its place is asked or led in with: the model must retrieve it
        asked = rouge_tokens(t.question + " " + t.answer_prefix)
        content = (
            set(rouge_tokens(t.needle))
            - set(rouge_tokens(t.place))
            - {"the", "of", "to", "is", "was", "that"}
        )
        assert not content & set(asked), content & set(asked)
        start, end = t.needle_span
        assert decode(tok, t.prompt_ids[start:end]).strip() == t.needle and end - start > 10
    with pytest.raises(ConfigError, match="protocol must be"):
        grid(name, [400], [0.5], n_needles=1, protocol="sentence")


def test_a_grid_can_exclude_another_grids_answers() -> None:
    first = grid("smollm2-135m", [300], [0.5], n_needles=3, seed=4)
    again = grid("smollm2-135m", [300], [0.5], n_needles=3, seed=4, exclude=[t.answer for t in first])
    assert {t.answer for t in first}.isdisjoint({t.answer for t in again})
    assert [t.kind for t in first] == [t.kind for t in again]  # the same kinds and places, other answers


def test_loaded_models_bos_policy_and_context_limit(tiny_llama: LoadedModel, tiny_gpt2: LoadedModel) -> None:
    with_bos = needles.make_grid(tiny_llama, [300], [0.5], 1, novel_answer_tokens=False)[0]
    assert with_bos.bos and with_bos.prompt_ids[0] == tiny_llama.bos.token_id and with_bos.n_tokens == 300
    without = needles.make_grid(tiny_gpt2, [256], [0.5], 1, novel_answer_tokens=False)[0]
    assert not without.bos and without.n_tokens == 256
    with pytest.raises(ContextTooLongError, match=r"longer than tiny-gpt2 allows \(256\)"):
        needles.make_grid(tiny_gpt2, [256, 257], [0.5], 1, novel_answer_tokens=False)
    with pytest.raises(ContextTooLongError, match=r"\(1000\)"):
        needles.make_grid(tokenizer("gemma3-270m"), [1001], [0.5], 1, max_context=1000)


def test_bad_grid_arguments_are_explained() -> None:
    tok = tokenizer("gemma3-270m")
    with pytest.raises(ConfigError, match="cannot hold the needle and question") as err:
        needles.make_grid(tok, [40], [0.5], 1)
    found = re.search(r"at least (\d+)$", str(err.value))
    assert found
    least = int(found.group(1))
    assert needles.make_grid(tok, [least], [0.5], 1)[0].n_tokens == least  # the length it names works
    with pytest.raises(ConfigError, match="between 0 and 1"):
        needles.make_grid(tok, [500], [1.5], 1)
    with pytest.raises(ConfigError, match="positive integers"):
        needles.make_grid(tok, [0], [0.5], 1)
    with pytest.raises(ConfigError, match=r"only .* tokens of haystack"):
        needles.make_grid(tok, [500_000], [0.5], 1)
