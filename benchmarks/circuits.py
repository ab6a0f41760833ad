"""Path patching: batched senders against one two-step pass per sender, side by side.

For one model, ``--n-items`` IOI prompts (clean and ABC-corrupted, grouped by template) and
``--senders`` sender heads, each receiver kind is path-patched three ways on the same cached clean
and corrupted ``z``:

* ``naive``    the definition, one sender at a time: :func:`analyses.circuits.path_patching_reference`,
               written with :mod:`probe.interventions` (what the tests compare against): (A) a bridge forward on the clean prompts with every head
               frozen to its clean ``z`` and the sender's ``z`` from the corrupted run, caching the
               receivers' inputs; (B) a bridge forward with only those inputs patched in (queries at
               END; keys/values at every position, with GQA the receiver's KV-group siblings pinned
               to clean). Two full forwards (all positions unembedded) per sender and prompt group.
* ``single``   :func:`analyses.circuits.path_patching` with one sender per forward pass
               (``batch_size=1``): forwards that stop after the last receiver in (A) and unembed END
               only, but no sender batching.
* ``batched``  :func:`analyses.circuits.path_patching` as the analyses run it: the clean batch
               repeated, copy g swapping in sender g, ``--batch-size`` sequences per forward.

Printed per receiver kind: wall time of each way (after one warm-up forward), time per sender, the
speed-up of ``single`` and ``batched`` over ``naive``, and the largest difference of their per-sender
scores (shares of the clean-corrupt gap) from ``naive``: the run fails if it exceeds ``--tol``, so a
fast wrong answer cannot pass. Receivers: query heads 0 and the last of the layer at two thirds of
the depth (on a GQA model each has KV-group siblings to pin); senders: a seeded sample of the heads
below that layer (at most all of them).

Usage::

    python benchmarks/circuits.py                          # smollm2-135m on CPU: 4 prompts, 4 senders
    python benchmarks/circuits.py --model tiny-llama --n-items 8 --receivers logits,q,kv,k
    python benchmarks/circuits.py --model gemma3-270m --device cuda --n-items 64 --senders 48 \\
        --batch-size 512
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_shares(model: Any, caches: list[Any], senders: list[tuple[int, int]], receivers: Any) -> Any:
    """Per sender, the share of the gap, from one two-step pass per sender and prompt group."""
    import numpy as np
    import torch

    from analyses import circuits

    clean = torch.cat([c.clean.logit_diff for c in caches]).double()
    corrupt = torch.cat([c.corrupt.logit_diff for c in caches]).double()
    gap = float(clean.mean() - corrupt.mean())
    out = np.zeros(len(senders))
    for i, sender in enumerate(senders):
        if receivers.input != "logits" and sender[0] >= receivers.last_layer:
            continue  # cannot reach a receiver: the batched way skips it too
        deltas = [
            circuits.path_patching_reference(model, c.group, c.clean_z, c.corrupt_z, sender, receivers)
            - c.clean.logit_diff
            for c in caches
        ]
        out[i] = float(torch.cat(deltas).double().mean()) / gap
    return out


def _timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - t0, value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="catalogue name or tiny-gpt2 / tiny-llama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--n-items", type=int, default=4, help="IOI prompts (grouped by template)")
    parser.add_argument("--senders", type=int, default=4, help="sender heads, sampled below the receivers")
    parser.add_argument("--receivers", default="logits,kv", help="receiver kinds: logits, q, kv, k")
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per batched forward")
    parser.add_argument("--methods", default="naive,single,batched")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest allowed |score - naive score|")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    import probe
    from analyses import circuits
    from analyses.tasks import colored_objects as co
    from analyses.tasks import ioi

    words = [*ioi.NAMES, *ioi.PLACES, *ioi.OBJECTS, *co.OBJECTS, *co.COLOURS, *co.SURFACES]
    extra = {"tiny_words": words} if args.model.startswith("tiny-") else {}
    model = probe.load_model(args.model, device=args.device, dtype=args.dtype, **extra)
    device = model.device
    runner = circuits.Runner(model)
    cfg = circuits.CircuitConfig(
        n_items=args.n_items, seed=args.seed, batch_size=4 * args.n_items, progress=False
    )
    data, caches, _ = circuits.prepare(runner, "ioi", cfg)  # one cache per template group

    target = max(1, (2 * model.n_layers) // 3)
    receiver_heads = tuple(sorted({(target, 0), (target, model.n_heads - 1)}))
    below = [(layer, h) for layer in range(target) for h in range(model.n_heads)]
    senders = sorted(random.Random(f"bench:{args.seed}").sample(below, min(args.senders, len(below))))
    methods = args.methods.split(",")
    sizes = [len(c.group) for c in caches]
    print(
        f"model {model.name} on {device} ({model.dtype}); {data.n_items} IOI prompts in {len(caches)} template "
        f"groups {sizes}; {len(senders)} senders below layer {target}; receivers "
        f"{' '.join(f'L{a}H{b}' for a, b in receiver_heads)}; batch size {args.batch_size}"
    )
    print(
        f"{'receivers':<9} {'method':<8} {'time s':>9} {'ms/sender':>10} {'speed-up':>9} {'max |diff|':>11}"
    )
    with torch.no_grad():
        model.bridge(caches[0].group.clean.to(model.device))  # warm-up
    failed = []
    for kind in args.receivers.split(","):
        receivers = circuits.Receivers(kind, () if kind == "logits" else receiver_heads)  # type: ignore[arg-type]
        runs: dict[str, Callable[[], Any]] = {
            "naive": lambda r=receivers: naive_shares(model, caches, senders, r),
            "single": lambda r=receivers: circuits.path_patching(runner, caches, senders, r, batch_size=1),
            "batched": lambda r=receivers: circuits.path_patching(
                runner, caches, senders, r, batch_size=args.batch_size
            ),
        }
        results: dict[str, tuple[float, Any]] = {}
        for name in methods:
            results[name] = _timed(runs[name], device)
        base = results.get("naive")
        for name, (sec, shares) in results.items():
            speed = base[0] / sec if base else float("nan")
            diff = float(np.abs(shares - base[1]).max()) if base else float("nan")
            print(
                f"{kind:<9} {name:<8} {sec:>9.3f} {1000 * sec / len(senders):>10.1f} {speed:>8.2f}x {diff:>11.2e}",
                flush=True,
            )
            if diff > args.tol:
                failed.append(f"{kind}/{name}: max |diff| {diff:.2e} > {args.tol:g}")
        if torch.cuda.is_available() and device.type == "cuda":
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit("scores disagree with the two-step definition: " + "; ".join(failed))
    print("all ways agree with the two-step definition")


if __name__ == "__main__":
    main()
