"""IOI and Colored Objects prompt generators: determinism, distinctness, positions, alignment."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from analyses.tasks import colored_objects as co
from analyses.tasks import ioi
from probe import zoo
from probe.errors import ConfigError
from probe.loading import bos_policy
from tests.conftest import real_model

REAL = ("smollm2-135m", "gemma3-270m")
_TOKENIZERS: dict[str, Any] = {}


def tokenizer(name: str) -> Any:
    """The real models' own tokenizers (from the converted cache), without loading weights."""
    if name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        directory = zoo.converted_dir(zoo.CATALOGUE[name]) or zoo.fetch(name)
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(str(directory))
    return _TOKENIZERS[name]


def decode1(tok: Any, token_id: int) -> str:
    return str(tok.decode([token_id], clean_up_tokenization_spaces=False))


# ---------------------------------------------------------------------------------------- IOI


def test_paper_example_template_and_orders() -> None:
    tok = tokenizer("smollm2-135m")
    abba = ioi.build_item(
        ioi.resolve_target(tok), 0, "ABBA", "Mary", "John", "store", "drink", ("Anna", "Kevin", "Lisa")
    )
    baba = ioi.build_item(
        ioi.resolve_target(tok), 0, "BABA", "Mary", "John", "store", "drink", ("Anna", "Kevin", "Lisa")
    )
    assert abba is not None and baba is not None
    assert abba.text == "When Mary and John went to the store, John gave a drink to"
    assert baba.text == "When John and Mary went to the store, John gave a drink to"
    assert abba.answer == " Mary"
    assert abba.io_pos < abba.s1_pos < abba.s2_pos  # ABBA: IO named first
    assert baba.s1_pos < baba.io_pos < baba.s2_pos  # BABA: S named first
    assert abba.corrupt("abc").text == "When Anna and Kevin went to the store, Lisa gave a drink to"
    assert abba.corrupt("s2_io_flip").text == "When Mary and John went to the store, Mary gave a drink to"


def test_ioi_deterministic_distinct_and_seeds_differ() -> None:
    tok = tokenizer("smollm2-135m")
    a, b = ioi.make_ioi(tok, 300, seed=0), ioi.make_ioi(tok, 300, seed=0)
    assert a == b
    c = ioi.make_ioi(tok, 300, seed=1)
    assert [x.text for x in a] != [x.text for x in c]
    assert len({x.text for x in a}) == 300
    assert {x.order for x in a} == {"ABBA", "BABA"}
    assert sum(x.order == "ABBA" for x in a) == 150
    assert {x.template for x in a} == set(range(len(ioi.TEMPLATES)))


def test_ioi_thousands_of_items() -> None:
    tok = tokenizer("smollm2-135m")
    assert len(ioi.TEMPLATES) >= 10
    assert ioi.capacity(tok) > 1_000_000
    items = ioi.make_ioi(tok, 2000, seed=3)
    assert len({x.text for x in items}) == 2000


@pytest.mark.parametrize("name", REAL)
def test_ioi_lexicon_single_tokens(name: str) -> None:
    tok = tokenizer(name)
    lex = ioi.usable_words(tok)
    assert len(lex.names) >= 90 and len(lex.places) >= 25 and len(lex.objects) >= 25
    for word in (*lex.names, *lex.places, *lex.objects):
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, word
        assert decode1(tok, ids[0]).strip() == word


@pytest.mark.parametrize("name", REAL)
def test_ioi_positions_and_corruptions(name: str) -> None:
    tok = tokenizer(name)
    items = ioi.make_ioi(tok, 150, seed=0)
    bos = tok.bos_token_id if name == "gemma3-270m" else None  # Gemma adds BOS by default, SmolLM2 not
    for it in items:
        assert (
            list(it.ids)
            == ([bos] if bos is not None else []) + tok(it.text, add_special_tokens=False)["input_ids"]
        )
        assert it.bos == (bos is not None)
        assert decode1(tok, it.ids[it.io_pos]) == " " + it.io
        assert decode1(tok, it.ids[it.s1_pos]) == " " + it.s
        assert decode1(tok, it.ids[it.s2_pos]) == " " + it.s
        assert it.end_pos == len(it.ids) - 1 and decode1(tok, it.ids[it.end_pos]) == " to"
        assert it.io != it.s
        if it.order == "ABBA":
            assert it.io_pos < it.s1_pos < it.s2_pos
        else:
            assert it.s1_pos < it.io_pos < it.s2_pos
        abc, flip = it.corrupt("abc"), it.corrupt("s2_io_flip")
        for c in (abc, flip):
            assert len(c.ids) == len(it.ids)
            assert (
                list(c.ids)
                == list(it.ids[: int(it.bos)]) + tok(c.text, add_special_tokens=False)["input_ids"]
            )
        diff = {i for i, (x, y) in enumerate(zip(it.ids, abc.ids, strict=True)) if x != y}
        assert diff == {it.io_pos, it.s1_pos, it.s2_pos}
        new = [decode1(tok, abc.ids[p]).strip() for p in (it.io_pos, it.s1_pos, it.s2_pos)]
        assert new == list(abc.names) and len(set(new)) == 3 and not set(new) & {it.io, it.s}
        diff = {i for i, (x, y) in enumerate(zip(it.ids, flip.ids, strict=True)) if x != y}
        assert diff == {it.s2_pos} and flip.ids[it.s2_pos] == it.io_id


@pytest.mark.parametrize("name", REAL)
def test_ioi_group_by_template_has_one_length_per_template(name: str) -> None:
    items = ioi.make_ioi(tokenizer(name), 200, seed=0)
    groups = ioi.group_by_template(items)
    assert sorted(t for t, _ in groups) == sorted({it.template for it in items})  # one length each
    for (template, length), group in groups.items():
        assert all(it.template == template and it.n_tokens == length for it in group)
        torch.tensor([it.ids for it in group])  # stacks without padding


def test_ioi_bos_policy_of_a_loaded_model_is_used() -> None:
    model = real_model("smollm2-135m")
    plain = ioi.make_ioi(model, 30, seed=0)
    assert not model.bos.prepend and all(not it.bos for it in plain)  # SmolLM2's default: no BOS
    always = dataclasses.replace(model, bos=bos_policy(model.tokenizer, "always"))
    with_bos = ioi.make_ioi(always, 30, seed=0)
    for a, b in zip(plain, with_bos, strict=True):
        assert b.bos and b.ids == (model.tokenizer.bos_token_id, *a.ids) and b.text == a.text
        assert (b.io_pos, b.s1_pos, b.s2_pos, b.end_pos) == (
            a.io_pos + 1,
            a.s1_pos + 1,
            a.s2_pos + 1,
            a.end_pos + 1,
        )
        assert b.corrupt("abc").ids == (model.tokenizer.bos_token_id, *a.corrupt("abc").ids)
    co_items = co.make_colored_objects(always, 5, seed=0)
    assert all(it.bos and it.ids[0] == model.tokenizer.bos_token_id for it in co_items)


def test_ioi_config_errors() -> None:
    tok = tokenizer("smollm2-135m")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            ioi.make_ioi(tok, bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown IOI template 99"):
        ioi.make_ioi(tok, 5, seed=0, templates=[0, 99])
    with pytest.raises(ConfigError, match="orders"):
        ioi.make_ioi(tok, 5, seed=0, orders=("ABAB",))
    with pytest.raises(ConfigError, match="at most"):
        ioi.make_ioi(tok, ioi.capacity(tok, templates=[5]) + 1, seed=0, templates=[5])
    with pytest.raises(ConfigError, match="unknown corruption"):
        ioi.make_ioi(tok, 1, seed=0)[0].corrupt("xyz")  # type: ignore[arg-type]
    only = ioi.make_ioi(tok, 20, seed=0, templates=[2], orders=("BABA",))
    assert {(it.template, it.order) for it in only} == {(2, "BABA")}


# ---------------------------------------------------------------------------------------- Colored Objects


def test_colored_objects_deterministic_distinct_and_seeds_differ() -> None:
    tok = tokenizer("smollm2-135m")
    a, b = co.make_colored_objects(tok, 300, seed=0), co.make_colored_objects(tok, 300, seed=0)
    assert a == b
    assert [x.text for x in a] != [x.text for x in co.make_colored_objects(tok, 300, seed=1)]
    assert len({x.text for x in a}) == 300
    assert [x.asked for x in a[:6]] == [0, 1, 2, 0, 1, 2]
    assert co.capacity(tok) > 1_000_000
    assert len({x.text for x in co.make_colored_objects(tok, 2000, seed=2)}) == 2000


@pytest.mark.parametrize("name", REAL)
def test_colored_objects_tokens_positions_and_corruption(name: str) -> None:
    tok = tokenizer(name)
    lex = co.usable_words(tok)
    assert len(lex.objects) >= 20 and len(lex.colours) >= 8
    for word in (*lex.objects, *lex.colours):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for it in co.make_colored_objects(tok, 150, seed=0):
        prefix = list(it.ids[: int(it.bos)])
        assert list(it.ids) == prefix + tok(it.text, add_special_tokens=False)["input_ids"]
        assert it.text.count("Q: ") == 2 and it.text.endswith(
            f"What color is the {it.objects[it.asked]}?\nA:"
        )
        assert len(set(it.candidates)) == 3 and len(set(it.objects)) == 3
        for k in range(3):
            assert decode1(tok, it.ids[it.object_positions[k]]) == " " + it.objects[k]
            assert decode1(tok, it.ids[it.colour_positions[k]]) == " " + it.candidates[k]
            assert it.colour_positions[k] + 1 == it.object_positions[k]  # "a red pen"
        assert decode1(tok, it.ids[it.question_pos]) == " " + it.objects[it.asked]
        assert it.question_pos > max(it.object_positions) and it.end_pos == len(it.ids) - 1
        assert decode1(tok, it.answer_id) == it.answer == " " + it.candidates[it.asked]
        assert it.corrupted_asked != it.asked
        assert (
            list(it.corrupted_ids) == prefix + tok(it.corrupted_text, add_special_tokens=False)["input_ids"]
        )
        diff = [i for i, (x, y) in enumerate(zip(it.ids, it.corrupted_ids, strict=True)) if x != y]
        assert diff == [it.question_pos]
        assert it.corrupted_ids[it.question_pos] == it.ids[it.object_positions[it.corrupted_asked]]
        assert decode1(tok, it.corrupted_answer_id) == it.corrupted_answer


def test_colored_objects_config_errors_and_groups() -> None:
    tok = tokenizer("smollm2-135m")
    for bad in (0, -1, 1.0):
        with pytest.raises(ConfigError, match="positive integer"):
            co.make_colored_objects(tok, bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at most"):
        co.make_colored_objects(tok, co.capacity(tok) + 1, seed=0)
    items = co.make_colored_objects(tok, 60, seed=0)
    for length, group in co.group_by_length(items).items():
        assert all(it.n_tokens == length for it in group)


# ---------------------------------------------------------------------------------------- real model


def logit_diffs(model: Any, items: list[ioi.IOIItem]) -> torch.Tensor:
    """logit(IO) - logit(S) at END for each item (one forward pass per template group)."""
    assert model.native_model is not None
    out = torch.empty(len(items))
    index = {id(it): i for i, it in enumerate(items)}
    with torch.no_grad():
        for group in ioi.group_by_template(items).values():
            ids = torch.tensor([it.ids for it in group], device=model.device)
            logits = model.native_model(input_ids=ids).logits[:, -1].float().cpu()
            for row, it in enumerate(group):
                out[index[id(it)]] = logits[row, it.io_id] - logits[row, it.s_id]
    return out


@pytest.mark.real
def test_smollm2_prefers_io_over_s() -> None:
    model = real_model("smollm2-135m")
    diffs = logit_diffs(model, ioi.make_ioi(model, 20, seed=0))
    rate = float((diffs > 0).float().mean())
    print(f"smollm2-135m IOI: IO>S on {rate:.0%} of 20, mean logit diff {float(diffs.mean()):.2f}")
    assert rate > 0.5
