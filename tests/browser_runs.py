"""Demo-like runs of every analysis the dashboard has a page for, under one root, built in seconds:
what the real-browser test (``tests/test_browser.py``) serves.

The model runs use the tiny models with settings smaller than the page tests' (the browser only
needs every figure drawn from real tables, not meaningful numbers); the ACT and retrieval runs are
the page tests' synthetic results, and the circuit runs use their whole-word vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import probe
from analyses import circuits, runstore, vit_heads
from analyses import vhd as vh
from analyses.atlas import AtlasConfig, build_atlas
from analyses.census import CensusConfig, run_census
from analyses.circuits import CircuitConfig
from analyses.duo import DuoConfig, run_duo
from analyses.sinks import SinksConfig, run_sinks
from tests import test_act_dashboard, test_circuits_dashboard, test_duo, test_retrieval_dashboard
from tests.conftest import fixed_revision

CENSUS = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)
SINKS = SinksConfig(seq_len=24, n_sequences=6, batch_size=6, n_examples=2, hidden_min_queries=4, eps=0.1)
DUO = DuoConfig(**{**test_duo.TINY, "max_new_tokens": 4, "random_seeds": 1, "n_boot": 20})  # type: ignore[arg-type]
# Thresholds of 0: every circuit has heads and edges; a few senders, tested by attribution patching.
CIRCUIT = CircuitConfig(
    n_items=2,
    max_senders=3,
    admit="share",
    min_share=0.0,
    min_attention=0.0,
    max_per_class=2,
    n_random=1,
    reuse_percents=(10.0, 50.0),
    n_boot=20,
    progress=False,
    n_heldout=4,
    n_reference=4,
)
VIT = vit_heads.VitHeadsConfig(
    preset="small",
    n_scenes=12,
    n_faces=8,
    n_eval=2,
    prune_top_k=2,
    validate_top=0,  # the page test needs no held-out validation (its tests run it)
    ae_epochs=2,
    n_attention_images=2,
    pattern_images=1,
    pattern_queries=4,
    progress=False,
)
# The main VHR setting and the random-heads control: the ablation figures have two bars.
VHD = vh.VhdConfig(
    n_scenes=2,
    max_new_tokens=4,
    batch_size=4,
    n_boot=20,
    n_stats=50,
    pope_kinds=("adversarial",),
    pope_per_scene=1,
    n_display=1,
    settings=(vh.DEFAULT_SETTINGS[0], vh.DEFAULT_SETTINGS[-1]),
    pope_ablations=False,
    progress=False,
)


ANALYSES = (
    "census",
    "sinks",
    "act",
    "retrieval",
    "duo",
    "ioi",
    "colored-objects",
    "circuit-reuse",
    "vit-heads",
    "vhr",
    "vhd",
    "atlas",
)


@dataclass(frozen=True)
class DemoRuns:
    root: Path
    ids: Mapping[str, str]  # analysis -> the id of its run under root


def build(root: Path) -> DemoRuns:
    """One run of every analysis with a dashboard page (census, sinks, act, retrieval, duo, ioi,
    colored-objects, circuit-reuse, vit-heads, vhr, vhd, atlas) saved under ``root``, and a second
    atlas (of tiny-gpt2) for the atlas page's comparison of models."""
    paths: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        llama = probe.load_model("tiny-llama", device="cpu")
        paths["census"] = run_census(llama, CENSUS, progress=False).save(root)
        paths["sinks"] = run_sinks(llama, SINKS, progress=False).save(root)
        paths["act"] = test_act_dashboard.make_result(test_act_dashboard.FakeActConfig()).save(root)
        paths["retrieval"] = test_retrieval_dashboard.make_result().save(root)
        paths["duo"] = run_duo(llama, DUO).save(root)
        gpt2 = probe.load_model("tiny-gpt2", device="cpu", tiny_words=test_circuits_dashboard.WORDS)
        paths["ioi"] = circuits.run_ioi(gpt2, CIRCUIT).save(root)
        paths["colored-objects"] = circuits.run_colored_objects(gpt2, CIRCUIT).save(root)
        paths["circuit-reuse"] = circuits.run_circuit_reuse(gpt2, CIRCUIT).save(root)
        clip = probe.load_model("tiny-clip-vision", device="cpu")
        paths["vit-heads"] = vit_heads.run_vit_heads(clip, VIT).save(root)
        llava = probe.load_model("tiny-llava", device="cpu")
        paths["vhr"] = vh.run_vhr(llava, VHD).save(root)
        paths["vhd"] = vh.run_vhd(llava, VHD).save(root)
        # the atlas of tiny-llama (its census, sinks and duo runs), and one of tiny-gpt2 (its
        # circuits) for the page's comparison of models
        atlas = AtlasConfig(root=str(root))
        build_atlas("tiny-gpt2", atlas).save(root)
        paths["atlas"] = build_atlas("tiny-llama", atlas).save(root)
    assert tuple(paths) == ANALYSES
    return DemoRuns(root, {analysis: path.name for analysis, path in paths.items()})
