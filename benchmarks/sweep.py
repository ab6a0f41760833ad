"""Sweeps on Ray against the same tasks in a plain loop in one process, side by side in one run.

Two workloads, each run four ways into its own empty run store:

* ``short``: ``--short-tasks`` census tasks on a tiny model (a few hundredths of a second each):
  what Ray costs per task when the work is nothing.
* ``long``: ``--long-tasks`` census tasks on ``--model`` (about 10 s each on two CPU cores with the
  default settings), one per seed.

The four ways:

* ``loop``        :func:`analyses.sweep.run_sweep` with ``in_process=True``: the tasks one after the
                  other in this process, the model loaded once (the floor a sweep is held to).
* ``ray``         the sweep on a local Ray cluster started for it (``ray.init`` counted), one CPU
                  per task, workers keeping their model for the next task (``worker_models = 1``).
* ``ray-1slot``   the same with two CPUs per task, so one task runs at a time, as in the loop: the
                  pure overhead of Ray's scheduling, workers and result transfer.
* ``ray-noreuse`` one CPU per task, ``worker_models = 0``: every task loads its model again.

Printed per row: wall time (Ray rows: with the cluster start, and the sweep alone), the ratio to
``loop``, the overhead per task, and how many times a model was loaded. Every sweep's runs are
checked equal (table for table) to the loop's.

Usage::

    python benchmarks/sweep.py                       # both workloads (about 4 minutes on 2 cores)
    python benchmarks/sweep.py --long-tasks 0        # only the per-task overhead
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = {
    "loop": {"in_process": True},
    "ray": {"cpus": 1, "worker_models": 1},
    "ray-1slot": {"cpus": 2, "worker_models": 1},
    "ray-noreuse": {"cpus": 1, "worker_models": 0},
}


def _spec(model: str, n: int, settings: dict[str, Any], cpus: float, worker_models: int) -> Any:
    from analyses import sweep as sweeps

    return sweeps.check_spec(
        {
            "name": "bench",
            "models": [model],
            "seeds": n,
            "worker_models": worker_models,
            "resources": {"cpus": cpus},
            "analyses": {"census": {"set": settings}},
        }
    )


def _same_runs(a: Any, b: Any) -> bool:
    import pandas as pd

    from analyses import runstore

    for ta, tb in zip(a.tasks, b.tasks, strict=True):
        ra, rb = runstore.open_run(a.root / str(ta.run_id)), runstore.open_run(b.root / str(tb.run_id))
        for name in ra.table_names:
            try:
                pd.testing.assert_frame_equal(ra.table(name), rb.table(name))
            except AssertionError:
                return False
    return True


def run_way(way: str, model: str, n: int, settings: dict[str, Any], store: Path) -> dict[str, Any]:
    import ray

    from analyses import sweep as sweeps

    opts = WAYS[way]
    cpus, keep = float(opts.get("cpus", 1)), int(opts.get("worker_models", 1))
    spec = _spec(model, n, settings, cpus, keep)
    t0 = time.perf_counter()
    if opts.get("in_process"):
        state = sweeps.run_sweep(spec, root=store, in_process=True, progress=False)
        t1 = t0
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        t1 = time.perf_counter()
        state = sweeps.run_sweep(spec, root=store, progress=False)
    wall = time.perf_counter() - t0
    if not opts.get("in_process"):
        ray.shutdown()
    counts = state.counts()
    if counts["done"] != n:
        raise SystemExit(f"{way}: {counts} (expected {n} done): {sweeps.summary(state)}")
    return {"way": way, "wall": wall, "sweep": wall - (t1 - t0), "loads": state.models_loaded, "state": state}


def workload(
    name: str, model: str, n: int, settings: dict[str, Any], ways: list[str]
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="headlab-sweep-bench-") as tmp:
        for way in ways:
            print(f"[{name}] {way}: {n} tasks on {model} ...", file=sys.stderr, flush=True)
            rows.append(run_way(way, model, n, settings, Path(tmp) / way))
        loop = rows[0]
        for row in rows:
            row["ratio"] = row["wall"] / loop["wall"]
            row["ratio_sweep"] = row["sweep"] / loop["wall"]
            row["per_task"] = (row["wall"] - loop["wall"]) / n
            row["equal"] = _same_runs(loop["state"], row["state"])
    print(f"\n{name}: {n} census tasks on {model} ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    print(
        f"{'way':<12} {'wall s':>8} {'sweep s':>8} {'x loop':>7} {'x loop (sweep)':>15} {'overhead/task s':>16} {'loads':>6} {'runs equal':>11}"
    )
    for r in rows:
        print(
            f"{r['way']:<12} {r['wall']:8.2f} {r['sweep']:8.2f} {r['ratio']:7.2f} {r['ratio_sweep']:15.2f} "
            f"{r['per_task']:16.3f} {r['loads']:6d} {('yes' if r['equal'] else 'NO'):>11}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="the model of the long tasks")
    parser.add_argument("--long-tasks", type=int, default=4, help="long tasks (one per seed); 0 skips them")
    parser.add_argument("--short-tasks", type=int, default=24, help="short tasks on tiny-gpt2; 0 skips them")
    parser.add_argument(
        "--ways", default=",".join(WAYS), help="which of " + ", ".join(WAYS) + " (loop first)"
    )
    args = parser.parse_args()
    ways = ["loop", *[w for w in args.ways.split(",") if w and w != "loop"]]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise SystemExit(f"unknown way(s) {unknown}; choose from {', '.join(WAYS)}")
    import os

    print(f"{os.cpu_count()} CPUs; Ray {__import__('ray').__version__}")
    tiny = {"n_natural": 2, "n_repeated": 2, "seq_len": 8, "repeat_len": 2, "batch_size": 1, "n_examples": 1}
    long = {"n_natural": 24, "seq_len": 128, "n_repeated": 8, "n_examples": 2}
    if args.short_tasks:
        workload("short", "tiny-gpt2", args.short_tasks, tiny, ways)
    if args.long_tasks:
        workload("long", args.model, args.long_tasks, long, ways)


if __name__ == "__main__":
    main()
