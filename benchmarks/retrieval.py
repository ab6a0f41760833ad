"""Retrieval-head scoring at long context: what one needle test costs three ways, side by side.

For one model and each context length T, the same prompt (haystack prose cut to T tokens) is
decoded for ``--new-tokens`` greedy steps (no early stop, so every method does the same work):

* ``ours``     :func:`probe.decode.greedy_decode`: prefill with the model's SDPA kernel, then each
               decode step through the registered decode function, which runs SDPA for the output
               and forms one ``[heads, T]`` score row per layer for the argmax (what the retrieval
               score needs).
* ``floor``    plain transformers ``generate`` (SDPA, greedy, the same number of new tokens):
               decoding with no scoring at all.
* ``eager``    the all-rows way: eager attention with ``output_attentions=True`` for the prefill
               and every decode step, every layer's weights returned (what the paper's code with
               eager attention, or TransformerLens full patterns, hold); where it runs out of
               memory the row says so.

Printed per (T, method): median wall time of ``--repeats`` runs after one warm-up, peak memory
(GPU: ``torch.cuda.max_memory_allocated`` with the weights; CPU: the growth of the resident-set
high-water mark during the runs), and ratios to ``floor``. Ours must agree with ``floor`` on the
generated tokens (it checks).

Usage::

    python benchmarks/retrieval.py --model gemma3-270m --device cuda --dtype bfloat16 \\
        --lengths 2048,8192,16384,32768
    python benchmarks/retrieval.py --model smollm2-135m --device cpu --lengths 512,1024,2048
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak(device: Any) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS")


def _peak_gib(device: Any, base_kib: int) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    return max(0, _rss_kib("VmHWM") - base_kib) / 2**20


def _prompt(model: Any, T: int, seed: int) -> list[int]:
    from analyses.tasks.needles import build_haystack

    text = build_haystack(model.tokenizer, T, seed)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    out = (prefix + ids)[:T]
    if len(out) < T:
        raise SystemExit(f"the haystack source gave only {len(out)} tokens for T={T}")
    return out


def _ours(model: Any, ids: list[int], n: int) -> list[int]:
    from probe.decode import greedy_decode

    return greedy_decode(model, ids, n, stop_ids=()).tokens


def _floor(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    from probe.kernels import native_attention

    with native_attention(model, "sdpa") as native, torch.inference_mode():
        out = native.generate(
            torch.tensor([ids], device=model.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


def _eager(model: Any, ids: list[int], n: int) -> list[int]:
    """Eager attention, every layer's weights returned for the prefill and each step (kept, as the
    all-rows method keeps them until it has read them)."""
    import torch

    from probe.decode import _cache_arg, _cache_of
    from probe.kernels import native_attention

    kept: list[Any] = []
    tokens: list[int] = []
    with native_attention(model, "eager") as native, torch.inference_mode():
        out = native(
            input_ids=torch.tensor([ids[:-1]], device=model.device), use_cache=True, output_attentions=True
        )
        kept.append(out.attentions)
        cache, cache_arg = _cache_of(out), _cache_arg(native)
        current = ids[-1]
        for _ in range(n):
            out = native(
                input_ids=torch.tensor([[current]], device=model.device),
                use_cache=True,
                output_attentions=True,
                **{cache_arg: cache},
            )
            cache = _cache_of(out)
            kept.append([a.argmax(-1) for a in out.attentions])
            current = int(out.logits[0, -1].argmax())
            tokens.append(current)
    return tokens


METHODS = {"ours": _ours, "floor": _floor, "eager": _eager}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="ours,floor,eager")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    import probe

    model = probe.load_model(args.model, device=args.device, dtype=args.dtype)
    device = model.device
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    print(
        f"model {model.name} on {device} ({model.dtype}); {args.new_tokens} new tokens; median of {args.repeats}"
    )
    print(f"{'T':>6} {'method':<6} {'time s':>9} {'peak GiB':>9} {'time/floor':>10} {'mem/floor':>9}  note")
    for T in lengths:
        # The prompt and the new tokens must fit the context: at T = n_ctx the prompt is shorter.
        ids = _prompt(model, min(T, model.n_ctx - args.new_tokens), args.seed)
        results: dict[str, tuple[float, float, str]] = {}
        tokens: dict[str, list[int]] = {}
        for name in methods:
            fn = METHODS[name]
            try:
                tokens[name] = fn(model, ids, 2)  # warm-up
                times = []
                base = _reset_peak(device)
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    tokens[name] = fn(model, ids, args.new_tokens)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                results[name] = (statistics.median(times), _peak_gib(device, base), "")
            except torch.OutOfMemoryError:
                results[name] = (float("nan"), float("nan"), "out of memory")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        floor = results.get("floor")
        for name, (sec, mem, note) in results.items():
            rt = sec / floor[0] if floor and floor[0] == floor[0] else float("nan")
            rm = mem / floor[1] if floor and floor[1] > 0.01 else float("nan")
            print(f"{T:>6} {name:<6} {sec:>9.3f} {mem:>9.3f} {rt:>10.2f} {rm:>9.2f}  {note}", flush=True)
        if "ours" in tokens and "floor" in tokens and tokens["ours"] != tokens["floor"]:
            print(
                f"  note: T={T}: ours and floor generated different tokens: {tokens['ours']} vs {tokens['floor']}"
            )


if __name__ == "__main__":
    main()
