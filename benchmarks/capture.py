"""Census statistics at long context: what each way of reading attention costs, side by side.

For one model and each sequence length T, every method runs in its own fresh process (so peak memory
is its own) on the same repeated-random-token input (a block of T/2 tokens twice), batch 1:

* ``floor``        plain transformers forward with its SDPA kernel, no statistics (the floor)
* ``floor_last``   the same forward asking only for the last position's logits (``logits_to_keep=1``,
                   as the recompute capture does): the stricter floor, printed as a second ratio
* ``bridge``       TransformerBridge forward, no hooks (eager attention, what the bridge costs anyway)
* ``eager``        probe capture, eager mode: census reducers inside ``hook_pattern``
* ``recompute``    probe capture, recompute mode: SDPA for the model, statistics from q/k
* ``run_with_cache`` TransformerLens ``run_with_cache`` of every ``hook_pattern``, then the same
                   statistics on the cached patterns (what a user of TransformerLens would write)

Printed: median wall time over ``--repeats`` timed runs after one warm-up, and peak memory (GPU:
``torch.cuda.max_memory_allocated``, weights included; CPU: peak resident set size of the process,
weights and libraries included), both as ratios to the floor. The eager and recompute statistics
are also compared with each other (max abs difference) so a fast wrong answer cannot pass.

``--interleaved`` times only ``floor_last`` against ``recompute``, alternated in one process (a
shared machine's slow phases then hit both alike; memory comes from the per-process rows).

Usage::

    python benchmarks/capture.py --model smollm2-135m --device cpu --lengths 512,2048
    python benchmarks/capture.py --model /path/to/model.gguf --device cuda --dtype bfloat16 --lengths 2048,4096,8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("floor", "floor_last", "bridge", "eager", "recompute", "run_with_cache")
ROOT = Path(__file__).resolve().parents[1]


def _reducers(T: int, bos: int) -> list[Any]:
    from probe.reducers import ColumnImportance, DiagonalScore, MeanDistance, RowEntropy

    n = (T - bos) // 2
    return [
        RowEntropy(),
        MeanDistance(),
        DiagonalScore(1, name="prev_token"),
        ColumnImportance(),
        DiagonalScore(n - 1, query_from=bos + n, query_to=bos + 2 * n, name="induction"),
        DiagonalScore(n, query_from=bos + n, query_to=bos + 2 * n, name="duplicate_token"),
    ]


def _repeated_row(model: Any, T: int) -> list[int]:
    """The benchmark's input: a seeded block of random tokens twice, T tokens with the BOS if any."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n = (T - int(model.bos.prepend)) // 2
    block = torch.randint(1000, min(len(model.tokenizer), 30000), (n,), generator=gen).tolist()
    return block + block


def _summaries(reducers: list[Any]) -> dict[str, list[float]]:
    import torch

    out = {}
    for r in reducers:
        res = r.result()
        if res.dim() == 4:  # alpha: keep alpha_0 and the mean over positions
            out["alpha_0"] = res[0, :, :, 0].flatten().tolist()
            out["alpha_mean"] = torch.nanmean(res[0], dim=-1).flatten().tolist()
        else:
            out[r.name] = res[0].flatten().tolist()
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    import probe
    from probe.capture import capture

    device = torch.device(args.device)
    model = probe.load_model(args.model, device=args.device, dtype=args.dtype)
    T = args.T
    bos = int(model.bos.prepend)
    row = _repeated_row(model, T)
    ids = model.batch_from_ids([row]).input_ids
    cuda = device.type == "cuda"
    stats: dict[str, list[float]] = {}

    plain = None
    if args.method in ("floor", "floor_last"):
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(
            model.path, dtype=model.dtype, attn_implementation="sdpa"
        )
        plain = plain.to(device).eval()
        del model.bridge, model.hf_model, model.native_model  # the floor holds one copy of the weights
        if cuda:
            torch.cuda.empty_cache()

    def once() -> None:
        nonlocal stats
        with torch.no_grad():
            if args.method == "floor":
                assert plain is not None
                plain(input_ids=ids, use_cache=False)
            elif args.method == "floor_last":
                assert plain is not None
                plain(input_ids=ids, use_cache=False, logits_to_keep=1)
            elif args.method == "bridge":
                model.bridge(ids)  # type: ignore[misc]
            elif args.method in ("eager", "recompute"):
                reds = _reducers(T, bos)
                capture(
                    model,
                    [row],
                    reds,
                    mode=args.method,
                    batch_size=1,
                    query_block=args.query_block,
                    progress=False,
                )
                stats = _summaries(reds)
            else:
                reds = _reducers(T, bos)
                from probe.reducers import BatchInfo

                _, cache = model.bridge.run_with_cache(  # type: ignore[union-attr]
                    ids, names_filter=lambda name: name.endswith("hook_pattern")
                )
                info = BatchInfo(
                    lengths=torch.tensor([T], device=device),
                    pad_offsets=torch.tensor([0], device=device),
                    T=T,
                    n_layers=model.n_layers,
                    n_heads=model.n_heads,
                )
                for r in reds:
                    r.begin_batch(info)
                for layer in range(model.n_layers):
                    pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()
                    for r in reds:
                        r.update(layer, pattern, 0)
                for r in reds:
                    r.end_batch()
                del cache
                stats = _summaries(reds)
        if cuda:
            torch.cuda.synchronize()

    once()  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    print("RESULT " + json.dumps({"seconds": statistics.median(times), "peak_bytes": peak, "stats": stats}))


def interleaved(args: argparse.Namespace) -> None:
    """Time the recompute capture against the floor (last-position logits) in one process, the two
    alternated: each pair runs back to back, so slow phases of a shared machine affect both."""
    import torch

    import probe
    from probe.capture import capture
    from probe.kernels import native_attention

    model = probe.load_model(args.model, device=args.device, dtype=args.dtype)
    cuda = model.device.type == "cuda"
    print(f"model {args.model} on {args.device} ({args.dtype}), batch 1, {args.repeats} alternated pairs")
    print(
        f"{'T':>6}  {'floor_last ms':>13} {'recompute ms':>13} {'ratio of medians':>17} {'median ratio':>13}"
    )
    for T in [int(x) for x in args.lengths.split(",")]:
        bos = int(model.bos.prepend)
        row = _repeated_row(model, T)
        ids = model.batch_from_ids([row]).input_ids

        def timed(fn: Any) -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def floor(ids: torch.Tensor = ids) -> None:
            with native_attention(model, "sdpa") as native, torch.no_grad():
                native(input_ids=ids, use_cache=False, logits_to_keep=1)

        def recompute(row: list[int] = row, T: int = T, bos: int = bos) -> None:
            capture(model, [row], _reducers(T, bos), mode="recompute", batch_size=1, progress=False)

        for _ in range(2):  # warm-up: kernels compiled and tuned, allocator primed
            floor()
            recompute()
        pairs = [(timed(floor), timed(recompute)) for _ in range(args.repeats)]
        f = statistics.median(p[0] for p in pairs)
        r = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[1] / p[0] for p in pairs)
        print(f"{T:>6}  {f * 1e3:>13.1f} {r * 1e3:>13.1f} {r / f:>17.2f} {ratio:>13.2f}", flush=True)


def run_one(args: argparse.Namespace, method: str, T: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--T",
        str(T),
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--query-block",
        str(args.query_block),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = (
        any("out of memory" in t.lower() or "outofmemory" in t.lower() for t in tail) or proc.returncode == -9
    )
    return {"error": "out of memory" if oom else " | ".join(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--query-block", type=int, default=512)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="time only: floor_last and recompute alternated in one process, --repeats pairs per length "
        "(drift of a shared machine hits both alike)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.interleaved:
        interleaved(args)
        return

    import probe

    model = probe.load_model(args.model, device="cpu")  # fetch/convert once, before the workers
    args.model = model.path if model.source == "gguf" else args.model
    del model
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    results: dict[int, dict[str, dict[str, Any]]] = {}
    print(f"model {args.model} on {args.device} ({args.dtype}), batch 1, median of {args.repeats}")
    for T in lengths:
        results[T] = {}
        for method in methods:
            res = run_one(args, method, T)
            results[T][method] = res
            shown = (
                "error: " + res["error"]
                if "error" in res
                else f"{res['seconds'] * 1e3:.1f} ms, {res['peak_bytes'] / 2**30:.2f} GiB"
            )
            print(f"  T={T:<6} {method:<15} {shown}", flush=True)
    print()
    header = (
        f"{'T':>6}  {'method':<15} {'time ms':>9} {'x floor':>8} {'peak GiB':>9} {'x floor':>8}"
        f" {'x floor_last':>13} {'(memory)':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for T, by_method in results.items():
        floor = by_method.get("floor", {})
        last = by_method.get("floor_last", {})
        for method, res in by_method.items():
            if "error" in res:
                print(
                    f"{T:>6}  {method:<15} {'-':>9} {'-':>8} {'-':>9} {'-':>8} {'-':>13} {'-':>9}  {res['error']}"
                )
                continue
            tr = res["seconds"] / floor["seconds"] if "seconds" in floor else float("nan")
            mr = res["peak_bytes"] / floor["peak_bytes"] if "peak_bytes" in floor else float("nan")
            tl = res["seconds"] / last["seconds"] if "seconds" in last else float("nan")
            ml = res["peak_bytes"] / last["peak_bytes"] if "peak_bytes" in last else float("nan")
            note = ""
            if method == "eager" and "seconds" in by_method.get("bridge", {}):
                note = f"{res['seconds'] / by_method['bridge']['seconds']:.2f}x bridge forward"
            if method == "eager" and "peak_bytes" in by_method.get("run_with_cache", {}):
                note += f"; 1/{by_method['run_with_cache']['peak_bytes'] / res['peak_bytes']:.1f} of run_with_cache memory"
            if method == "recompute" and "stats" in by_method.get("eager", {}):
                # relative to max(1, |eager|): distances are hundreds of tokens, scores are below 1
                diffs = {
                    k: max(
                        abs(a - b) / max(1.0, abs(b))
                        for a, b in zip(res["stats"][k], by_method["eager"]["stats"][k], strict=True)
                    )
                    for k in res["stats"]
                }
                worst = max(diffs, key=lambda k: diffs[k])
                note = f"max rel. diff vs eager {diffs[worst]:.1e} ({worst})"
            print(
                f"{T:>6}  {method:<15} {res['seconds'] * 1e3:>9.1f} {tr:>8.2f} {res['peak_bytes'] / 2**30:>9.2f}"
                f" {mr:>8.2f} {tl:>13.2f} {ml:>9.2f}  {note}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
