"""A sweep on 1, 2, 4 and 8 GPUs of one host: wall time, GPU utilisation, scaling, and a killed worker.

The sweep: ``--models`` × every language analysis (``--analyses``) × ``--seeds`` seeds, one GPU a
task. Its models, by default, are random-weight copies of the embedded models' architectures
(``smollm2-135m``: Llama, 30 layers, d 576, 9 heads / 3 KV heads, vocab 49152; ``gemma3-270m``:
Gemma 3, 18 layers of sliding-window and global attention, d 640, 4 heads / 1 KV head, head dim
256, vocab 262144), built from their configs (below) with a seeded initialiser and a byte-level
tokenizer that keeps the analyses' words whole, saved once as checkpoint directories under
``--store``: nothing is downloaded and no cache is needed. ``--models real`` takes the embedded
models themselves (from the cache); any model names work too (``--models tiny-llama,tiny-gpt2``).
``--small`` shrinks the copies (4 layers, d 64) for a run on CPUs.

**Scaling.** For each n of ``--gpus`` (default 1, 2, 4, 8, as many as the host has): a Ray
cluster of the first n GPUs (``CUDA_VISIBLE_DEVICES``), the sweep into its own empty run store,
its wall time (the cluster's start apart), the GPUs' utilisation sampled every half second (NVML,
else ``nvidia-smi``), and the scaling efficiency T1 / (n · Tn). Every run's tables are checked
equal to the 1-GPU run's, task for task. **Fault** (``--fault``): the sweep once more on the
largest n, with one worker killed (SIGKILL) as it starts a task a third of the way through; then
checked: every task done, the lost task run again, every task finished before the kill run once,
the tables equal to the 1-GPU run's. Each attempt leaves a mark (its pid) under the store.

``--store DIR`` keeps models, run stores and ``results.json`` (a later ``--gpus 2,4,8`` with the
same store takes its 1-GPU run as the reference). ``--simulate-gpus N``: no GPUs, Ray counts N,
the models run on the CPU (timings then prove the code, not GPUs).

Usage::

    python benchmarks/sweep_gpus.py --store reports/sweep-gpus --fault          # on the GPU host
    python benchmarks/sweep_gpus.py --simulate-gpus 4 --small --analyses census,sinks,ioi --seeds 2 --fault
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COPIES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "class": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "config": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=True,
        ),
        "small": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    },
    "gemma3-270m": {
        "class": "Gemma3TextConfig",
        "model": "Gemma3ForCausalLM",
        "config": dict(
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            vocab_size=262144,
            max_position_embeddings=32768,
            sliding_window=512,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
            rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
        ),
        "small": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=16,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        ),
    },
}


# ----------------------------------------------------------------------------------------- models


def build_copy(name: str, where: Path, small: bool, seed: int = 0) -> Path:
    """The random-weight copy of ``name``'s architecture as a checkpoint directory (built once)."""
    import torch
    import transformers

    from analyses.tasks import colored_objects as co
    from analyses.tasks import ioi
    from probe.tiny import byte_tokenizer

    target = where / f"{name}-copy{'-small' if small else ''}"
    if (target / "config.json").is_file():
        return target
    recipe = COPIES[name]
    words = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *co.OBJECTS, *co.COLOURS, *co.SURFACES]
    tokenizer = byte_tokenizer(prepend_bos=True, words=words)
    kwargs = {**recipe["config"], **(recipe["small"] if small else {})}
    if small:
        kwargs["vocab_size"] = len(tokenizer)
    config = getattr(transformers, recipe["class"])(bos_token_id=0, eos_token_id=1, pad_token_id=2, **kwargs)
    print(f"building the random-weight copy of {name} ({'small' if small else 'full size'}) ...", flush=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, recipe["model"])(config).eval()
    partial = where / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def resolve_models(models: str, store: Path, small: bool) -> list[str]:
    if models in ("copies", "real"):
        names = list(COPIES)
        if models == "real":
            return names
        return [str(build_copy(name, store / "models", small)) for name in names]
    return [m for m in models.split(",") if m]


def language_analyses() -> list[str]:
    from analyses import registry

    return [
        name
        for name, entry in registry.ANALYSES.items()
        if name == entry.name and "language" in entry.model_kinds and not entry.reads_run_store
    ]


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``ANALYSIS.SETTING=VALUE`` (VALUE read as JSON, else text) per analysis."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, text = item.partition("=")
        analysis, dot, key = head.partition(".")
        if not sep or not dot or not analysis or not key:
            raise SystemExit(f"--set {item!r}: give ANALYSIS.SETTING=VALUE, e.g. census.seq_len=256")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(analysis, {})[key] = value
    return out


# ------------------------------------------------------------------------------------------- GPUs


def host_gpus() -> list[str]:
    """The GPUs of this host (``CUDA_VISIBLE_DEVICES`` if set, else NVML's or nvidia-smi's count)."""
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if shown is not None:
        return [g for g in shown.split(",") if g.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
        return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
    return []


class Utilisation:
    """Samples the utilisation (%) of the given GPUs every ``every`` seconds in a thread: NVML
    (nvidia-ml-py) where it imports, else ``nvidia-smi``; nothing where neither is there."""

    def __init__(self, gpus: Sequence[str], every: float = 0.5) -> None:
        self.gpus = [int(g) for g in gpus if g.isdigit()]
        self.every = every
        self.samples: list[list[float]] = []
        self.how = "none"
        self._read: Callable[[], list[float]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.gpus:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpus]
            self._read = lambda: [float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]
            self.how = "nvml"
        except Exception:
            if shutil.which("nvidia-smi"):
                self._read = self._smi
                self.how = "nvidia-smi"

    def _smi(self) -> list[float]:
        query = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]
        rows = subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()
        seen = {int(a): float(b) for a, b in (r.split(",") for r in rows if "," in r)}
        return [seen.get(i, float("nan")) for i in self.gpus]

    def _loop(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self.every):
            self.samples.append(self._read())

    def __enter__(self) -> Utilisation:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def per_gpu(self) -> list[float]:
        if not self.samples:
            return []
        return [statistics.fmean(s[i] for s in self.samples) for i in range(len(self.gpus))]


# ------------------------------------------------------------------------------------------ sweeps


def make_spec(models: list[str], analyses: list[str], seeds: int, sets: dict[str, Any], args: Any) -> Any:
    from analyses import sweep as sweeps

    return sweeps.check_spec(
        {
            "name": "scaling",
            "models": models,
            "seeds": seeds,
            "dtype": args.dtype,
            "device": "cuda",
            "worker_models": 1,
            "resources": {"cpus": args.cpus_per_task},
            "analyses": {name: {"set": sets.get(name, {})} for name in analyses},
        },
        "sweep_gpus",
    )


def marking(marks: Path) -> Callable[..., Any]:
    """A task function that writes a mark per attempt (``start-INDEX-ATTEMPT`` holding the pid,
    then ``done-INDEX-ATTEMPT``) around the real task. Defined in a function, so Ray pickles it
    by value into its workers."""

    def task_fn(task: Any, key: str, keep: int, root: str | None) -> Any:
        from analyses import sweep as sweeps

        marks.mkdir(parents=True, exist_ok=True)
        attempt = len(list(marks.glob(f"start-{task.index}-*"))) + 1
        (marks / f"start-{task.index}-{attempt}").write_text(str(os.getpid()))
        outcome = sweeps.run_task(task, key, keep, root)
        (marks / f"done-{task.index}-{attempt}").write_text(str(os.getpid()))
        return outcome

    return task_fn


def run_on(n: int, gpus: list[str], spec: Any, store: Path, args: Any, task_fn: Any = None) -> dict[str, Any]:
    """The sweep on a Ray cluster of ``n`` GPUs, into an empty run store ``store``."""
    import ray

    from analyses import sweep as sweeps

    shutil.rmtree(store, ignore_errors=True)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not args.simulate_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:n])
    t0 = time.perf_counter()
    try:
        ray.init(num_gpus=n, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        t1 = time.perf_counter()
        with Utilisation([] if args.simulate_gpus else gpus[:n]) as util:
            extra = {"task_fn": task_fn} if task_fn is not None else {}
            state = sweeps.run_sweep(spec, root=store, simulate_gpus=args.simulate_gpus, **extra)
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    per_analysis: dict[str, list[float]] = {}
    for t in state.tasks:
        if t.status == "done" and "run_s" in t.worker:
            per_analysis.setdefault(t.analysis, []).append(t.worker["run_s"])
    run_s = [s for times in per_analysis.values() for s in times]
    placed = sorted({g for t in state.tasks for g in t.worker.get("gpus", [])})
    return {
        "gpus": n,
        "sweep_s": round(t2 - t1, 2),
        "start_s": round(t1 - t0, 2),
        "tasks": len(state.tasks),
        "counts": state.counts(),
        "task_s_median": round(statistics.median(run_s), 2) if run_s else None,
        "task_s_by_analysis": {a: round(statistics.median(v), 2) for a, v in per_analysis.items()},
        "loads": state.models_loaded,
        "gpus_used": placed,
        "util_how": util.how,
        "util_per_gpu": [round(u, 1) for u in util.per_gpu()],
        "store": str(store),
        "problems": sweeps.summary(state).splitlines()[2:],
        "state": state,
    }


def compare(reference: Path, other: Path) -> str:
    """``identical``, ``equal`` (within pandas' default tolerance) or what differs: the tables of
    every run of ``other`` against the run of the same task key in ``reference``."""
    import pandas as pd

    from analyses import runstore
    from analyses.sweep.state import done_runs

    ref, got = done_runs(reference), done_runs(other)
    if set(ref) != set(got):
        return f"DIFFER: {len(set(ref) ^ set(got))} task key(s) in one store only"
    worst = "identical"
    for key, run_id in ref.items():
        a, b = runstore.open_run(reference / run_id), runstore.open_run(other / got[key])
        if a.table_names != b.table_names:
            return f"DIFFER: run {run_id} has tables {a.table_names}, the other {b.table_names}"
        for name in a.table_names:
            try:
                pd.testing.assert_frame_equal(a.table(name), b.table(name), check_exact=True)
            except AssertionError:
                try:
                    pd.testing.assert_frame_equal(a.table(name), b.table(name))
                except AssertionError as err:
                    return f"DIFFER: {a.analysis} table {name}: {' '.join(str(err).split())[:200]}"
                worst = "equal (not bit for bit)"
    return worst


def fault(n: int, gpus: list[str], spec: Any, store: Path, args: Any, reference: Path) -> dict[str, Any]:
    """The sweep on ``n`` GPUs with one worker killed as it starts a task a third of the way in."""
    from analyses.sweep.state import done_runs

    marks = store.parent / f"{store.name}-marks"
    shutil.rmtree(marks, ignore_errors=True)
    total = len(spec.tasks())
    seen: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + args.fault_wait
        while time.monotonic() < deadline:
            done = {m.name.split("-")[1] for m in marks.glob("done-*")}
            if len(done) >= max(1, total // 3):
                running = [m for m in marks.glob("start-*-1") if m.name.split("-")[1] not in done]
                fresh = sorted(running, key=lambda m: m.stat().st_mtime, reverse=True)
                if fresh:
                    seen["done_before"] = sorted(int(i) for i in done)
                    seen["pid"] = int(fresh[0].read_text())
                    seen["at"] = time.time()
                    os.kill(seen["pid"], signal.SIGKILL)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    row = run_on(n, gpus, spec, store, args, task_fn=marking(marks))
    thread.join(timeout=1)
    starts: dict[int, list[int]] = {}
    for m in marks.glob("start-*"):
        _, index, attempt = m.name.split("-")
        starts.setdefault(int(index), []).append(int(attempt))
    lost = sorted(
        int(m.name.split("-")[1])
        for m in marks.glob("start-*")
        if "pid" in seen
        and int(m.read_text()) == seen["pid"]
        and not (marks / m.name.replace("start", "done")).exists()
    )
    twice = sorted(i for i, a in starts.items() if len(a) > 1)
    again_done = sorted(i for i in seen.get("done_before", []) if len(starts.get(i, [])) > 1)
    checks = {
        "killed": "pid" in seen,
        "all done": row["counts"]["done"] == total,
        "one task lost and run again": len(lost) == 1 and twice == lost,
        "nothing finished before the kill ran twice": not again_done,
        "every task started": len({*starts}) == total,
        "one run per task in the store": len(done_runs(store)) == total,
        "tables": compare(reference, store),
    }
    row.update(fault=seen, lost=lost, ran_twice=twice, checks=checks)
    return row


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpus", default="", help="GPU counts, e.g. 1,2,4,8 (default: powers of 2 the host has)"
    )
    parser.add_argument("--simulate-gpus", type=int, default=0, metavar="N", help="no GPUs: Ray counts N")
    parser.add_argument(
        "--models", default="copies", help="copies (default), real, or model names, comma-separated"
    )
    parser.add_argument("--small", action="store_true", help="small copies (4 layers, d 64) for CPUs")
    parser.add_argument("--analyses", default="", help="comma-separated (default: every language analysis)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="ANALYSIS.SETTING=VALUE")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--cpus-per-task", type=float, default=0.0, help="default: the host's CPUs / the most GPUs"
    )
    parser.add_argument("--fault", action="store_true", help="then the killed-worker run on the most GPUs")
    parser.add_argument(
        "--fault-wait", type=float, default=600.0, help="seconds to wait for the moment to kill"
    )
    parser.add_argument(
        "--store", default="", help="keep models, runs and results.json here (default: a temporary dir)"
    )
    args = parser.parse_args()

    gpus = [str(i) for i in range(args.simulate_gpus)] if args.simulate_gpus else host_gpus()
    if not gpus:
        raise SystemExit("no GPUs found (nvidia-smi, NVML, CUDA_VISIBLE_DEVICES); on CPUs: --simulate-gpus N")
    counts = [int(c) for c in args.gpus.split(",") if c] or [n for n in (1, 2, 4, 8) if n <= len(gpus)]
    if max(counts) > len(gpus):
        raise SystemExit(f"--gpus {args.gpus}: this host has {len(gpus)} GPU(s)")
    if not args.cpus_per_task:
        args.cpus_per_task = max(0.25, min(8.0, (os.cpu_count() or 1) / max(counts)))
    store = Path(args.store or tempfile.mkdtemp(prefix="headlab-sweep-gpus-")).resolve()
    store.mkdir(parents=True, exist_ok=True)
    models = resolve_models(args.models, store, args.small)
    analyses = [a for a in args.analyses.split(",") if a] or language_analyses()
    spec = make_spec(models, analyses, args.seeds, parse_sets(args.set), args)
    results_file = store / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if 1 not in counts and "1" not in results:
        raise SystemExit(f"no 1-GPU run in {results_file} to compare with: add 1 to --gpus")
    mode = f"{len(gpus)} GPUs simulated on the CPU" if args.simulate_gpus else f"{len(gpus)} GPU(s)"
    print(
        f"{mode}; {os.cpu_count()} CPUs, {args.cpus_per_task:g} a task; Ray {__import__('ray').__version__}\n"
        f"sweep: {len(models)} models x {len(analyses)} analyses x {args.seeds} seeds = {len(spec.tasks())} "
        f"tasks ({args.dtype}); store {store}",
        flush=True,
    )
    for n in counts:
        print(f"\n--- {n} GPU(s) ---", flush=True)
        row = run_on(n, gpus, spec, store / f"runs-{n}", args)
        row.pop("state")
        results[str(n)] = row
        results_file.write_text(json.dumps(results, indent=1))
    t1, reference = results["1"]["sweep_s"], Path(results["1"]["store"])
    print(
        f"\n{'GPUs':>4} {'sweep s':>8} {'start s':>8} {'task s (median)':>16} {'efficiency':>10} "
        f"{'loads':>6} {'GPUs used':>10} {'util % (mean per GPU)':>24}  tables vs 1 GPU"
    )
    for key in sorted(results, key=int):
        row = results[key]
        n = int(key)
        row["efficiency"] = round(t1 / (n * row["sweep_s"]), 3)
        row["tables"] = "reference" if n == 1 else compare(reference, Path(row["store"]))
        util = ", ".join(f"{u:.0f}" for u in row["util_per_gpu"]) or f"n/a ({row['util_how']})"
        print(
            f"{n:4d} {row['sweep_s']:8.2f} {row['start_s']:8.2f} {row['task_s_median']!s:>16} "
            f"{row['efficiency']:10.3f} {row['loads']:6d} {len(row['gpus_used']):10d} {util:>24}  {row['tables']}"
        )
        for line in row["problems"]:
            print(f"     {line}")
    by = results["1"].get("task_s_by_analysis", {})
    print(
        "\ntask run time on 1 GPU, median per analysis (s): " + ", ".join(f"{a} {v}" for a, v in by.items())
    )
    short = [a for a, v in by.items() if v < 30]
    if short:
        print(f"under 30 s (the efficiency target is for tasks of 30 s or more): {', '.join(short)}")
    results_file.write_text(json.dumps(results, indent=1))
    if args.fault:
        n = max(counts)
        print(f"\n--- fault: {n} GPU(s), one worker killed a third of the way in ---", flush=True)
        row = fault(n, gpus, spec, store / f"runs-fault-{n}", args, reference)
        row.pop("state")
        results["fault"] = row
        results_file.write_text(json.dumps(results, indent=1))
        print(
            f"killed pid {row['fault'].get('pid')} after tasks {row['fault'].get('done_before')} were done; "
            f"lost task(s) {row['lost']}, run twice {row['ran_twice']}; sweep {row['sweep_s']:.2f} s"
        )
        for name, ok in row["checks"].items():
            print(f"  {name}: {ok}")
        if not all(
            v is True or (isinstance(v, str) and not v.startswith("DIFFER")) for v in row["checks"].values()
        ):
            raise SystemExit("the fault run failed a check (above)")
    print(f"\nresults: {results_file}")


if __name__ == "__main__":
    main()
