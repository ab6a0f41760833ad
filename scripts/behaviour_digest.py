"""Fingerprint what every analysis computes, to show a refactoring changed no result.

Runs each registered analysis (``tests/test_registry.py`` checks every one has a case) on tiny models (and census and sinks on the embedded default model)
with small configs, saves each run, and prints one line per saved table, array and summary: a
sha256 of its contents. Run it before and after a change and diff the two outputs::

    python scripts/behaviour_digest.py > before.txt
    # ... change the code ...
    python scripts/behaviour_digest.py > after.txt
    diff before.txt after.txt && echo "no behaviour change"

Timings, run ids and code revisions are left out (they change every run).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import probe
from analyses.registry import ANALYSES
from analyses.tasks import colored_objects, ioi

WORDS = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *colored_objects.OBJECTS, *colored_objects.COLOURS]
WORDS += list(colored_objects.SURFACES)
CIRCUIT = {
    "n_items": 4,
    "n_random": 2,
    "max_senders": 5,
    "n_boot": 200,
    "progress": False,
    "n_heldout": 4,
    "n_reference": 4,
}
VHD = {
    "n_scenes": 2,
    "max_new_tokens": 4,
    "batch_size": 4,
    "n_boot": 20,
    "n_stats": 50,
    "pope_kinds": ("adversarial",),
    "pope_per_scene": 1,
    "ablations": False,
    "sweep_alphas": (0.5, 2.0),
    "sweep_layers": ("paper", "late"),
    "held_out_scenes": 2,
    "validation_scales": (0.0,),
}
CASES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "census",
        "tiny-llama",
        {"n_natural": 4, "n_repeated": 2, "seq_len": 32, "repeat_len": 8, "n_examples": 2},
    ),
    (
        "census",
        "tiny-gpt2",
        {"n_natural": 4, "n_repeated": 2, "seq_len": 32, "repeat_len": 8, "n_examples": 2},
    ),
    (
        "sinks",
        "tiny-llama",
        {"seq_len": 24, "n_sequences": 6, "batch_size": 4, "n_examples": 2, "hidden_min_queries": 4},
    ),
    (
        "act",
        "tiny-llama",
        {
            "tasks": ("sentiment", "larger_number"),
            "n_calibration": 6,
            "n_heldout": 5,
            "layer_start": 1,
            "layer_end": None,
            "alpha_threshold": 0.05,
            "heads_per_pass": 3,
            "batch_size": 4,
            "n_boot": 200,
        },
    ),
    (
        "retrieval",
        "tiny-llama",
        {
            "lengths": (300,),
            "depths": (0.0, 1.0),
            "n_needles": 1,
            "mask_fractions": (0.1,),
            "mask_seeds": 2,
            "novel_answer_tokens": False,
            "max_new_tokens": 4,
            "heldout_depths": (0.5,),
            "progress": False,
        },
    ),
    (
        "duo",
        "tiny-llama",
        {
            "sink": 4,
            "recent": 16,
            "train_min_length": 400,
            "train_max_length": 480,
            "train_n_lengths": 2,
            "n_passkeys": 2,
            "steps": 2,
            "n_contexts": 2,
            "lengths": (300,),
            "depths": (0.5,),
            "n_needles": 1,
            "novel_answer_tokens": False,
            "max_new_tokens": 4,
            "shares": (0.5,),
            "random_seeds": 1,
            "score_lengths": (300,),
            "score_depths": (0.5,),
            "score_needles": 1,
            "n_boot": 100,
            "progress": False,
        },
    ),
    ("ioi", "tiny-gpt2", CIRCUIT),
    ("colored-objects", "tiny-llama", CIRCUIT),
    ("circuit-reuse", "tiny-gpt2", CIRCUIT),
    (
        "vit-heads",
        "tiny-vit",
        {"preset": "small", "n_scenes": 12, "n_faces": 8, "n_eval": 2, "prune_top_k": 2, "ae_epochs": 2},
    ),
    ("vhd", "tiny-llava", VHD),
    ("vhr", "tiny-llava", VHD),
    ("census", "smollm2-135m", {"n_natural": 4, "n_repeated": 2, "seq_len": 64, "repeat_len": 16}),
    ("sinks", "smollm2-135m", {"seq_len": 64, "n_sequences": 4, "batch_size": 4}),
    # joins the runs above of the same model (its root is the digest's temporary run store)
    ("atlas", "smollm2-135m", {}),
]
RUN_ID = re.compile(r"\b\d{8}-\d{6}-[\w.-]+-[0-9a-f]{4}\b")
# columns that name runs or times, not results (the atlas's provenance)
VOLATILE = ("run_id", "created", "code_revision")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _frame_digest(frame: pd.DataFrame) -> str:
    timing = [c for c in frame.columns if str(c).endswith(("_s", "seconds")) or c in VOLATILE]
    frame = frame.drop(columns=timing)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.9g")
    return f"{frame.shape} {_sha(buffer.getvalue().encode())}"


def _array_digest(array: np.ndarray) -> str:
    if array.dtype.kind == "f":
        array = np.round(array.astype(np.float64), 9)
    return f"{array.shape} {array.dtype} {_sha(np.ascontiguousarray(array).tobytes())}"


def digest_run(path: Path) -> list[str]:
    """One line per table, array and the config of the saved run at ``path``."""
    lines = []
    for table in sorted(path.glob("*.parquet")):
        lines.append(f"  table {table.stem}: {_frame_digest(pd.read_parquet(table))}")
    for array in sorted((path / "arrays").glob("*.npy")):
        lines.append(f"  array {array.stem}: {_array_digest(np.load(array, allow_pickle=False))}")
    config = json.loads((path / "manifest.json").read_text())["config"]
    lines.append(f"  config: {_sha(json.dumps(config, sort_keys=True).encode())}")
    return lines


def main() -> None:
    only = set(sys.argv[1:])
    models: dict[str, probe.LoadedModel] = {}
    with tempfile.TemporaryDirectory() as root:
        for analysis, model_name, settings in CASES:
            if only and analysis not in only:
                continue
            if model_name not in models:
                words = WORDS if model_name.startswith("tiny-") and model_name != "tiny-llava" else None
                kwargs = {"tiny_words": words} if words else {}
                models[model_name] = probe.load_model(model_name, device="cpu", **kwargs)
            entry = ANALYSES[analysis]
            config = entry.config_cls(**({**settings, "root": root} if entry.reads_run_store else settings))
            result = entry.run(models[model_name], config)
            print(f"{analysis} on {model_name}", flush=True)
            summary = entry.summary(result)
            summary = RUN_ID.sub("<run>", summary)  # the atlas names the runs it joined
            print(f"  summary: {_sha(summary.encode())}")
            for line in digest_run(result.save(root)):
                print(line, flush=True)


if __name__ == "__main__":
    main()
