"""ViT offset maps (attention strength per relative offset): the numba kernel against numpy, side by side.

For each number of images N, one layer of synthetic post-softmax patterns ``[N, heads, T, T]``
(ViT-B/16 sizes by default: 12 heads, a 14×14 grid + CLS = 197 tokens; random logits, since the
cost does not depend on the values) goes through:

* ``numpy``        :func:`analyses.vit_heads.attention.offset_maps_numpy`, the reference: sum over the
                   images in float64, then shift each query's key grid into the offset map;
* ``numba 1 thr``  :func:`analyses.vit_heads.attention.offset_maps` with ``parallel=False``;
* ``numba N thr``  the same with ``parallel=True`` on N numba threads (``--threads``; default
                   numba's own count) and the threading layer ``--layer`` (default numba's choice).

both for raw weights and with ``renormalise=True`` (each query row divided by its patch mass; the
reference then makes a float64 copy of the patch block). Printed per row: the median wall time of
``--repeats`` runs (the methods are interleaved run by run, so load on the machine hits all alike),
the read rate (bytes of patterns per second), the speed-up over numpy and the largest absolute
difference from numpy. Compile time is measured apart: the first call in this process compiles
the kernel cold (numba's cache is pointed at an empty temporary folder, so nothing from an earlier
run is reused and nothing is written into the repository), and a second process with that cache
shows what a later session pays to load the compiled kernel from disk.

Usage::

    python benchmarks/vit.py                         # N = 8, 32, 128; 12 heads; 197 tokens
    python benchmarks/vit.py --images 64 --threads 4 --repeats 9 --layer workqueue
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _patterns(n_images: int, n_heads: int, n_tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n_images, n_heads, n_tokens, n_tokens), dtype=np.float32)
    for i in range(n_images):  # one image at a time: no float64 temporary of the whole tensor
        logits = rng.standard_normal((n_heads, n_tokens, n_tokens), dtype=np.float32) * 2.0
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        out[i] = weights / weights.sum(-1, keepdims=True)
    return out


def _first_calls(grid: int, n_prefix: int) -> dict[str, tuple[float, float]]:
    """{kernel: (first call, second call)} of offset_maps on a small input, in this process."""
    from analyses.vit_heads.attention import offset_maps

    tokens = n_prefix + grid * grid
    small = np.full((1, 2, tokens, tokens), 1.0 / tokens, dtype=np.float32)
    out = {}
    for name, parallel in (("serial", False), ("parallel", True)):
        calls = []
        for _ in range(2):
            t0 = time.perf_counter()
            offset_maps(small, (grid, grid), n_prefix, parallel=parallel)
            calls.append(time.perf_counter() - t0)
        out[name] = (calls[0], calls[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", default="8,32,128", help="numbers of images N, comma-separated")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (14 for 224 px / patch 16)")
    parser.add_argument("--n-prefix", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="numba threads for the parallel row (0: all)")
    parser.add_argument(
        "--layer",
        choices=["default", "workqueue", "omp", "tbb"],
        default="default",
        help="numba threading layer (NUMBA_THREADING_LAYER)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.first_call:  # the second process: load the kernels from the cache the first one wrote
        print("RESULT " + json.dumps(_first_calls(args.grid, args.n_prefix)))
        return

    cache_dir = tempfile.mkdtemp(prefix="headlab-numba-cache-")
    os.environ["NUMBA_CACHE_DIR"] = cache_dir  # before numba is imported
    os.environ["NUMBA_THREADING_LAYER"] = args.layer
    import numba

    from analyses.vit_heads.attention import offset_maps, offset_maps_numpy

    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    cold = _first_calls(args.grid, args.n_prefix)
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--first-call",
            "--grid",
            str(args.grid),
            "--n-prefix",
            str(args.n_prefix),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "NUMBA_CACHE_DIR": cache_dir},
        check=False,
    )
    lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    cached = json.loads(lines[0]) if lines else None

    grid = (args.grid, args.grid)
    tokens = args.n_prefix + args.grid * args.grid
    print(
        f"offset maps: {args.heads} heads, {args.grid}×{args.grid} grid + {args.n_prefix} prefix = {tokens} "
        f"tokens; median of {args.repeats}; {os.cpu_count()} CPUs, numba {numba.__version__} "
        f"({numba.threading_layer()} layer, {threads} threads)"
    )
    for name, (first, second) in cold.items():
        line = (
            f"numba {name} kernel: first call (cold compile) {first:.2f} s, next call {second * 1e3:.2f} ms"
        )
        if cached:
            line += f"; first call in a new process (from numba's on-disk cache) {cached[name][0]:.3f} s"
        print(line)
    if not cached:
        print(f"the cached-load run failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    print()
    header = f"{'N':>5} {'renorm':>6} {'MB':>7}  {'method':<12} {'ms':>9} {'GB/s':>6} {'speed-up':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))

    for n_images in (int(x) for x in args.images.split(",") if x):
        patterns = _patterns(n_images, args.heads, tokens, args.seed)
        megabytes = patterns.nbytes / 1e6
        for renormalise in (False, True):
            methods: dict[str, Callable[[], np.ndarray]] = {
                "numpy": partial(offset_maps_numpy, patterns, grid, args.n_prefix, renormalise=renormalise),
                "numba 1 thr": partial(
                    offset_maps, patterns, grid, args.n_prefix, renormalise=renormalise, parallel=False
                ),
                f"numba {threads} thr": partial(
                    offset_maps, patterns, grid, args.n_prefix, renormalise=renormalise, parallel=True
                ),
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            results: dict[str, np.ndarray] = {}
            for _ in range(args.repeats):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    results[name] = fn()
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["numpy"])
            for name, runs in times.items():
                sec = statistics.median(runs)
                diff = float(np.abs(results[name] - results["numpy"]).max())
                print(
                    f"{n_images:>5} {'yes' if renormalise else 'no':>6} {megabytes:>7.0f}  {name:<12} "
                    f"{sec * 1e3:>9.1f} {megabytes / 1e3 / sec:>6.2f} {base / sec:>8.2f}x {diff:>11.1e}",
                    flush=True,
                )
        del patterns
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
