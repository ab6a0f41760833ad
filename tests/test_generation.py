"""Every way to generate through a LoadedModel gives transformers' own tokens, or refuses.

The reference is transformers' ``generate`` on the same checkpoint: the model's weights saved with
``save_pretrained`` and loaded back by transformers alone (no bridge, no headlab), greedy, 32 new
tokens. Each handle is checked with and without a KV cache, on every model kind: language
(GPT-2 and Llama layouts, left-padded batches), vision-language (tiny LLaVA, with pixels), and
vision (which does not generate and says so). A bridge whose attention would leave the cache empty is
simulated to check that its handles then refuse, naming the handle that works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import probe
from probe import generation, vlm
from probe.errors import ConfigError
from probe.loading import LoadedModel

NEW = 32
PROMPTS = ["hello world, this is a longer prompt", "a b"]


def _reference(model: LoadedModel, tmp: Path) -> Any:
    """transformers alone on the same weights: saved, then loaded by the Auto class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    assert model.native_model is not None
    model.native_model.save_pretrained(tmp)  # type: ignore[operator]
    auto = AutoModelForImageTextToText if model.kind == "vision-language" else AutoModelForCausalLM
    return auto.from_pretrained(tmp, dtype=torch.float32).eval()


def _kwargs(model: LoadedModel, batch: probe.Batch, **extra: Any) -> dict[str, Any]:
    return {
        "attention_mask": batch.attention_mask,
        "max_new_tokens": NEW,
        "do_sample": False,
        "pad_token_id": model.tokenizer.pad_token_id,
        **extra,
    }


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def language_model(request: pytest.FixtureRequest) -> LoadedModel:
    return probe.load_model(request.param, device="cpu")


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_language_handles_equal_transformers_generate(
    language_model: LoadedModel, use_cache: bool, tmp_path: Path
) -> None:
    model = language_model
    batch = model.encode(PROMPTS)
    ref = _reference(model, tmp_path).generate(batch.input_ids, **_kwargs(model, batch, use_cache=use_cache))
    width = ref.shape[1]
    handles = {
        "model.generate": model.generate(batch, max_new_tokens=NEW, use_cache=use_cache),
        "model.native_model.generate": model.native_model.generate(  # type: ignore[union-attr,operator]
            batch.input_ids, **_kwargs(model, batch, use_cache=use_cache)
        ),
        "model.hf_model.generate": model.hf_model.generate(  # type: ignore[operator]
            batch.input_ids, **_kwargs(model, batch, use_cache=use_cache)
        ),
    }
    assert model.bridge is not None
    one = model.encode(PROMPTS[:1])  # the longest prompt: no padding
    bridge_out = model.bridge.generate(
        one.input_ids,
        max_new_tokens=NEW,
        do_sample=False,
        verbose=False,
        use_past_kv_cache=use_cache,
        stop_at_eos=False,
    )
    for name, out in handles.items():
        assert torch.equal(out, ref), f"{name} (use_cache={use_cache}) differs from transformers' generate"
    # The bridge's own loop does not stop at EOS; up to the reference's length it must agree.
    assert torch.equal(bridge_out[:, :width], ref[:1, : bridge_out.shape[1]][:, :width])


def test_cached_generation_through_the_bridge_equals_uncached(language_model: LoadedModel) -> None:
    """The bug this guards against: an empty cache makes every step see one token; the cached and
    uncached continuations through the bridge then differ."""
    model = language_model
    batch = model.encode(PROMPTS[:1])
    kw = _kwargs(model, batch)
    cached = model.hf_model.generate(batch.input_ids, use_cache=True, **kw)  # type: ignore[operator]
    uncached = model.hf_model.generate(batch.input_ids, use_cache=False, **kw)  # type: ignore[operator]
    assert torch.equal(cached, uncached)
    assert model.extra["bridge_generation"] == "ok"
    assert generation.cache_problem(model) is None


def test_vision_language_handles_equal_transformers_generate(tmp_path: Path) -> None:
    model = probe.load_model("tiny-llava", device="cpu")
    rng = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
    pixels = model.preprocess(list(images))
    batch = vlm.encode_prompts(model, ["Describe the image.", "What?"])
    ref_model = _reference(model, tmp_path)
    for use_cache in (True, False):
        kw = _kwargs(model, batch, use_cache=use_cache, pixel_values=pixels)
        ref = ref_model.generate(batch.input_ids, **kw)
        ours = {
            "model.generate": model.generate(
                batch, max_new_tokens=NEW, use_cache=use_cache, pixel_values=pixels
            ),
            "model.hf_model.generate": model.hf_model.generate(batch.input_ids, **kw),  # type: ignore[operator]
            "model.native_model.generate": model.native_model.generate(batch.input_ids, **kw),  # type: ignore[union-attr,operator]
        }
        for name, out in ours.items():
            assert torch.equal(out, ref), (
                f"{name} (use_cache={use_cache}) differs from transformers' generate"
            )


def test_vision_model_does_not_generate() -> None:
    model = probe.load_model("tiny-vit", device="cpu")
    with pytest.raises(ConfigError, match=r"does not generate text; use probe\.vision\.embed"):
        model.generate("a")


def _break_cache(model: LoadedModel) -> None:
    """Make the bridge's attention ignore the KV cache, as it did before the cache alias."""
    assert model.bridge is not None
    for module in model.bridge.modules():
        if hasattr(module, "_update_kv_cache"):
            module._update_kv_cache = lambda k, v, **kwargs: (k, v)  # type: ignore[method-assign]


def test_a_bridge_that_keeps_no_cache_is_detected_and_its_handles_refuse(tmp_path: Path) -> None:
    model = probe.load_model("tiny-llama", device="cpu")  # a private one: this test breaks it
    _break_cache(model)
    problem = generation.cache_problem(model)
    assert problem is not None and "left 0 positions in the KV cache" in problem
    generation.prepare_bridge_generation(model)
    assert str(model.extra["bridge_generation"]).startswith("refused:")
    batch = model.encode(PROMPTS)
    with pytest.raises(generation.GenerationError, match=r"use model\.generate\(\.\.\.\)|model\.generate"):
        model.hf_model.generate(batch.input_ids, **_kwargs(model, batch))  # type: ignore[operator]
    assert model.bridge is not None
    with pytest.raises(generation.GenerationError, match=r"model\.bridge\.generate: .*model\.generate"):
        model.bridge.generate(batch.input_ids[:1], max_new_tokens=2)
    # The handles that work still give transformers' tokens.
    ref = _reference(model, tmp_path).generate(batch.input_ids, **_kwargs(model, batch))
    assert torch.equal(model.generate(batch, max_new_tokens=NEW), ref)
    uncached = model.hf_model.generate(batch.input_ids, use_cache=False, **_kwargs(model, batch))  # type: ignore[operator]
    assert torch.equal(uncached, ref)


def test_sanity_fails_when_bridge_generation_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    from probe.sanity import sanity_check

    model = probe.load_model("tiny-llama", device="cpu")  # a private one: this test breaks it
    report = sanity_check(model, "hello world")
    assert report.ok() and report.bridge_continuation == report.continuation
    _break_cache(model)  # the check at load time passed; the bridge breaks afterwards
    broken = sanity_check(model, "hello world")
    assert not broken.generation_agrees() and not broken.ok()


@pytest.mark.real
def test_real_model_continues_the_capital_of_france(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import real_model

    model = real_model()
    batch = model.encode(["The capital of France is"])
    assert model.path is not None
    ref = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    kw = _kwargs(model, batch, max_new_tokens=8)
    expected = ref.generate(batch.input_ids, **kw)
    text = model.tokenizer.decode(expected[0, batch.input_ids.shape[1] :])
    assert text.startswith(" Paris.")
    assert torch.equal(model.generate(batch, max_new_tokens=8), expected)
    assert torch.equal(model.hf_model.generate(batch.input_ids, **kw), expected)  # type: ignore[operator]
    assert torch.equal(model.hf_model.generate(batch.input_ids, use_cache=False, **kw), expected)  # type: ignore[operator]
