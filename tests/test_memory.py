"""The memory budget: how the estimate scales, how a batch size is planned, and that it bounds reality."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from probe import memory, memory_measure
from probe.errors import ConfigError, HeadlabError
from probe.loading import LoadedModel
from probe.memory import MemoryBudgetError, estimate_capture, plan_batch_size, weights_bytes
from probe.reducers import ColumnImportance, DiagonalScore, KeepPatterns, MeanDistance, RowEntropy

MiB = 2**20


def census_reducers() -> list:
    return [RowEntropy(), MeanDistance(), DiagonalScore(1), ColumnImportance()]


def _est(model: LoadedModel, T: int, mode: memory.Mode, b: int = 1, **kw: object) -> memory.MemoryEstimate:
    return estimate_capture(
        model, batch_size=b, seq_len=T, reducers=census_reducers(), mode=mode, query_block=64, **kw
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- the estimate


def test_weights_are_every_parameter_and_buffer_once(tiny_llama: LoadedModel) -> None:
    params = sum(p.numel() * p.element_size() for p in tiny_llama.hf_model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in tiny_llama.hf_model.buffers())
    assert weights_bytes(tiny_llama) == params + buffers
    assert _est(tiny_llama, 128, "eager").weights == params + buffers


def test_eager_estimate_grows_quadratically_with_seq_len(tiny_llama: LoadedModel) -> None:
    sizes = [_est(tiny_llama, T, "eager").transient for T in (2048, 4096, 8192)]
    for small, large in itertools.pairwise(sizes):
        assert 3.5 < large / small <= 4.05, sizes  # T² dominates: x4 per doubling
    a, b = (_est(tiny_llama, T, "eager").attention for T in (4096, 8192))
    assert b / a == pytest.approx(4, rel=0.01)


def test_recompute_estimate_grows_linearly_with_seq_len(tiny_llama: LoadedModel) -> None:
    sizes = [_est(tiny_llama, T, "recompute").transient for T in (2048, 4096, 8192)]
    for small, large in itertools.pairwise(sizes):
        assert 1.8 < large / small <= 2.05, sizes  # one query block at a time: x2 per doubling
    # and it is far below eager at long contexts
    assert _est(tiny_llama, 8192, "recompute").transient * 20 < _est(tiny_llama, 8192, "eager").transient


def test_recompute_estimate_grows_with_query_block(tiny_llama: LoadedModel) -> None:
    small, large = (
        estimate_capture(tiny_llama, batch_size=1, seq_len=4096, mode="recompute", query_block=q).attention
        for q in (64, 1024)
    )
    assert large > 3 * small


def test_estimate_grows_with_batch_and_counts_the_reducers(tiny_llama: LoadedModel) -> None:
    one, four = _est(tiny_llama, 256, "eager", b=1), _est(tiny_llama, 256, "eager", b=4)
    assert four.transient > 3 * one.transient
    bare = estimate_capture(tiny_llama, batch_size=4, seq_len=256, mode="eager")
    alpha = ColumnImportance().state_bytes(4, 256, tiny_llama.n_layers, tiny_llama.n_heads)
    assert bare.reducers == 0 and four.reducers >= alpha
    # on the CPU, the results kept over all sequences (and kept patterns) are counted too
    kept = estimate_capture(
        tiny_llama,
        batch_size=4,
        seq_len=256,
        mode="eager",
        n_sequences=1000,
        reducers=[ColumnImportance(), KeepPatterns(n_samples=2)],
    )
    L, H = tiny_llama.n_layers, tiny_llama.n_heads
    assert kept.reducers >= 1000 * L * H * 256 * 4 + 2 * L * H * 256 * 256 * 2


def test_estimate_total_and_description(tiny_llama: LoadedModel) -> None:
    est = _est(tiny_llama, 512, "eager", b=2)
    assert est.total == est.weights + est.transient
    assert (
        est.weights + est.reducers
        < est.total
        <= (est.weights + est.activations + est.attention + est.logits + est.reducers)
    )
    text = est.describe()
    for word in ("eager", "2 x 512", "cpu", "weights", "attention", "activations", "reducers", "MiB"):
        assert word in text, text
    assert "query_block 64" in _est(tiny_llama, 512, "recompute").describe()


def test_bfloat16_estimate_is_smaller(tiny_llama: LoadedModel) -> None:
    fp32 = _est(tiny_llama, 512, "eager", b=4)
    bf16 = _est(tiny_llama, 512, "eager", b=4, dtype=torch.bfloat16)
    assert bf16.weights * 2 == fp32.weights and bf16.transient < fp32.transient


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "fast"}, "unknown capture mode"),
        ({"batch_size": 0}, ">= 1"),
        ({"seq_len": 0}, ">= 1"),
        ({"query_block": 0}, ">= 1"),
    ],
)
def test_estimate_rejects_bad_arguments(tiny_llama: LoadedModel, kwargs: dict, fragment: str) -> None:
    args = {"batch_size": 1, "seq_len": 16, "mode": "eager", "query_block": 8, **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        estimate_capture(tiny_llama, **args)


# ------------------------------------------------------------------------------------------ planning


def _fix_available(monkeypatch: pytest.MonkeyPatch, n_bytes: int) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: n_bytes)


def test_plan_keeps_the_requested_batch_when_memory_is_plenty(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fix_available(monkeypatch, 2**40)
    kw = {"seq_len": 256, "reducers": census_reducers(), "mode": "eager", "query_block": 64}
    assert plan_batch_size(tiny_llama, n_sequences=100, requested_batch=16, **kw) == 16  # type: ignore[arg-type]
    assert plan_batch_size(tiny_llama, n_sequences=3, requested_batch=16, **kw) == 3  # type: ignore[arg-type]


def test_plan_reduces_the_batch_when_the_budget_is_small(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"seq_len": 512, "reducers": census_reducers(), "mode": "eager", "query_block": 64}
    need = {
        b: estimate_capture(tiny_llama, batch_size=b, n_sequences=64, **kw).transient  # type: ignore[arg-type]
        for b in (3, 4)
    }
    # room for 3 sequences at a time, not 4, at the default 80 % budget
    _fix_available(monkeypatch, int((need[3] + need[4]) / 2 / 0.8))
    assert plan_batch_size(tiny_llama, n_sequences=64, requested_batch=32, **kw) == 3  # type: ignore[arg-type]
    # a smaller budget fraction gives a smaller batch
    assert plan_batch_size(tiny_llama, n_sequences=64, requested_batch=32, budget_fraction=0.4, **kw) < 3  # type: ignore[arg-type]


def test_plan_stops_at_the_first_batch_that_does_not_fit(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a batch whose blocks cross the mmap threshold (32 MiB) can look cheaper than a
    smaller one (no heap slack); the plan never relies on that."""
    kw = {"seq_len": 512, "reducers": census_reducers(), "mode": "eager", "query_block": 64}
    need = {
        b: estimate_capture(tiny_llama, batch_size=b, n_sequences=64, **kw).transient  # type: ignore[arg-type]
        for b in range(1, 17)
    }
    drops = [b for b in range(2, 17) if need[b] < need[b - 1]]
    assert drops, need  # 4 heads x 512² x 4 bytes x 8 sequences = 32 MiB
    b = drops[0]
    budget = (need[b] + need[b - 1]) / 2  # batch b fits, batch b - 1 does not
    _fix_available(monkeypatch, int(budget / 0.8) + 1)
    planned = plan_batch_size(tiny_llama, n_sequences=64, requested_batch=b, **kw)  # type: ignore[arg-type]
    assert planned < b - 1
    assert all(need[x] <= budget for x in range(1, planned + 1)) and need[planned + 1] > budget


def test_plan_raises_with_what_to_change_when_nothing_fits(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    T = 512
    one_eager = estimate_capture(
        tiny_llama, batch_size=1, seq_len=T, mode="eager", reducers=census_reducers()
    )
    _fix_available(monkeypatch, int(one_eager.transient * 0.5))
    with pytest.raises(MemoryBudgetError) as info:
        plan_batch_size(
            tiny_llama, n_sequences=8, seq_len=T, reducers=census_reducers(), mode="eager", requested_batch=8
        )
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, HeadlabError)
    msg = str(err)
    assert "not enough memory" in msg and f"1 x {T} tokens" in msg  # the estimate
    assert memory.format_bytes(int(one_eager.transient * 0.5)) in msg  # the memory available
    assert "80%" in msg  # the budget
    assert "shorter seq_len (at most" in msg  # what to change...
    assert "mode='recompute'" in msg and "query_block=" in msg
    assert "bfloat16" in msg and "GPU" in msg and "more free memory" in msg
    longest = int(msg.split("at most ")[1].split()[0])
    assert 1 <= longest < T
    fits = estimate_capture(
        tiny_llama, batch_size=1, seq_len=longest, mode="eager", reducers=census_reducers()
    )
    assert fits.transient <= 0.8 * one_eager.transient * 0.5


def test_plan_in_recompute_mode_suggests_a_smaller_query_block(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"seq_len": 4096, "reducers": census_reducers(), "mode": "recompute"}
    big = estimate_capture(tiny_llama, batch_size=1, query_block=4096, **kw)  # type: ignore[arg-type]
    small = estimate_capture(tiny_llama, batch_size=1, query_block=128, **kw)  # type: ignore[arg-type]
    _fix_available(monkeypatch, int((big.transient + small.transient) / 2 / 0.8))
    with pytest.raises(MemoryBudgetError, match="smaller query_block with query_block="):
        plan_batch_size(tiny_llama, n_sequences=4, query_block=4096, requested_batch=4, **kw)  # type: ignore[arg-type]


def test_plan_rejects_bad_arguments(tiny_llama: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="budget_fraction"):
        plan_batch_size(tiny_llama, n_sequences=4, seq_len=16, budget_fraction=1.5)
    with pytest.raises(ConfigError, match=">= 1"):
        plan_batch_size(tiny_llama, n_sequences=0, seq_len=16)


# ---------------------------------------------------------------------------------- available memory


def test_available_memory_on_this_machine_is_positive() -> None:
    assert memory.available_memory("cpu") > 16 * MiB


def _fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroup_line: str) -> Path:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(cgroup_line + "\n")
    root = tmp_path / "fs"
    root.mkdir()
    monkeypatch.setattr(memory, "_PROC_MEMINFO", meminfo)
    monkeypatch.setattr(memory, "_PROC_SELF_CGROUP", cgroup)
    monkeypatch.setattr(memory, "_CGROUP_ROOT", root)
    return root


def test_available_memory_reads_meminfo_without_a_cgroup_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fake_proc(tmp_path, monkeypatch, "0::/job")
    (root / "job").mkdir()
    (root / "job" / "memory.max").write_text("max\n")
    assert memory.available_memory("cpu") == 8000000 * 1024


def test_available_memory_respects_a_cgroup_v2_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_proc(tmp_path, monkeypatch, "0::/job")
    job = root / "job"
    job.mkdir()
    (job / "memory.max").write_text(str(2 * 2**30))
    (job / "memory.current").write_text(str(2**30))
    (job / "memory.stat").write_text(f"anon 123\ninactive_file {256 * MiB}\n")
    assert memory.available_memory("cpu") == 2**30 + 256 * MiB  # limit - usage + reclaimable cache


def test_available_memory_respects_a_cgroup_v1_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_proc(tmp_path, monkeypatch, "4:memory:/slurm/job_1")
    job = root / "memory" / "slurm" / "job_1"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(str(3 * 2**30))
    (job / "memory.usage_in_bytes").write_text(str(2**30))
    assert memory.available_memory("cpu") == 2 * 2**30
    (job / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1 "unlimited"
    assert memory.available_memory("cpu") == 8000000 * 1024


def test_available_memory_falls_back_to_sysconf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(tmp_path, monkeypatch, "0::/")
    monkeypatch.setattr(memory, "_PROC_MEMINFO", tmp_path / "missing")
    assert memory.available_memory("cpu") > 0


# ----------------------------------------------------------------------------- against measurement


@pytest.mark.parametrize(
    ("mode", "batch", "seq_len", "query_block"), [("eager", 4, 512, 512), ("recompute", 8, 512, 64)]
)
def test_estimate_bounds_the_measured_peak_rss_growth(
    mode: memory.Mode, batch: int, seq_len: int, query_block: int
) -> None:
    """A fresh process captures on tiny-llama; its peak RSS growth stays under the estimate."""
    got = memory_measure.measure_capture_peak(
        "tiny-llama", batch_size=batch, seq_len=seq_len, mode=mode, query_block=query_block, timeout=600
    )
    measured, estimate = got["measured"], got["estimate"]
    assert measured > 2 * MiB, got  # the capture did allocate: the measurement is not empty
    assert estimate >= measured, f"estimate {estimate / MiB:.1f} MiB < measured {measured / MiB:.1f} MiB"
    assert estimate <= 5 * measured, f"estimate {estimate / MiB:.1f} MiB vs measured {measured / MiB:.1f} MiB"


def test_capture_lowers_the_batch_to_fit_and_refuses_what_cannot_fit(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probe import capture as capture_module
    from probe.capture import capture
    from probe.memory import MemoryBudgetError

    rows = [[5] * 400 for _ in range(4)]
    need_one = _est(tiny_llama, 401, "eager", b=1).transient
    monkeypatch.setattr("probe.memory.available_memory", lambda device: int(need_one * 2.0))
    with pytest.warns(UserWarning, match="lowered"):
        stats = capture(tiny_llama, rows, [RowEntropy()], batch_size=4, progress=False)
    assert 1 <= stats.batch_size < 4 and stats.n_samples == 4
    monkeypatch.setattr("probe.memory.available_memory", lambda device: 1000)
    with pytest.raises(MemoryBudgetError, match=r"not enough memory.*To fit"):
        capture(tiny_llama, rows, [RowEntropy()], batch_size=4, progress=False)
    assert capture_module._RecomputeState.active is None


def test_decode_estimate_counts_the_kv_cache_a_prefill_keeps(tiny_llama: LoadedModel) -> None:
    """The KV cache term equals the bytes of the cache a real prefill leaves, at the final length."""
    from probe.decode import prefill

    ids = [5 + i % 200 for i in range(40)]
    cache = prefill(tiny_llama, ids).cache  # ids[:-1] prefilled: 39 positions
    held = sum(
        t.untyped_storage().nbytes()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )
    est = memory.estimate_decode(tiny_llama, prompt_len=39, max_new_tokens=0)
    assert est.cache == held
    longer = memory.estimate_decode(tiny_llama, prompt_len=39, max_new_tokens=10)
    assert longer.cache * 39 == est.cache * 49  # linear in the final length
    assert est.total == est.weights + est.cache + max(est.activations + est.attention, est.logits)
    assert "KV cache" in est.describe() and est.mode == "decode"
    with pytest.raises(ConfigError, match="prompt_len"):
        memory.estimate_decode(tiny_llama, prompt_len=0, max_new_tokens=1)


def test_a_decode_that_would_not_fit_is_refused_before_the_prefill(
    tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probe import decode

    ids = [5 + i % 200 for i in range(64)]
    need = memory.estimate_decode(tiny_llama, prompt_len=64, max_new_tokens=4).transient
    monkeypatch.setattr(memory, "available_memory", lambda device: int(need * 0.8 / 0.9))
    ran: list[int] = []
    monkeypatch.setattr(decode, "native_attention", lambda *a, **k: ran.append(1))  # never reached
    with pytest.raises(MemoryBudgetError, match=r"a prompt of at most (\d+) tokens") as err:
        decode.greedy_decode(tiny_llama, ids, 4)
    assert "\n" not in str(err.value) and not ran
    longest = int(str(err.value).split("a prompt of at most ")[1].split()[0])
    assert 0 < longest < 64
    budget = int(0.9 * memory.available_memory("cpu"))
    assert memory.estimate_decode(tiny_llama, prompt_len=longest, max_new_tokens=4).transient <= budget
    with pytest.raises(MemoryBudgetError):
        decode.prefill(tiny_llama, ids, 4)
