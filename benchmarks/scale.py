"""Scale: headlab's reading analyses on random-weight copies of public model shapes, 8K-128K tokens.

Each shape is built on the device from its transformers config (random weights, bfloat16: time and
memory do not depend on the weights' values; nothing is downloaded) and wrapped with
``probe.wrap``. For each length T, on one random-token sequence, side by side in one process:

* ``sdpa``       the plain forward with SDPA, last position's logits only (the floor every ratio
                 divides by; for Gemma 2 SDPA drops the soft cap: a speed reference, not the model)
* ``census``     a recompute capture with the census's reducers (entropy, mean distance,
                 previous-token score, column importance): one forward's worth of the census
* ``sinks``      ``analyses.sinks.measure_sinks`` in recompute mode (alpha and the token norms)
* ``generate``   ``model.generate`` of ``--new-tokens`` greedy tokens (the decode floor)
* ``retrieval``  ``probe.decode.greedy_decode`` recording every head's argmax at every step, then
                 the copy-paste scoring of ``analyses.retrieval`` (ratios to ``generate``)
* ``vhd``        (LLaVA shape) ``analyses.vhd.step_vhd``: an image row and its text-only twin, the
                 heads' output divergence read at every answer step (ratio to an SDPA forward of
                 the same two rows)

Each row prints time (median of ``--repeats`` after one warm-up at a short length), the peak
``torch.cuda.max_memory_allocated`` (weights included) and both as ratios to the floor, and the
memory plan's prediction for the row (``probe.memory.estimate_capture`` / ``estimate_decode``)
as a ratio to the measured peak. Then, with ``--reach``, the largest context (doubling from 1K)
each way of reading every pattern reaches on this device: headlab's recompute census,
TransformerLens ``run_with_cache`` (the bridge's, which is TransformerLens's TransformerBridge) and
transformers' eager ``output_attentions=True``; and one run that would not fit (an eager census at
the longest length) to show that the plan refuses it before it starts, naming the longest length
that fits.

Lengths beyond a shape's ``max_position_embeddings`` (Gemma-2-9B's 8K, LLaVA-1.5's 4K) are run with
it raised (marked ``ctx raised``): RoPE is defined at any position and the weights are random.

Usage::

    python benchmarks/scale.py --device cuda                         # every shape at its lengths
    python benchmarks/scale.py --device cuda --shapes llama-3.2-1b --lengths 8192,32768,131072 --reach
    python benchmarks/scale.py --tiny                                # the same code on tiny shapes (CPU)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass(frozen=True)
class Shape:
    """A public model's shape: its transformers config class and arguments, and its lengths."""

    config_class: str
    kwargs: dict[str, Any]
    lengths: tuple[int, ...]
    vision: dict[str, Any] = field(default_factory=dict)  # LLaVA: the CLIP vision tower's config


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape(
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_parameters={
                **LLAMA3_ROPE,
                "rope_theta": 500000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        (8192, 32768, 131072),
    ),
    "llama-3.1-8b": Shape(
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
            rope_parameters={
                **LLAMA3_ROPE,
                "rope_theta": 500000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        (8192, 32768),
    ),
    "qwen2.5-7b": Shape(
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        (8192, 32768),
    ),
    "gemma-2-9b": Shape(
        "Gemma2Config",
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            vocab_size=256000,
            max_position_embeddings=8192,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        (8192, 32768),
    ),
    "llava-1.5-7b": Shape(
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        (4096, 8192, 32768),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
    ),
}

TINY_LENGTHS = (64, 128)


def tiny(shape: Shape) -> Shape:
    """The same family at a width a CPU runs in seconds (the smoke run of ``--tiny``)."""
    keep = {k: v for k, v in shape.kwargs.items() if k not in ("rope_parameters",)}
    small = dict(
        keep,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2
        if shape.kwargs["num_key_value_heads"] < shape.kwargs["num_attention_heads"]
        else 4,
        vocab_size=512,
        max_position_embeddings=256,
    )
    if "head_dim" in small:
        small["head_dim"] = 16
    if "query_pre_attn_scalar" in small:
        small["query_pre_attn_scalar"] = 16
    if "sliding_window" in small:
        small["sliding_window"] = 32
    vision = dict(shape.vision)
    if vision:
        vision.update(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28
        )
    return Shape(shape.config_class, small, TINY_LENGTHS, vision)


# ------------------------------------------------------------------------------------------ device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _allocated(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


@dataclass
class Measured:
    seconds: float | None = None
    peak: int | None = None
    plan: int | None = None
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


WARM = {"each": False}
"""``--warm``: one untimed call of every row at its own length first. The Triton kernels autotune
once per length (their key), which the first call at a new length pays; ``--warm`` leaves it out."""


ROWS: dict[str, set[str]] = {"only": set()}
"""``--rows``: the language-model rows to measure (empty: all)."""


def measure_row(
    row: str, fn: Callable[[], Any], device: torch.device, repeats: int, plan: int | None = None
) -> Measured:
    """:func:`measure`, or a row marked skipped when ``--rows`` leaves it out."""
    if ROWS["only"] and row not in ROWS["only"]:
        return Measured(error="skipped (--rows)", plan=plan)
    return measure(fn, device, repeats, plan)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, plan: int | None = None) -> Measured:
    """Median time of ``repeats`` calls and the peak memory of the first; an OOM is recorded."""
    times, peak = [], None
    try:
        if WARM["each"]:
            fn()
        for i in range(repeats):
            _reset(device)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if i == 0:
                peak = _peak(device)
    except torch.OutOfMemoryError as err:
        del err
        _reset(device)
        return Measured(error="out of memory", plan=plan)
    return Measured(statistics.median(times), peak, plan)


# ------------------------------------------------------------------------------------------- build


def build(name: str, shape: Shape, device: torch.device, dtype: torch.dtype, longest: int) -> Any:
    """The shape's random-weight model on ``device``, wrapped by headlab (its context raised to
    ``longest`` where the shape's is shorter)."""
    import transformers

    import probe
    from probe.tiny import byte_tokenizer

    kwargs = dict(shape.kwargs)
    kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], longest + 64)
    text_config = getattr(transformers, shape.config_class)(
        **kwargs, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )
    torch.manual_seed(0)
    if shape.vision:
        return build_llava(name, shape, text_config, device, dtype)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(text_config, dtype=dtype).eval()
    tokenizer = byte_tokenizer(prepend_bos=True)
    return probe.wrap(hf, tokenizer, name=name, weight_sha256=_digest(name))


def _digest(name: str) -> str:
    """The weights' identity without hashing 16 GB: the shape and the seed (0) they were drawn from."""
    return hashlib.sha256(f"random weights of {name}, seed 0".encode()).hexdigest()


def build_llava(name: str, shape: Shape, text_config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """LLaVA-1.5's assembly: a CLIP ViT-L/14-336 tower, the two-layer projector and a Llama LM."""
    import transformers

    from probe.assemblies import IMAGE_TOKEN
    from probe.tiny import byte_tokenizer
    from probe.vlm.assembly import add_image_token, llava_config
    from probe.vlm.wrap import wrap_vlm

    tokenizer = byte_tokenizer(prepend_bos=True)
    image_id = add_image_token(tokenizer, IMAGE_TOKEN)
    vision = transformers.CLIPVisionConfig(**shape.vision)
    config = llava_config(vision, text_config, image_token_id=image_id)
    with torch.device(device):
        hf = transformers.LlavaForConditionalGeneration(config).to(dtype).eval()
    return wrap_vlm(
        name,
        "memory",
        hf,
        tokenizer,
        device=device,
        dtype=dtype,
        weight_sha256=_digest(name),
        path=None,
    )


# ------------------------------------------------------------------------------------------- rows


@contextmanager
def uncapped(model: Any) -> Iterator[None]:
    """Inside the block, the attention modules do not soft-cap (SDPA refuses a cap): Gemma 2's plain
    SDPA forward, a speed and memory reference only."""
    from probe.kernels import attention_modules

    modules = [m for m in attention_modules(model) if getattr(m, "attn_logit_softcapping", None) is not None]
    caps = [m.attn_logit_softcapping for m in modules]
    try:
        for m in modules:
            m.attn_logit_softcapping = None
        yield
    finally:
        for m, cap in zip(modules, caps, strict=True):
            m.attn_logit_softcapping = cap


@contextmanager
def single_passes() -> Iterator[list[int]]:
    """Count, inside the block, the layers whose moments took the single pass (the normaliser from
    SDPA's kernel) out of all Triton moment calls: ``[single, all]``."""
    import probe.moments as moments

    counts = [0, 0]
    one, two = moments.launch_lse_moments, moments.launch_moments

    def counted_one(*args: Any, **kwargs: Any) -> None:
        counts[0] += 1
        counts[1] += 1
        one(*args, **kwargs)

    def counted_two(*args: Any, **kwargs: Any) -> None:
        counts[1] += 1
        two(*args, **kwargs)

    moments.launch_lse_moments, moments.launch_moments = counted_one, counted_two  # type: ignore[assignment]
    try:
        yield counts
    finally:
        moments.launch_lse_moments, moments.launch_moments = one, two  # type: ignore[assignment]


def census_reducers() -> list[Any]:
    from probe.reducers import ColumnImportance, DiagonalScore, MeanDistance, RowEntropy

    return [RowEntropy(), MeanDistance(), DiagonalScore(1, name="prev_token"), ColumnImportance()]


def random_row(model: Any, n: int, seed: int) -> list[int]:
    """``n`` raw token ids (bytes of the byte tokenizer) that with BOS make ``n + 1``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=g).tolist()


def length_rows(model: Any, T: int, args: argparse.Namespace) -> dict[str, Measured]:
    """Every row of one length T (BOS included) for a language-model shape."""
    from analyses.retrieval.scoring import copy_paste_hits
    from analyses.sinks.run import measure_sinks
    from probe.capture import capture
    from probe.decode import greedy_decode
    from probe.kernels import native_attention, soft_caps_logits
    from probe.memory import estimate_capture, estimate_decode

    device, repeats, qb, new = model.device, args.repeats, args.query_block, args.new_tokens
    row = random_row(model, T - 1 - new, seed=T)
    ids = torch.tensor([[0, *row]], device=device)
    out: dict[str, Measured] = {}

    def sdpa() -> None:
        with torch.inference_mode(), uncapped(model), native_attention(model, "sdpa") as native:
            native(input_ids=ids, use_cache=False, logits_to_keep=1)

    out["sdpa"] = measure_row("sdpa", sdpa, device, repeats)
    if soft_caps_logits(model):  # the model's own numbers: the soft cap in blocks of query rows

        def capped() -> None:
            with torch.inference_mode(), native_attention(model) as native:
                native(input_ids=ids, use_cache=False, logits_to_keep=1)

        out["forward"] = measure_row("forward", capped, device, repeats)
    reducers = census_reducers()
    plan = estimate_capture(
        model, batch_size=1, seq_len=T - new, reducers=reducers, mode="recompute", query_block=qb
    )
    with single_passes() as passes:
        out["census"] = measure_row(
            "census",
            lambda: capture(
                model,
                [row],
                census_reducers(),
                mode="recompute",
                batch_size=1,
                query_block=qb,
                progress=False,
            ),
            device,
            repeats,
            plan.total,
        )
    if passes[1]:
        print(f"# census T={T}: {passes[0]} of {passes[1]} layer calls took the single pass", flush=True)
    from analyses.sinks.reducers import SinkReducer, TokenNorms

    plan = estimate_capture(
        model,
        batch_size=1,
        seq_len=T - new,
        reducers=[SinkReducer(0.3), TokenNorms(model.n_layers, model.n_kv_heads)],
        mode="recompute",
        query_block=qb,
    )
    out["sinks"] = measure_row(
        "sinks",
        lambda: measure_sinks(model, [row], mode="recompute", batch_size=1, query_block=qb),
        device,
        repeats,
        plan.total,
    )
    plan = estimate_decode(model, prompt_len=T - new, max_new_tokens=new)
    out["generate"] = measure_row(
        "generate",
        lambda: model.generate(model.batch_from_ids([row]), max_new_tokens=new),
        device,
        repeats,
        plan.total,
    )
    hits: list[int] = []

    def retrieval() -> None:
        prompt = [0, *row]
        result = greedy_decode(model, prompt, new, stop_ids=())
        span = (len(prompt) // 2, len(prompt) // 2 + 16)
        hits.append(int(copy_paste_hits(result.argmax, result.tokens, prompt, span).sum()))

    out["retrieval"] = measure_row("retrieval", retrieval, device, repeats, plan.total)
    out["retrieval"].extra["copy_hits"] = hits[-1] if hits else None  # what the scoring found
    return out


def vhd_rows(model: Any, T: int, args: argparse.Namespace, warmup: bool = False) -> dict[str, Measured]:
    """The LLaVA shape at T tokens: an image row (its image tokens included) and its text-only twin."""
    from analyses.vhd.divergence import step_vhd
    from analyses.vhd.forward import forward_rows, make_rows
    from probe import vlm

    device, new = model.device, args.new_tokens
    size = int(model.hf_model.config.vision_config.image_size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, model.dtype)
    overhead = len(vlm.prompt_ids(model, "", image=True))
    g = torch.Generator().manual_seed(T)
    text = "".join(chr(int(c)) for c in torch.randint(97, 123, (max(1, T - overhead - new),), generator=g))
    answer = [int(c) for c in torch.randint(3, 259, (new,), generator=g)]
    rows = make_rows(model, [text], pixels, answers=[answer], text_twin=True)
    out = {
        "vhd-floor": measure(lambda: forward_rows(model, rows), device, 1 if warmup else args.repeats),
        "vhd": measure(lambda: step_vhd(model, rows, new), device, 1 if warmup else args.repeats),
    }
    out["vhd"].extra["tokens"] = int(rows.ids.shape[1])
    return out


def reach(model: Any, name: str, longest: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The largest context (doubling) that TransformerLens run_with_cache and transformers' eager
    output_attentions reach on this device, and the memory plan's refusal of an eager census at
    the longest length."""
    from probe.capture import capture
    from probe.kernels import native_attention
    from probe.memory import MemoryBudgetError

    device = model.device
    start = 1024 if longest >= 1024 else TINY_LENGTHS[0]
    ladder = [start * 2**i for i in range(20) if start * 2**i <= longest]

    def run_with_cache(ids: torch.Tensor) -> None:
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(ids)
            del cache

    def eager_weights(ids: torch.Tensor) -> None:
        with torch.inference_mode(), native_attention(model, "eager") as native:
            out = native(input_ids=ids, use_cache=False, output_attentions=True, logits_to_keep=1)
            assert out.attentions is not None and len(out.attentions) == model.n_layers
            del out

    records = []
    for method, fn in (("run_with_cache", run_with_cache), ("eager output_attentions", eager_weights)):
        best, seconds = None, None
        for T in ladder:
            ids = torch.tensor([[0, *random_row(model, T - 1, seed=T)]], device=device)
            m = measure(lambda ids=ids, fn=fn: fn(ids), device, 1)  # type: ignore[misc]
            if m.error:
                break
            best, seconds = T, m.seconds
        print(
            f"# reach {name:14s} {method:24s} largest T {best} ({seconds and f'{seconds:.2f} s'})", flush=True
        )
        records.append(dict(shape=name, row=f"reach {method}", largest=best, seconds=seconds, ladder=ladder))
    row = random_row(model, longest - 1, seed=longest)
    t0 = time.perf_counter()
    try:
        capture(model, [row], census_reducers(), mode="eager", batch_size=1, progress=False)
        verdict = "ran (it fitted)"
    except MemoryBudgetError as err:
        verdict = f"refused before it started: {err}"
    except torch.OutOfMemoryError:
        verdict = "OUT OF MEMORY mid-run (the plan let it start)"
    _reset(device)
    print(
        f"# plan {name}: eager census at {longest}: {verdict[:400]} ({time.perf_counter() - t0:.2f} s)",
        flush=True,
    )
    records.append(dict(shape=name, row="plan eager census", T=longest, verdict=verdict))
    return records


# ------------------------------------------------------------------------------------------ report


def fmt_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f} GiB"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or not b else f"{a / b:.2f}x"


def print_rows(
    name: str, T: int, raised: bool, rows: dict[str, Measured], weights: int
) -> list[dict[str, Any]]:
    floor = {
        "forward": "sdpa",
        "census": "sdpa",
        "sinks": "sdpa",
        "retrieval": "generate",
        "vhd": "vhd-floor",
    }
    records = []
    for what, m in rows.items():
        base = rows.get(floor.get(what, ""))
        seconds = "—" if m.seconds is None else f"{m.seconds:.3f} s"
        transient = None if m.peak is None else m.peak - weights
        base_transient = None if base is None or base.peak is None else base.peak - weights
        line = (
            f"{name:14s} {T:>7d}{'*' if raised else ' '} {what:10s} {seconds:>10s} {fmt_bytes(m.peak):>11s}"
            f" {ratio(m.seconds, base.seconds if base else None):>7s} {ratio(m.peak, base.peak if base else None):>7s}"
            f" {ratio(transient, base_transient):>7s} {fmt_bytes(m.plan):>11s} {ratio(m.plan, m.peak):>7s} {m.error}"
        )
        print(line, flush=True)
        records.append(
            dict(
                shape=name,
                T=T,
                ctx_raised=raised,
                row=what,
                seconds=m.seconds,
                peak=m.peak,
                plan=m.plan,
                weights=weights,
                error=m.error,
                floor=floor.get(what),
                **m.extra,
            )
        )
    return records


HEADER = (
    f"{'shape':14s} {'T':>8s} {'row':10s} {'time':>10s} {'peak':>11s} {'t/floor':>7s} {'m/floor':>7s}"
    f" {'tr/floor':>7s} {'plan':>11s} {'plan/m':>7s}"
)


def run_shape(
    name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict[str, Any]]:
    """Build one shape, measure its rows at every length and, with ``--reach``, its reach."""
    from probe.memory import weights_bytes

    records: list[dict[str, Any]] = []
    shape = tiny(SHAPES[name]) if args.tiny else SHAPES[name]
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else shape.lengths
    t0 = time.perf_counter()
    model = build(f"random-{name}", shape, device, dtype, max(lengths))

    weights = weights_bytes(model)
    print(
        f"# {name}: built and wrapped in {time.perf_counter() - t0:.1f} s, weights {fmt_bytes(weights)}",
        flush=True,
    )
    warm = min(lengths[0], 1024)
    if shape.vision:
        vhd_rows(model, warm, args, warmup=True)
    else:
        length_rows(model, warm, argparse.Namespace(**{**vars(args), "repeats": 1}))  # compile, cache
    for T in lengths:
        raised = shape.kwargs["max_position_embeddings"] < T + 64
        rows = vhd_rows(model, T, args) if shape.vision else length_rows(model, T, args)
        records += print_rows(name, T, raised, rows, weights)
    if args.reach:
        ran = [
            r["T"]
            for r in records
            if r["shape"] == name and r.get("row") in ("census", "vhd") and not r["error"]
        ]
        print(
            f"# reach {name:14s} {'headlab (recompute/vhd)':24s} largest T {max(ran, default=None)} (of those run)"
        )
        records += reach(model, name, max(lengths), args)
    return records


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--lengths", default="", help="comma-separated T; default: each shape's own")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warm", action="store_true", help="an untimed call of each row at its length first")
    parser.add_argument(
        "--rows", default="", help="comma-separated language-model rows to measure (default all)"
    )
    parser.add_argument("--query-block", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reach", action="store_true", help="also the largest context of each method")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of this script)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON lines here")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    WARM["each"] = args.warm
    ROWS["only"] = {r for r in args.rows.split(",") if r}
    records: list[dict[str, Any]] = []
    print(HEADER, flush=True)
    for name in args.shapes.split(","):
        try:
            records += run_shape(name, args, device, dtype)
        except Exception:  # one shape's failure is printed; the next shapes still run
            traceback.print_exc()
            print(f"# {name}: FAILED (above)", flush=True)
        _reset(device)
        if args.out:  # after every shape: a run cut short keeps what it measured
            args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


if __name__ == "__main__":
    main()
