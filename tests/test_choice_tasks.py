"""Zero-shot choice tasks: generators, the JSONL loader, splits, bootstrap accuracy and scoring."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses.tasks import choice
from analyses.tasks.choice import ChoiceItem
from probe import interventions as iv
from probe.errors import ConfigError
from probe.loading import LoadedModel
from tests.conftest import real_model

TASK_NAMES = list(choice.TASKS)
MC_TASKS = [name for name, spec in choice.TASKS.items() if spec.kind == "multiple_choice"]
CLS_TASKS = [name for name, spec in choice.TASKS.items() if spec.kind == "classification"]


def _options(item: ChoiceItem) -> list[str]:
    """The option texts listed in a multiple-choice prompt, in letter order."""
    return [m.group(1) for m in re.finditer(r"^[A-J]\. (.+)$", item.prompt, flags=re.M)]


# ---------------------------------------------------------------------------------------- generators


def test_there_are_six_tasks_of_both_kinds_with_thousands_of_items() -> None:
    assert len(choice.TASKS) >= 6
    assert len(MC_TASKS) >= 3 and len(CLS_TASKS) >= 3
    for name, spec in choice.TASKS.items():
        assert spec.name == name and spec.description and spec.capacity >= 5000, name


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generator_is_deterministic_per_seed_and_differs_across_seeds(name: str) -> None:
    first, again = choice.make_task(name, 200, seed=3), choice.make_task(name, 200, seed=3)
    other = choice.make_task(name, 200, seed=4)
    assert first == again
    assert [i.prompt for i in first] != [i.prompt for i in other]
    assert len({i.prompt for i in first} & {i.prompt for i in other}) < 100


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generator_yields_2000_distinct_prompts(name: str) -> None:
    items = choice.make_task(name, 2000, seed=0)
    assert len(items) == 2000
    assert len({i.prompt for i in items}) == 2000


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if choice.TASKS[n].capacity <= 60_000])
def test_generator_reaches_its_stated_capacity_without_repeats(name: str) -> None:
    capacity = choice.TASKS[name].capacity
    items = choice.make_task(name, capacity, seed=1)
    assert len({i.prompt for i in items}) == capacity
    assert len({(i.prompt, i.label) for i in items}) == len({i.prompt for i in items})


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generator_refuses_more_items_than_its_capacity(name: str) -> None:
    capacity = choice.TASKS[name].capacity
    with pytest.raises(ConfigError, match=rf"at most {capacity} distinct items.*ask for n <= {capacity}"):
        choice.make_task(name, capacity + 1, seed=0)
    with pytest.raises(ConfigError, match="n >= 1"):
        choice.make_task(name, 0, seed=0)


def test_module_docs_state_each_capacity() -> None:
    for name, spec in choice.TASKS.items():
        assert re.search(rf"``{name}``.*  {spec.capacity:,}\n", choice.__doc__ or ""), name


def test_unknown_task_names_the_closest_one() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'capital'"):
        choice.make_task("capitals", 10, seed=0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_labels_are_in_range_and_balanced(name: str) -> None:
    spec = choice.TASKS[name]
    items = choice.make_task(name, 1000, seed=0)
    assert all(0 <= i.label < len(i.choices) == spec.n_choices for i in items)
    assert all(i.task == name and i.kind == spec.kind for i in items)
    counts = Counter(i.label for i in items)
    assert set(counts) == set(range(spec.n_choices))
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("name", MC_TASKS)
def test_answer_letters_are_spread_over_positions(name: str) -> None:
    items = choice.make_task(name, 400, seed=5)
    k = choice.TASKS[name].n_choices
    assert all(i.choices == tuple(f" {choice.LETTERS[j]}" for j in range(k)) for i in items)
    assert all(len(_options(i)) == k and i.prompt.endswith("\nAnswer:") for i in items)
    counts = Counter(i.label for i in items)
    assert all(counts[j] == 400 // k for j in range(k))
    # Not a fixed pattern either: the letter sequence is shuffled, not A, B, C, D, A, …
    labels = [i.label for i in items]
    assert labels != [j % k for j in range(400)]


def test_multiple_choice_answers_are_right() -> None:
    for item in choice.make_larger_number(300, seed=0):
        numbers = [int(x) for x in _options(item)]
        assert numbers[item.label] == max(numbers) and len(set(numbers)) == len(numbers)
    capitals = {country: city for country, city in choice.CAPITALS}
    for item in choice.make_capital(300, seed=0):
        country = re.search(r"capital of (.+)\?", item.prompt).group(1)  # type: ignore[union-attr]
        options = _options(item)
        assert options[item.label] == capitals[country] and len(set(options)) == 4
    category_of = {w: cat for cat, words in choice.CATEGORIES.items() for w in words}
    for item in choice.make_odd_one_out(300, seed=0):
        cats = [category_of[w] for w in _options(item)]
        odd = cats[item.label]
        assert cats.count(odd) == 1 and len(set(cats)) == 2


def test_classification_answers_are_right_and_label_words_are_continuations() -> None:
    for name in CLS_TASKS:
        for item in choice.make_task(name, 100, seed=0):
            assert all(c.startswith(" ") and c.strip().isalpha() for c in item.choices)
            assert re.search(r"\n[A-Z][a-z]+:$", item.prompt), item.prompt
    for item in choice.make_sentiment(200, seed=0):
        words = set(re.findall(r"[a-z]+", item.prompt.split("Review:")[1]))
        lexicon = (choice.NEGATIVE_ADJECTIVES, choice.POSITIVE_ADJECTIVES)[item.label]
        assert words & set(lexicon) and " not " not in item.prompt
    for item in choice.make_object_colour(200, seed=0):
        colour = item.answer.strip()
        assert any(thing in item.prompt for thing in choice.OBJECT_COLOURS[colour])


# ---------------------------------------------------------------------------------------- items and files


def test_items_check_themselves() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        ChoiceItem("Q:", (" a", " b"), 2, "t", "classification")
    with pytest.raises(ConfigError, match="repeat"):
        ChoiceItem("Q:", (" a", " a"), 0, "t", "classification")
    with pytest.raises(ConfigError, match="'kind'"):
        ChoiceItem("Q:", (" a", " b"), 0, "t", "open")  # type: ignore[arg-type]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    items = choice.make_capital(20, seed=0) + choice.make_sentiment(20, seed=0)
    path = choice.write_jsonl(items, tmp_path / "mixed.jsonl")
    assert choice.load_jsonl(path) == items


def test_jsonl_defaults_task_to_file_stem_and_infers_kind(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "Is it?\nA. yes\nB. no\nAnswer:", "choices": [" A", " B"], "label": 1, "id": 7},
        {"prompt": "Mood:", "choices": [" happy", " sad"], "label": 0},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = choice.load_jsonl(path)
    assert (a.task, a.kind, a.label) == ("mine", "multiple_choice", 1)
    assert (b.task, b.kind, b.answer) == ("mine", "classification", " happy")


GOOD = json.dumps({"prompt": "Mood:", "choices": [" happy", " sad"], "label": 0})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"prompt": "Mood:", "choices": [" happy", " sad"], "label": 0', "not valid JSON"),
        (
            json.dumps({"prompt": "Mood:", "choices": [" happy", " sad"], "label": 2}),
            "out of range.*use 0..1",
        ),
        (json.dumps({"prompt": "Mood:", "label": 0}), "missing key.*'choices'.*add"),
        (json.dumps({"prompt": "Mood:", "choices": [" happy"], "label": 0}), "at least two"),
        (json.dumps({"prompt": "Mood:", "choices": [" a", " b"], "label": "0"}), "integer index"),
        (json.dumps(["Mood:", [" a", " b"], 0]), "JSON object"),
    ],
)
def test_jsonl_bad_line_is_reported_with_its_number(tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    with pytest.raises(ConfigError, match=rf"bad\.jsonl:3: .*{message}"):
        choice.load_jsonl(path)


def test_jsonl_lists_every_bad_line_and_loads_nothing(tmp_path: Path) -> None:
    path = tmp_path / "two_bad.jsonl"
    path.write_text("\n".join([GOOD, "{oops", GOOD, json.dumps({"prompt": "x"})]) + "\n")
    with pytest.raises(ConfigError) as err:
        choice.load_jsonl(path)
    assert "2 bad line(s)" in str(err.value)
    assert "two_bad.jsonl:2:" in str(err.value) and "two_bad.jsonl:4:" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        choice.load_jsonl(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------- split


def test_split_is_disjoint_complete_seeded_and_stratified() -> None:
    items = choice.make_topic(300, seed=0) + choice.make_capital(100, seed=0)
    calib, held = choice.split(items, 0.25, seed=0)
    assert not {i.prompt for i in calib} & {i.prompt for i in held}
    assert sorted(i.prompt for i in calib + held) == sorted(i.prompt for i in items)
    assert Counter(i.task for i in calib) == {"topic": 75, "capital": 25}
    assert choice.split(items, 0.25, seed=0) == (calib, held)
    assert choice.split(items, 0.25, seed=1)[0] != calib
    order = {i.prompt: k for k, i in enumerate(items)}
    assert [order[i.prompt] for i in held] == sorted(order[i.prompt] for i in held)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 0.001])
def test_split_refuses_fractions_that_leave_a_part_empty(fraction: float) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        choice.split(choice.make_topic(100, seed=0), fraction, seed=0)


# ---------------------------------------------------------------------------------------- accuracy


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = choice.accuracy(rng.random(50) < 0.7, seed=0)
    large = choice.accuracy(rng.random(5000) < 0.7, seed=0)
    for acc in (small, large):
        assert acc.low <= acc.value <= acc.high and 0 < acc.low < acc.high < 1
    assert large.n == 5000 and large.high - large.low < (small.high - small.low) / 5
    perfect = choice.accuracy(np.ones(30, dtype=bool))
    assert (perfect.value, perfect.low, perfect.high) == (1.0, 1.0, 1.0)


def test_bootstrap_matches_resampling_the_items() -> None:
    """The binomial shortcut draws from the same distribution as resampling indices."""
    rng = np.random.default_rng(1)
    correct = (rng.random(200) < 0.6).astype(int)
    acc = choice.accuracy(correct, n_boot=20_000, seed=2)
    resampled = correct[rng.integers(0, 200, size=(20_000, 200))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    assert abs(acc.low - low) <= 0.011 and abs(acc.high - high) <= 0.011
    assert abs((acc.high - acc.low) - 2 * 1.96 * np.sqrt(0.6 * 0.4 / 200)) < 0.03


def test_accuracy_refuses_non_binary_or_empty_outcomes() -> None:
    with pytest.raises(ConfigError, match="0/1"):
        choice.accuracy(np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="non-empty"):
        choice.accuracy(np.array([]))


# ---------------------------------------------------------------------------------------- scoring


def _mixed_items() -> list[ChoiceItem]:
    """Items of every task, short and long prompts, two to seven choices."""
    return [item for name in TASK_NAMES for item in choice.make_task(name, 3, seed=0)]


def test_tiny_model_logprobs_are_finite_with_nan_for_missing_choices(tiny_llama: LoadedModel) -> None:
    items = _mixed_items()
    logp = choice.choice_logprobs(tiny_llama, items, batch_size=4, progress=False)
    width = max(len(i.choices) for i in items)
    assert logp.shape == (len(items), width) and width == 7
    for row, item in zip(logp, items, strict=True):
        k = len(item.choices)
        assert np.isfinite(row[:k]).all() and (row[:k] < 0).all() and np.isnan(row[k:]).all()


def test_item_scores_do_not_depend_on_its_batch(tiny_model: LoadedModel) -> None:
    items = _mixed_items()
    batched = choice.choice_logprobs(tiny_model, items, batch_size=8, progress=False)
    alone = np.full_like(batched, np.nan)
    for k, item in enumerate(items):
        alone[k, : len(item.choices)] = choice.choice_logprobs(tiny_model, [item], progress=False)[0]
    reordered = choice.choice_logprobs(tiny_model, items[::-1], batch_size=5, progress=False)[::-1]
    np.testing.assert_allclose(batched, alone, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(batched, reordered, atol=1e-5, equal_nan=True)


def _next_token_logp(model: LoadedModel, ids: list[int]) -> torch.Tensor:
    batch = model.batch_from_ids([ids])
    with torch.no_grad():
        logits = model.bridge(batch.input_ids)  # type: ignore[misc]
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


def test_one_token_choices_are_read_at_the_final_prompt_position(tiny_llama: LoadedModel) -> None:
    """Byte tokenizer: one-byte choices are single tokens; both rules read them after the prompt."""
    tok = tiny_llama.tokenizer
    item = ChoiceItem("Pick:\nA. x\nB. y\nAnswer:", ("A", "B", "C"), 1, "t", "multiple_choice")
    prompt_ids = tok(item.prompt, add_special_tokens=False)["input_ids"]
    letters = [tok(x, add_special_tokens=False)["input_ids"][0] for x in "ABC"]
    expected = _next_token_logp(tiny_llama, prompt_ids)[letters].numpy()
    rules: tuple[choice.ChoiceToken, ...] = ("first", "last")
    for rule in rules:
        got = choice.choice_logprobs(tiny_llama, [item], choice_token=rule, progress=False)[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_several_token_choices_follow_the_chain_rule_to_their_first_distinct_token(
    tiny_llama: LoadedModel,
) -> None:
    """' sun' / ' sea' / ' rain' on bytes: ' s' is shared by two, so they read ' ', 's', 'u'/'e'; ' rain'
    reads ' ', 'r'. 'last' (ACT's code) reads 'n', 'a', 'n' at the final prompt position instead."""
    tok = tiny_llama.tokenizer
    prompt = "Weather:"
    item = ChoiceItem(prompt, (" sun", " sea", " rain"), 0, "t", "classification")
    ids = {c: choice.choice_token_ids(tok, prompt, c) for c in item.choices}
    assert [tok.decode([i]) for i in ids[" sun"]] == [" ", "s", "u", "n"]
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    at_end = _next_token_logp(tiny_llama, p)
    after_space = _next_token_logp(tiny_llama, [*p, ids[" sun"][0]])
    after_s = _next_token_logp(tiny_llama, [*p, *ids[" sun"][:2]])
    space, s, u, e, r = ids[" sun"][0], ids[" sun"][1], ids[" sun"][2], ids[" sea"][2], ids[" rain"][1]
    expected = [
        at_end[space] + after_space[s] + after_s[u],
        at_end[space] + after_space[s] + after_s[e],
        at_end[space] + after_space[r],
    ]
    first = choice.choice_logprobs(tiny_llama, [item], progress=False)[0]
    np.testing.assert_allclose(first, torch.stack(expected).numpy(), atol=1e-5)
    ends = [ids[c][-1] for c in (" sun", " sea")]
    last = choice.choice_logprobs(
        tiny_llama,
        [ChoiceItem(prompt, (" sun", " sea"), 0, "t", "classification")],
        choice_token="last",
        progress=False,
    )[0]
    np.testing.assert_allclose(last, at_end[ends].numpy(), atol=1e-5)


def test_choices_that_cannot_be_told_apart_are_refused(tiny_llama: LoadedModel) -> None:
    prefix = ChoiceItem("Colour:", (" blue", " blueberry"), 0, "t", "classification")
    with pytest.raises(ConfigError, match="token prefix"):
        choice.choice_logprobs(tiny_llama, [prefix], progress=False)
    same_end = ChoiceItem("Word:", (" cat", " hat"), 0, "t", "classification")
    with pytest.raises(ConfigError, match=r"same token.*choice_token='first'"):
        choice.choice_logprobs(tiny_llama, [same_end], choice_token="last", progress=False)
    assert np.isfinite(choice.choice_logprobs(tiny_llama, [same_end], progress=False)).all()


def test_scoring_runs_through_the_bridge_so_interventions_apply(tiny_llama: LoadedModel) -> None:
    items = choice.make_capital(6, seed=0)
    before = choice.choice_logprobs(tiny_llama, items, progress=False)
    every_head = {
        (layer, head): 0.0 for layer in range(tiny_llama.n_layers) for head in range(tiny_llama.n_heads)
    }
    with iv.scale_heads(tiny_llama, every_head):
        ablated = choice.choice_logprobs(tiny_llama, items, progress=False)
    after = choice.choice_logprobs(tiny_llama, items, progress=False)
    assert np.abs(ablated - before).max() > 1e-3
    np.testing.assert_array_equal(before, after)


def test_evaluate_gives_one_row_per_item_and_summarise_one_per_task(tiny_llama: LoadedModel) -> None:
    items = choice.make_larger_number(12, seed=0) + choice.make_topic(12, seed=0)
    frame = choice.evaluate(tiny_llama, items, progress=False)
    assert len(frame) == 24
    assert {"task", "label", "predicted", "correct", "margin"} <= set(frame.columns)
    assert ((frame["margin"] > 0) == frame["correct"]).all()
    summary = choice.summarise(frame).set_index("task")
    assert list(summary.index) == ["larger_number", "topic"]
    assert summary.loc["topic", "chance"] == pytest.approx(1 / 6)
    assert (summary["low"] <= summary["accuracy"]).all() and (summary["accuracy"] <= summary["high"]).all()


# ---------------------------------------------------------------------------------------- real model


@pytest.mark.real
@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
def test_every_built_in_choice_is_one_token_on_the_embedded_models(model_name: str) -> None:
    """So there the 'first' rule and ACT's 'last' rule read the same token, one pass per item."""
    tokenizer = real_model(model_name).tokenizer
    for name in TASK_NAMES:
        for item in choice.make_task(name, 50, seed=0):
            for c in item.choices:
                assert len(choice.choice_token_ids(tokenizer, item.prompt, c)) == 1, (name, c)


# Measured with 200 items (seed 2): sentiment 0.96 [0.93, 0.985], topic 1.00; letter-scored multiple
# choice is at chance on this 135M model (it answers " A" to every item), so the test uses the
# classification tasks, with thresholds far below the measurement and far above chance.
@pytest.mark.real
@pytest.mark.parametrize(("name", "threshold"), [("sentiment", 0.75), ("topic", 0.6)])
def test_smollm_is_well_above_chance(smollm: LoadedModel, name: str, threshold: float) -> None:
    frame = choice.evaluate(smollm, choice.make_task(name, 60, seed=11), progress=False)
    acc = choice.accuracy(frame["correct"].to_numpy())
    assert acc.value >= threshold and acc.low > choice.TASKS[name].chance, acc
