"""DuoAttention decoding with a cut KV cache: decode time and memory against the full model.

For one model and each context length L, one prompt of ``L - new_tokens`` tokens (BOS included;
haystack prose from ``analyses.tasks.needles``, so the context at the end holds ``N = L - 1``
positions) is prefilled in chunks of ``--prefill-chunk`` tokens and decoded greedily for
``--new-tokens`` steps (no early stop, so every case does the same work). The cases:

* ``native``   the model's own path: SDPA and transformers' KV cache (the same chunked prefill);
* ``full``     :func:`probe.duo_cache.duo_generate` with every KV head a retrieval head: the full
               cache kept by the same code as the cut ones (the tests show it decodes as ``native``);
* ``duo r=…``  :func:`probe.duo_cache.duo_generate` with a share ``r`` of the KV heads retrieval
               heads (the top ``r·n`` by gate with ``--gates``, else the first ``r·n`` of a
               permutation drawn with ``--seed``; printed), the others streaming heads that keep
               ``--sink`` + ``--recent`` keys.

Printed per case: prefill seconds, decode milliseconds per token and ``full / case``; the KV
cache's exact bytes; on CUDA the rise of ``torch.cuda.max_memory_allocated`` over the case (reset
per case, weights excluded), for the whole call and for the decode steps alone; the memory ratio
``full / case`` (CUDA: decode peaks; CPU: cache bytes), the formula's ratio (full / kept key
positions, layer by layer: on a model without sliding-window layers ``1 / (r + (1 - r)(S + R)/N)``)
and whether the measured saving is within 10 % of the formula's.

Usage::

    python benchmarks/duo.py --device cuda                       # gemma3-270m at 8K, 16K and 32K
    python benchmarks/duo.py --model /path/to/gemma-3-270m.gguf --device cuda
    python benchmarks/duo.py --model smollm2-135m --lengths 1024,2048 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import probe  # noqa: E402
from probe.duo_cache import duo_generate, kv_tokens  # noqa: E402
from probe.kernels import native_attention  # noqa: E402

MIB = 2**20


@dataclass
class Case:
    name: str
    share: float
    prefill_s: float
    decode_s: float  # per token
    cache_bytes: int
    peak: int | None  # CUDA: rise of the allocated high-water mark over the whole call
    decode_peak: int | None  # CUDA: the same over the decode steps
    tokens: list[int]
    formula: float = 1.0  # full / kept key positions


# ------------------------------------------------------------------------------------ inputs


def prompt_ids(model: Any, n_tokens: int) -> list[int]:
    """``n_tokens`` ids: BOS if the model prepends one, then haystack prose cut to length."""
    from analyses.tasks.needles.haystack import build_haystack

    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    text = build_haystack(model.tokenizer, n_tokens - len(prefix))
    ids = prefix + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != n_tokens:
        raise SystemExit(f"the haystack gave {len(ids)} tokens, {n_tokens} were asked for")
    return ids


def load_gates(path: str, model: Any) -> torch.Tensor:
    """Gates ``[n_layers, n_kv_heads]`` from JSON (a ``gates`` entry, or the bare nested list), .pt or .npy."""
    src = Path(path)
    if src.suffix == ".pt":
        gates = torch.as_tensor(torch.load(src, map_location="cpu"))
    elif src.suffix == ".npy":
        import numpy as np

        gates = torch.as_tensor(np.load(src))
    else:
        payload = json.loads(src.read_text())
        gates = torch.tensor(payload["gates"] if isinstance(payload, dict) else payload)
    want = (model.n_layers, model.n_kv_heads)
    if tuple(gates.shape) != want:
        raise SystemExit(f"{src} holds gates of shape {tuple(gates.shape)}; {model.name} needs {want}")
    return gates.double()


def retrieval_mask(model: Any, share: float, gates: torch.Tensor | None, seed: int) -> torch.Tensor:
    """The top ``round(share · n)`` KV heads by gate (ties: earlier layer, lower head first), or the
    first of a seeded permutation; ``share`` 1 is every head."""
    n = model.n_layers * model.n_kv_heads
    k = n if share >= 1 else min(n, max(1, math.floor(share * n + 0.5)))
    if gates is not None:
        order = torch.sort(-gates.flatten(), stable=True).indices
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(model.n_layers, model.n_kv_heads)


# ------------------------------------------------------------------------------------ the cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(device: torch.device) -> int:
    """Free what the last case left; reset CUDA's high-water mark; the bytes allocated now."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _high(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


@torch.inference_mode()
def run_native(model: Any, ids: list[int], new: int, chunk: int) -> Case:
    """Greedy decoding by the native model with transformers' own cache, prefilled in chunks."""
    device = model.device
    base = _fresh(device)
    tokens: list[int] = []
    with native_attention(model, "sdpa") as native:
        arg = "cache" if "cache" in inspect.signature(native.forward).parameters else "past_key_values"
        cache: Any = None

        def step(part: list[int], start: int) -> None:
            nonlocal cache
            out = native(
                input_ids=torch.tensor([part], device=device),
                position_ids=torch.arange(start, start + len(part), device=device)[None],
                use_cache=True,
                logits_to_keep=1,
                **({arg: cache} if cache is not None else {}),
            )
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))

        t0 = time.perf_counter()
        for start in range(0, len(ids), chunk):
            step(ids[start : start + chunk], start)
        del tokens[:-1]
        _sync(device)
        t1 = time.perf_counter()
        prefill_peak = _high(device, base)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        while len(tokens) < new:
            step([tokens[-1]], len(ids) + len(tokens) - 1)
        _sync(device)
        t2 = time.perf_counter()
        decode_peak = _high(device, base)
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    peak = None if prefill_peak is None else max(prefill_peak, decode_peak or 0)
    return Case("native", 1.0, t1 - t0, (t2 - t1) / (new - 1), held, peak, decode_peak, tokens)


def run_duo(
    model: Any, ids: list[int], new: int, chunk: int, name: str, share: float, mask: torch.Tensor, args: Any
) -> Case:
    _fresh(model.device)
    out = duo_generate(
        model,
        ids,
        mask,
        sink=args.sink,
        recent=args.recent,
        max_new_tokens=new,
        prefill_chunk=chunk,
        stop_ids=(),
    )
    duo, full = kv_tokens(model, mask, args.sink, args.recent, out.context_tokens)
    return Case(
        name,
        share,
        out.prefill_seconds,
        out.decode_seconds_per_token,
        out.cache_bytes,
        out.peak_bytes,
        out.decode_peak_bytes,
        out.tokens,
        formula=full / duo,
    )


# ------------------------------------------------------------------------------------ report


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / MIB:.1f}"


def table(cases: list[Case], length: int, n: int, cuda: bool) -> list[str]:
    full = next(c for c in cases if c.name == "full")
    native = next(c for c in cases if c.name == "native")
    rows = [
        f"L={length} (N={n} positions in the cache at the end)",
        f"  {'case':<11}{'prefill s':>10}{'decode ms/tok':>15}{'x full':>8}{'cache MiB':>11}{'peak MiB':>10}"
        f"{'decode peak':>13}{'mem x full':>12}{'formula':>9}  {'within 10%':<11}{'tokens':<8}",
    ]
    for c in cases:
        mine = c.decode_peak if cuda else c.cache_bytes
        ref = full.decode_peak if cuda else full.cache_bytes
        ratio = ref / mine if mine and ref else math.nan
        within = abs(ratio / c.formula - 1) <= 0.10 if c.name != "native" else None
        same = sum(a == b for a, b in zip(c.tokens, native.tokens, strict=True))
        rows.append(
            f"  {c.name:<11}{c.prefill_s:>10.2f}{1e3 * c.decode_s:>15.2f}{full.decode_s / c.decode_s:>8.2f}"
            f"{_mib(c.cache_bytes):>11}{_mib(c.peak):>10}{_mib(c.decode_peak):>13}{ratio:>12.2f}"
            f"{'-' if c.name == 'native' else f'{c.formula:.2f}':>9}  {'-' if within is None else ('yes' if within else 'NO'):<11}"
            f"{same}/{len(c.tokens)}"
        )
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="gemma3-270m", help="catalogue name, checkpoint directory or .gguf file"
    )
    p.add_argument("--lengths", default="8192,16384,32768", help="context lengths L: prompt + new tokens")
    p.add_argument("--shares", default="0.25,0.5", help="retrieval shares r of the KV heads")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--gates", default=None, help="gates file [n_layers, n_kv_heads] (JSON, .pt or .npy)")
    p.add_argument("--seed", type=int, default=0, help="permutation of the KV heads without --gates")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    model = probe.load_model(args.model, device=args.device, dtype=dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    shares = [float(x) for x in args.shares.split(",")]
    gates = load_gates(args.gates, model) if args.gates else None
    cuda = model.device.type == "cuda"
    print(
        f"model {model.name}: {model.n_layers} layers, {model.n_heads} query / {model.n_kv_heads} KV heads, "
        f"sliding window {model.sliding_window}; {model.device} {str(model.dtype).removeprefix('torch.')}; "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(model.device)}" if cuda else "")
    )
    print(
        f"sink {args.sink}, recent {args.recent}, {args.new_tokens} new tokens, prefill chunks of "
        f"{args.prefill_chunk}; prompts: haystack prose (analyses.tasks.needles), BOS included"
    )
    masks = {share: retrieval_mask(model, share, gates, args.seed) for share in shares}
    for share, mask in masks.items():
        heads = [tuple(x) for x in mask.nonzero().tolist()]
        how = f"top by gate in {args.gates}" if gates is not None else f"seeded permutation, seed {args.seed}"
        print(f"retrieval heads at r={share} ({len(heads)} of {mask.numel()}, {how}): {heads}")
    warm = prompt_ids(model, 64)  # kernels and allocator warmed before anything is timed
    run_native(model, warm, 4, args.prefill_chunk)
    run_duo(model, warm, 4, 16, "warm", 1.0, masks[shares[0]], args)
    print(
        "memory x full: "
        + ("decode peaks (CUDA max_memory_allocated)" if cuda else "exact KV-cache bytes (CPU)")
        + "; formula: full / kept key positions; tokens: equal to native's, of all"
    )
    for length in lengths:
        ids = prompt_ids(model, length - args.new_tokens)
        cases = [
            run_native(model, ids, args.new_tokens, args.prefill_chunk),
            run_duo(
                model,
                ids,
                args.new_tokens,
                args.prefill_chunk,
                "full",
                1.0,
                torch.ones(model.n_layers, model.n_kv_heads, dtype=torch.bool),
                args,
            ),
        ]
        for share, mask in masks.items():
            cases.append(
                run_duo(
                    model, ids, args.new_tokens, args.prefill_chunk, f"duo r={share:g}", share, mask, args
                )
            )
        print("\n".join(table(cases, length, length - 1, cuda)), flush=True)


if __name__ == "__main__":
    main()
