"""Scene-caption data and the exact hallucination benchmarks (CHAIR, POPE) on hand-built answers.

Every number checked here is known by construction: captions that name one absent object out of
three, POPE answers with a known confusion matrix, scenes whose planted pairs are broken on purpose.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analyses.tasks import scene_captions as scc
from analyses.tasks import scenes as sc
from analyses.tasks.scenes.generate import _box_size, _make_object
from probe.errors import ConfigError

SMALL = scc.SceneCaptionConfig(n_train=600, n_eval=40)


def scene_of(*shapes: str) -> sc.Scene:
    """A scene holding exactly ``shapes`` (one medium red instance each, in a row)."""
    objects = []
    for k, shape in enumerate(shapes):
        box = _box_size(shape, "medium", 1.0, 224)
        objects.append(_make_object(shape, "red", "medium", (30.0 + 50 * k, 112.0), box, 224, 224))
    return sc.Scene(0, len(shapes), 224, 224, tuple(objects), sc.Background("plain", "beige"))


@pytest.fixture(scope="module")
def stats() -> sc.Cooccurrence:
    return scc.training_statistics(SMALL)


# ------------------------------------------------------------------------------------------ CHAIR


def test_a_caption_naming_one_absent_object_of_three_has_chair_i_one_third() -> None:
    table = scc.chair_table([scene_of("circle", "star")], ["A red circle, two blue stars and a green heart."])
    assert table.loc[0, "mentioned"] == "circle,star,heart" and table.loc[0, "hallucinated"] == "heart"
    summary = scc.chair_summary(table, n_boot=50).set_index("metric")["value"]
    assert summary["CHAIR_I"] == pytest.approx(1 / 3)
    assert summary["CHAIR_S"] == 1.0 and summary["recall"] == 1.0


def test_chair_is_a_ratio_of_sums_and_counts_each_class_once_per_caption() -> None:
    scenes = [scene_of("circle", "star"), scene_of("crescent", "square", "ring")]
    texts = [
        "Two discs, a dot and a pentagram next to a heart.",  # circle (3 words), star, heart: 1 of 3 wrong
        "A crescent moon and a box.",  # "crescent moon" is one mention; ring missed
    ]
    table = scc.chair_table(scenes, texts)
    assert table["n_mentioned"].tolist() == [3, 2] and table["n_hallucinated"].tolist() == [1, 0]
    assert table.loc[1, "missed"] == "ring"
    summary = scc.chair_summary(table, n_boot=200, seed=3).set_index("metric")
    assert summary.loc["CHAIR_I", "value"] == pytest.approx(1 / 5)
    assert summary.loc["CHAIR_S", "value"] == pytest.approx(1 / 2)
    assert summary.loc["recall", "value"] == pytest.approx(4 / 5)
    for metric in ("CHAIR_I", "CHAIR_S", "recall"):
        row = summary.loc[metric]
        assert row["lo"] <= row["value"] <= row["hi"]
    again = scc.chair_summary(table, n_boot=200, seed=3).set_index("metric")
    pd.testing.assert_frame_equal(summary, again)  # seeded intervals


def test_a_caption_without_object_words_has_no_chair_i_but_counts_for_chair_s() -> None:
    table = scc.chair_table([scene_of("star")], ["Nothing to see here."])
    summary = scc.chair_summary(table, n_boot=10).set_index("metric")["value"]
    assert math.isnan(summary["CHAIR_I"]) and summary["CHAIR_S"] == 0.0 and summary["recall"] == 0.0
    with pytest.raises(ConfigError, match="one description per scene"):
        scc.chair_table([scene_of("star")], [])


# ------------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize("kind", scc.POPE_KINDS)
def test_pope_negatives_are_absent_and_balance_the_positives(
    kind: scc.PopeKind, stats: sc.Cooccurrence
) -> None:
    scenes = scc.eval_scenes(SMALL, "iid", 30)
    questions = scc.pope_questions(scenes, stats, kind, n_per_scene=3, seed=1)
    for k, scene in enumerate(scenes):
        mine = [q for q in questions if q.scene == k]
        pos = [q.shape for q in mine if q.label]
        neg = [q.shape for q in mine if not q.label]
        assert set(pos) <= set(scene.classes) and len(pos) == min(3, len(scene.classes))
        assert not set(neg) & set(scene.classes) and len(neg) == len(pos) and len(set(neg)) == len(neg)
        assert all(q.kind == kind and q.text == scc.pope_question(q.shape) for q in mine)
    assert scc.pope_question("oval") == "Is there an oval in the image?"


def test_adversarial_negatives_are_the_absent_partners_of_present_objects(stats: sc.Cooccurrence) -> None:
    partners = {r.given: r.targets[0] for r in SMALL.rules()}
    scenes = scc.eval_scenes(SMALL, "conflict", 25)
    questions = scc.pope_questions(scenes, stats, "adversarial", n_per_scene=1)
    for k, scene in enumerate(scenes):
        expected = {partners[g] for g in scene.classes if g in partners} - set(scene.classes)
        assert expected, "a conflict scene holds a pair's first class without its partner"
        (negative,) = [q.shape for q in questions if q.scene == k and not q.label]
        assert negative in expected
        assert stats.p(next(g for g in scene.classes if partners.get(g) == negative), negative) > 0.6


def test_popular_negatives_are_the_most_frequent_absent_classes(stats: sc.Cooccurrence) -> None:
    scene = scene_of("circle")
    (q,) = [q for q in scc.pope_questions([scene], stats, "popular", n_per_scene=1) if not q.label]
    absent = [s for s in stats.shapes if s != "circle"]
    freq = {s: stats.present[stats.shapes.index(s)] for s in absent}
    assert freq[q.shape] == max(freq.values())


def test_parse_yes_no_follows_pope() -> None:
    assert scc.parse_yes_no("Yes, there is.") == (True, True)
    assert scc.parse_yes_no("No") == (False, True)
    assert scc.parse_yes_no("There is not a star.") == (False, True)
    assert scc.parse_yes_no("A star.") == (True, False)  # POPE counts it as yes; we also report it
    assert scc.parse_yes_no("Nothing") == (True, False)  # whole words only


def test_pope_metrics_on_a_known_confusion_matrix() -> None:
    questions = [
        scc.PopeQuestion(0, "star", True, "random", ""),  # yes: TP
        scc.PopeQuestion(0, "heart", False, "random", ""),  # yes: FP
        scc.PopeQuestion(1, "circle", True, "random", ""),  # yes: TP
        scc.PopeQuestion(1, "ring", False, "random", ""),  # no: TN
    ]
    table = scc.pope_table(questions, ["Yes", "Yes.", "yes", "No, there is not."])
    summary = scc.pope_summary(table, n_boot=100).set_index("metric")["value"]
    assert summary["accuracy"] == pytest.approx(3 / 4) and summary["precision"] == pytest.approx(2 / 3)
    assert summary["recall"] == 1.0 and summary["F1"] == pytest.approx(0.8)
    assert summary["yes_ratio"] == pytest.approx(3 / 4) and summary["understood"] == 1.0


def test_pope_intervals_resample_scenes() -> None:
    rng = np.random.default_rng(0)
    questions = [scc.PopeQuestion(k // 4, "star", bool(k % 2), "adversarial", "") for k in range(200)]
    answers = ["Yes" if rng.random() < 0.7 else "No" for _ in questions]
    summary = scc.pope_summary(scc.pope_table(questions, answers), n_boot=300).set_index("metric")
    for metric in ("accuracy", "F1", "yes_ratio"):
        lo, value, hi = summary.loc[metric, ["lo", "value", "hi"]]
        assert lo < value < hi and hi - lo < 0.3


# ------------------------------------------------------------------------------------------ data


def test_training_captions_are_exact_and_use_every_style() -> None:
    scenes = scc.train_scenes(scc.SceneCaptionConfig(n_train=150, p_synonym=0.3))
    rng = np.random.default_rng(0)
    for scene in scenes:
        for style in scc.CAPTION_STYLES:
            text = scc.training_caption(scene, rng, style, p_synonym=0.3)
            check = sc.check_caption(scene, text)
            assert check.hallucinated == () and check.missed == (), (style, text)
    examples = scc.training_examples(scenes, scc.SceneCaptionConfig(n_train=150, p_question=0.5))
    questions = [e for e in examples if e.prompt.startswith("Is there")]
    assert 0.3 < len(questions) / len(examples) < 0.7
    for e in questions:
        (shape,) = sc.mentioned_shapes(e.prompt)
        assert (e.target == "Yes") == (shape in scenes[e.image].classes)
    captions = [e for e in examples if not e.prompt.startswith("Is there")]
    assert {e.prompt for e in captions} <= set(scc.CAPTION_PROMPTS)
    assert all(not sc.check_caption(scenes[e.image], e.target).hallucinated for e in captions)


def test_examples_are_deterministic_and_scene_local() -> None:
    cfg = scc.SceneCaptionConfig(n_train=20)
    scenes = scc.train_scenes(cfg)
    assert scc.training_examples(scenes, cfg) == scc.training_examples(scenes, cfg)
    tail = scc.training_examples(scenes[10:], cfg)
    assert [(e.prompt, e.target) for e in tail] == [
        (e.prompt, e.target) for e in scc.training_examples(scenes, cfg) if e.image >= 10
    ]


def test_training_scenes_carry_the_planted_pairs_and_conflict_scenes_break_them(
    stats: sc.Cooccurrence,
) -> None:
    for rule in SMALL.rules():
        assert 0.75 < stats.p(rule.given, rule.targets[0]) < 0.95
    record = scc.data_statistics(
        scc.train_scenes(SMALL), scc.training_examples(scc.train_scenes(SMALL), SMALL), SMALL
    )
    assert [p["given"] for p in record["pairs"]] == ["circle", "square", "heart", "hexagon"]
    for scene in scc.eval_scenes(SMALL, "conflict", 30):
        present = set(scene.classes)
        assert any(r.given in present and r.targets[0] not in present for r in SMALL.rules())
    iid = scc.eval_scenes(SMALL, "iid", 5)
    assert all(s.seed == SMALL.eval_seed for s in iid) and SMALL.eval_seed != SMALL.seed


def test_bad_data_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="given:then"):
        scc.SceneCaptionConfig(pairs=("circle-star",))
    with pytest.raises(ConfigError, match="share a class"):
        scc.SceneCaptionConfig(pairs=("circle:star", "star:heart"))
    with pytest.raises(ConfigError, match="p_pair"):
        scc.SceneCaptionConfig(p_pair=1.5)
    with pytest.raises(ConfigError, match="n_train"):
        scc.SceneCaptionConfig(n_train=0)
