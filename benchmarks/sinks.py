"""The sink metric (Gu et al., ICLR 2025) three ways: what each costs, and that they agree.

For one model, one input set (default: natural text) of ``--n`` sequences of ``--T`` tokens (BOS
included when the tokenizer prepends one, as in the paper's code), every method runs in its own
fresh process, so that its peak memory is its own:

* ``ours_eager``      probe capture, eager mode: ``alpha`` reduced inside the bridge's
                      ``hook_pattern`` (:class:`analyses.sinks.SinkReducer`, i.e. ColumnImportance),
                      ``--batch-size`` sequences at a time; only ``O(L·H·T)`` per sample is kept.
* ``ours_recompute``  probe capture, recompute mode: the model runs SDPA, alpha from q/k blockwise.
* ``papers``          the official method (sail-sg/Attention-Sink ``eval_sink_open_source.py``):
                      plain transformers ``AutoModelForCausalLM.from_pretrained(path,
                      attn_implementation="eager")``, one sequence at a time with
                      ``output_attentions=True``; every layer's ``[H, T, T]`` attention of every
                      sample is kept (``[N, L, H, T, T]``), then ``alpha = (A / (T - k)).sum(-2)``
                      and ``Sink = mean(alpha > eps)`` over samples, layers and heads. (The official
                      script calls ``generate(max_new_tokens=1)``; its attentions are those of the
                      same prefill forward, which is what is run here.)

Printed per method: median wall time of ``--repeats`` timed runs (after a short warm-up), and
memory: on CPU the peak resident set size of the process (``ru_maxrss``: weights and libraries
included) and the peak *during the timed runs* above the resident size after loading (Linux:
``/proc/self/clear_refs`` resets the high-water mark ``VmHWM``); on a GPU
``torch.cuda.max_memory_allocated`` (weights included). Ratios are to ``papers``. The Sink numbers
are compared across methods (Sink_1 and the whole per-position map, and max |Δalpha|); the run fails
if they disagree by more than two threshold flips.

Usage::

    python benchmarks/sinks.py --model smollm2-135m --device cpu
    python benchmarks/sinks.py --model gemma3-270m --device cuda --inputs random
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

METHODS = ("ours_eager", "ours_recompute", "papers")
ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rows(tokenizer: Any, args: argparse.Namespace) -> tuple[list[list[int]], bool, int | None]:
    from analyses.sinks import input_rows
    from probe.loading import bos_policy

    bos = bos_policy(tokenizer, "default")
    prepend = bos.prepend and bos.token_id is not None
    rows = input_rows(tokenizer, args.inputs, args.n, args.T - int(prepend), args.seed)
    return rows, prepend, bos.token_id


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import probe  # first: it sets the offline defaults before transformers is imported
    from probe import zoo

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    result: dict[str, Any] = {}

    if args.method.startswith("ours"):
        from analyses.sinks import measure_sinks

        model = probe.load_model(args.model, device=args.device, dtype=args.dtype)
        rows, _, _ = _rows(model.tokenizer, args)
        mode = args.method.removeprefix("ours_")

        def once(subset: list[list[int]]) -> torch.Tensor:
            sink, _ = measure_sinks(
                model,
                subset,
                eps=args.eps,
                mode=mode,
                batch_size=args.batch_size,
                query_block=args.query_block,
                norms=False,
            )
            return sink.alpha()

    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # after probe: offline defaults

        path = Path(args.model) if Path(args.model).is_dir() else zoo.converted_dir(zoo.get_spec(args.model))
        if path is None:
            sys.exit(f"{args.model} is not converted yet; run: headlab fetch {args.model}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        plain: Any = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=dtype)
        plain = plain.to(device).eval()
        rows, prepend, bos_id = _rows(tokenizer, args)
        prefix = [bos_id] if prepend else []

        def once(subset: list[list[int]]) -> torch.Tensor:
            kept = []
            with torch.no_grad():
                for row in subset:  # batch 1, as the official script
                    ids = torch.tensor([prefix + row], device=device)
                    out = plain(input_ids=ids, output_attentions=True, use_cache=False)
                    kept.append(torch.cat(out.attentions, dim=0).unsqueeze(0))  # [1, L, H, T, T]
            scores = torch.cat(kept, dim=0).float()  # [N, L, H, T, T]: every attention kept
            T = scores.shape[-1]
            # the official formula: divide column k (the key) by T - k, sum over the queries
            ratios = torch.arange(T, 0, -1, device=scores.device, dtype=scores.dtype)  # broadcast on keys
            return (scores / ratios).sum(dim=-2).cpu()  # [N, L, H, T]: alpha

    once(rows[: min(2, len(rows))])  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_kib = _rss_kib("VmRSS")
    can_reset = _reset_peak()
    times = []
    alpha = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        alpha = once(rows)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert alpha is not None
    sink = (alpha > args.eps).double().mean(dim=(0, 1, 2)) * 100  # per position, thresholded per sample
    result["seconds"] = statistics.median(times)
    result["sink"] = sink.tolist()
    result["alpha_mean"] = alpha.mean(dim=0).flatten().tolist()  # [L*H*T], for agreement
    result["alpha0"] = alpha[..., 0].flatten().tolist()  # per sample, layer, head
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        hwm = _rss_kib("VmHWM")
        if can_reset and hwm is not None and base_kib is not None:
            result["work_bytes"] = max(0, hwm - base_kib) * 1024
    print("RESULT " + json.dumps(result))


def run_one(args: argparse.Namespace, method: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--model",
        args.model,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
        "--n",
        str(args.n),
        "--T",
        str(args.T),
        "--eps",
        str(args.eps),
        "--inputs",
        args.inputs,
        "--seed",
        str(args.seed),
        "--batch-size",
        str(args.batch_size),
        "--query-block",
        str(args.query_block),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = any("out of memory" in t.lower() for t in tail) or proc.returncode == -9
    return {"error": "out of memory" if oom else " | ".join(tail)}


def agreement(results: dict[str, dict[str, Any]], reference: str = "papers") -> dict[str, dict[str, float]]:
    """Per method vs ``reference``: |ΔSink_1|, max |ΔSink_k| over positions, max |Δalpha|."""
    ref = results.get(reference, {})
    out: dict[str, dict[str, float]] = {}
    if "sink" not in ref:
        return out
    for method, res in results.items():
        if "sink" not in res or method == reference:
            continue
        out[method] = {
            "sink_1": abs(res["sink"][0] - ref["sink"][0]),
            "sink_map": max(abs(a - b) for a, b in zip(res["sink"], ref["sink"], strict=True)),
            "alpha0": max(abs(a - b) for a, b in zip(res["alpha0"], ref["alpha0"], strict=True)),
            "alpha_mean": max(abs(a - b) for a, b in zip(res["alpha_mean"], ref["alpha_mean"], strict=True)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n", type=int, default=100, help="sequences (the paper: 100)")
    parser.add_argument("--T", type=int, default=64, help="tokens per sequence, BOS included (the paper: 64)")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--inputs", default="natural", choices=["natural", "random", "repeated"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="our capture's batch size")
    parser.add_argument("--query-block", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (0: torch's default); "
        "use 1 on a machine whose cores are shared with other jobs: spinning threads thrash there",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import probe

    model = probe.load_model(args.model, device="cpu")  # fetch/convert once, before the workers
    bos = model.bos.describe()
    del model
    methods = [m for m in args.methods.split(",") if m]
    print(
        f"model {args.model} on {args.device} ({args.dtype}); {args.n} x {args.T} tokens of {args.inputs} "
        f"(BOS {'prepended: ' + str(bos['token']) if bos['prepend'] else 'not prepended'}); eps {args.eps}; "
        f"ours: batch {args.batch_size}; papers: batch 1, all attentions kept; median of {args.repeats}; "
        f"torch threads {args.threads or 'default'}"
    )
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        res = run_one(args, method)
        results[method] = res
        shown = "error: " + res["error"] if "error" in res else f"{res['seconds']:.2f} s"
        print(f"  {method:<15} {shown}", flush=True)
    ref = results.get("papers", {})
    cpu = args.device == "cpu"
    mem_name = "peak RSS GiB" if cpu else "peak GPU GiB"
    header = (
        f"{'method':<15} {'time s':>8} {'x papers':>9} {mem_name:>13} {'x papers':>9}"
        + (f" {'work GiB':>9} {'x papers':>9}" if cpu else "")
        + f" {'Sink_1 %':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for method, res in results.items():
        if "error" in res:
            print(f"{method:<15} {res['error']}")
            continue
        tr = res["seconds"] / ref["seconds"] if "seconds" in ref else float("nan")
        mr = res["peak_bytes"] / ref["peak_bytes"] if "peak_bytes" in ref else float("nan")
        line = f"{method:<15} {res['seconds']:>8.2f} {tr:>9.2f} {res['peak_bytes'] / 2**30:>13.2f} {mr:>9.2f}"
        if cpu:
            work = res.get("work_bytes")
            wr = work / ref["work_bytes"] if work is not None and ref.get("work_bytes") else float("nan")
            line += f" {work / 2**30:>9.3f} {wr:>9.3f}" if work is not None else f" {'-':>9} {'-':>9}"
        line += f" {res['sink'][0]:>9.2f}"
        print(line)
    agree = agreement(results)
    if agree:
        print()
        for method, diffs in agree.items():
            print(
                f"{method} vs papers: |ΔSink_1| {diffs['sink_1']:.3f} pp, max |ΔSink_k| over positions "
                f"{diffs['sink_map']:.3f} pp, max |Δalpha_0| {diffs['alpha0']:.1e}, "
                f"max |Δ mean alpha_k| {diffs['alpha_mean']:.1e}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    errors = [m for m, r in results.items() if "error" in r]
    if errors:
        sys.exit(f"methods failed: {', '.join(errors)}")
    if agree:
        sample = next(r for r in results.values() if "alpha0" in r)
        n_heads_total = len(sample["alpha0"]) // args.n  # L * H
        flip = 100.0 / (args.n * n_heads_total)  # one (sample, head) crossing eps moves Sink by this
        bad = {m: d for m, d in agree.items() if d["sink_map"] > 2 * flip + 1e-9 or d["alpha0"] > 1e-3}
        if bad:
            sys.exit(f"Sink numbers disagree with the papers' method: {bad}")
        print(f"Sink numbers agree (within {2 * flip:.4f} pp = two threshold flips; alpha within 1e-3).")


if __name__ == "__main__":
    main()
