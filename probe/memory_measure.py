"""Measure a capture's peak memory in a fresh process, to calibrate and test :mod:`probe.memory`.

``python -m probe.memory_measure measure MODEL --batch-size B --seq-len T --mode M`` runs one
capture and prints measured and estimated bytes as JSON; :func:`measure_capture_peak` runs that
command in a child process. See docs/capture.md (memory estimates) for how the constants of
:mod:`probe.memory` were fitted with it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from probe.capture import capture
from probe.errors import ConfigError
from probe.loading import load_model
from probe.memory import Mode, _config_int, estimate_capture
from probe.reducers import (
    ColumnImportance,
    DiagonalScore,
    KeepPatterns,
    MeanDistance,
    PatternReducer,
    RowEntropy,
)

# ------------------------------------------------------------------------------------- measurement


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))


def _vm_hwm() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


REDUCER_SETS = ("census", "census+patterns")


def _reducer_set(name: str) -> list[PatternReducer]:
    """The census's reducers on natural text; ``+patterns`` adds KeepPatterns (rows, not moments)."""
    if name not in REDUCER_SETS:
        raise ConfigError(f"unknown reducer set {name!r}; choose one of {', '.join(REDUCER_SETS)}")
    out: list[PatternReducer] = [
        RowEntropy(),
        MeanDistance(),
        DiagonalScore(1, name="prev_token"),
        ColumnImportance(),
    ]
    if name == "census+patterns":
        out.append(KeepPatterns(n_samples=2))
    return out


def _measure_in_process(
    name: str,
    *,
    batch_size: int,
    seq_len: int,
    mode: Mode,
    query_block: int,
    device: str,
    dtype: str,
    reducers: str,
    ragged: bool,
) -> dict[str, Any]:
    import resource

    model = load_model(name, device=device, dtype=dtype)
    vocab = _config_int(model, "vocab_size") or len(model.tokenizer)
    special = set(model.tokenizer.all_special_ids)
    gen = torch.Generator().manual_seed(0)
    n = seq_len - int(model.bos.prepend)
    rows = []
    for i in range(batch_size):
        length = max(1, n - i) if ragged else n  # ragged: a left-padded batch, as real text gives
        row = torch.randint(0, vocab, (length,), generator=gen).tolist()
        rows.append([t if t not in special else max(special) + 1 for t in row])
    # warm up (lazy imports, kernel registration, thread pools), then measure from a settled state
    capture(model, [rows[0][:8]], _reducer_set(reducers), mode=mode, query_block=query_block, progress=False)
    chosen = _reducer_set(reducers)
    est = estimate_capture(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        reducers=chosen,
        mode=mode,
        query_block=query_block,
        n_sequences=batch_size,
    )
    gc.collect()
    out: dict[str, Any] = {"model": name, "batch_size": batch_size, "seq_len": seq_len, "mode": mode}
    out.update(query_block=min(query_block, seq_len), device=str(model.device), dtype=dtype)
    out.update(reducers=reducers, ragged=ragged)

    def run() -> None:
        capture(
            model, rows, chosen, mode=mode, batch_size=batch_size, query_block=query_block, progress=False
        )

    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        out["measured"] = torch.cuda.max_memory_allocated() - before
    else:
        before = _current_rss()
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reset = _reset_hwm()
        run()
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = _vm_hwm()
        by_ru = ru_after - before
        by_hwm = hwm - before if reset and hwm is not None else None
        out.update(measured_ru_maxrss=by_ru, measured_vm_hwm=by_hwm)
        # ru_maxrss never goes down: if loading peaked higher than the capture, it hides the growth
        out["measured"] = by_hwm if ru_after <= ru_before and by_hwm is not None else max(by_ru, by_hwm or 0)
    out.update(estimate_total=est.total, estimate=est.transient, weights=est.weights)
    out.update(
        activations=est.activations, attention=est.attention, logits=est.logits, reducer_bytes=est.reducers
    )
    return out


def measure_capture_peak(
    name: str,
    *,
    batch_size: int,
    seq_len: int,
    mode: Mode = "eager",
    query_block: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    reducers: str = "census",
    ragged: bool = False,
    timeout: float = 900,
) -> dict[str, Any]:
    """Run one capture in a fresh Python process and return measured vs estimated bytes.

    The child loads model ``name``, warms up with an 8-token capture, then captures ``batch_size``
    random sequences of ``seq_len`` tokens (``ragged``: of lengths ``seq_len, seq_len - 1, …``, so
    the batch is padded) with the census's natural-text reducers (``reducers="census"``: every one
    works from attention moments; ``"census+patterns"`` adds ``KeepPatterns``, which needs the rows)
    and reports how far its peak resident set grew (``ru_maxrss``, and ``VmHWM`` after resetting it)
    above its resident set just before the capture (on CUDA: ``max_memory_allocated`` growth).
    Keys: ``measured`` (bytes), ``estimate`` (the estimate's ``transient`` bytes, i.e. beyond the
    weights), ``estimate_total``, and the estimate's terms. Used to calibrate :mod:`probe.memory` and by
    its tests.
    """
    cmd = [
        sys.executable,
        "-m",
        "probe.memory_measure",
        "measure",
        name,
        "--batch-size",
        str(batch_size),
        "--seq-len",
        str(seq_len),
        "--mode",
        mode,
        "--query-block",
        str(query_block),
        "--device",
        device,
        "--dtype",
        dtype,
        "--reducers",
        reducers,
        *(["--ragged"] if ragged else []),
    ]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m probe.memory_measure", description=(__doc__ or "").split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure one capture's peak memory growth in this process")
    m.add_argument("model")
    m.add_argument("--batch-size", type=int, default=1)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--mode", choices=["eager", "recompute"], default="eager")
    m.add_argument("--query-block", type=int, default=512)
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", default="float32")
    m.add_argument("--reducers", choices=REDUCER_SETS, default="census")
    m.add_argument("--ragged", action="store_true", help="sequences of different lengths (padding)")
    args = parser.parse_args(argv)
    result = _measure_in_process(
        args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        mode=args.mode,
        query_block=args.query_block,
        device=args.device,
        dtype=args.dtype,
        reducers=args.reducers,
        ragged=args.ragged,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
