"""The vision matrix: every family of probe.vision_families through every check of the vision table.

Each family's tiny checkpoint is written once into a temporary directory and checked once; a check
passes or is refused with a one-line ConfigError, never fails. docs/support.md's vision table must
show exactly what the checks return now. The tests after the matrix pin what the checks found:
SigLIP's embedding without a CLS token, DINOv2's interpolated positions and register tokens, and
the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import probe
from analyses.vision_support import CHECKS, family_results
from probe import vision
from probe.errors import ConfigError, HeadlabError
from probe.support import CheckResult
from probe.vision_families import VISION_FAMILIES, save_checkpoint
from probe.vision_support import images

DOCS = Path(__file__).resolve().parent.parent / "docs" / "support.md"
HEADER = "| vision family |"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vision-families")


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, CheckResult]]:
    """family -> its check results, filled on first use (each checkpoint built and checked once)."""
    return {}


def _results(cache: dict[str, dict[str, CheckResult]], root: Path, family: str) -> dict[str, CheckResult]:
    if family not in cache:
        cache[family] = family_results(family, root)
    return cache[family]


def _directory(root: Path, family: str) -> Path:
    """The family's checkpoint, as the matrix wrote it (written here when a test runs alone)."""
    directory = root / family
    return directory if (directory / "config.json").is_file() else save_checkpoint(family, directory)


def test_the_vision_families() -> None:
    assert {"vit", "deit", "clip", "siglip", "dinov2", "dinov2_with_registers", "llava"} <= set(
        VISION_FAMILIES
    )
    for family in VISION_FAMILIES:
        if family != "llava":
            assert VISION_FAMILIES[family].config().num_hidden_layers == 2


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_family(family: str, results: dict[str, dict[str, CheckResult]], root: Path) -> None:
    got = _results(results, root, family)
    assert list(got) == list(CHECKS)
    failed = {name: r.detail for name, r in got.items() if r.status == "fail"}
    assert not failed, f"{family}: {failed}"
    for name, r in got.items():
        if r.status == "refused":
            assert r.detail and "\n" not in r.detail, (family, name)
    # every analysis applies to its own kind of model: vit-heads to the CLS-token vision models,
    # VHD to the LLaVA assembly; each other pair is refused
    want = {"vit-heads": family not in ("siglip", "llava"), "vhd": family == "llava"}
    assert {name: got[name].status == "pass" for name in want} == want, family


def _table_rows(text: str) -> dict[str, list[str]]:
    header = [line for line in text.splitlines() if line.startswith(HEADER)]
    assert len(header) == 1, "docs/support.md has no vision family table"
    columns = [c.strip().strip("`") for c in header[0].strip("|").split("|")]
    assert columns[2:] == list(CHECKS), f"docs/support.md vision columns {columns[2:]} are not {list(CHECKS)}"
    rows: dict[str, list[str]] = {}
    lines = text.splitlines()
    for line in lines[lines.index(header[0]) + 2 :]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[2:]
    return rows


def test_vision_table_is_current(results: dict[str, dict[str, CheckResult]], root: Path) -> None:
    rows = _table_rows(DOCS.read_text())
    assert sorted(rows) == sorted(VISION_FAMILIES), (
        "docs/support.md lists other vision families; run scripts/support_table.py"
    )
    for family in VISION_FAMILIES:
        want = [r.cell().replace("|", "/") for r in _results(results, root, family).values()]
        assert rows[family] == want, (
            f"docs/support.md vision row {family} is stale; run python scripts/support_table.py"
        )


# ------------------------------------------------------------------------- what the checks found


@torch.no_grad()
def test_siglip_has_no_cls_token_and_embeds_with_its_pooling_head(root: Path) -> None:
    from transformers import SiglipVisionModel

    directory = _directory(root, "siglip")
    model = probe.load_model(str(directory), device="cpu")
    assert model.image is not None and model.image.n_prefix == 0 and model.n_ctx == 16
    assert vision.region_mask(model).all(), "every token is a patch"
    pixels = model.preprocess(images(2))
    reference = SiglipVisionModel.from_pretrained(str(directory)).eval()
    out = reference(pixel_values=pixels)
    ours = vision.embed(model, pixels)
    assert torch.allclose(ours, out.pooler_output, atol=1e-5)
    assert not torch.allclose(ours, out.last_hidden_state[:, 0], atol=1e-2), "token 0 is a patch"
    # a tower saved without its pooling head: the mean of the final norm's tokens
    reference.config.vision_use_head = False
    headless = SiglipVisionModel(reference.config).eval()
    headless.load_state_dict(reference.state_dict(), strict=False)
    headless.save_pretrained(root / "siglip-headless")
    plain = probe.load_model(str(root / "siglip-headless"), device="cpu")
    assert torch.allclose(
        vision.embed(plain, pixels), headless(pixel_values=pixels).last_hidden_state.mean(1), atol=1e-5
    )
    from analyses.vit_heads import VitHeadsConfig, run_vit_heads

    with pytest.raises(ConfigError, match="has no CLS token"):
        run_vit_heads(model, VitHeadsConfig(preset="small", progress=False))


@torch.no_grad()
def test_dinov2_interpolates_its_positions_to_the_processor_crop(root: Path) -> None:
    directory = _directory(root, "dinov2")
    model = probe.load_model(str(directory), device="cpu")
    assert model.hf_model.config.image_size == 40, "a 5x5 position table"
    assert model.image is not None and model.image.image_size == 32 and model.image.grid == (4, 4)
    assert model.preprocess(images(1)).shape == (1, 3, 32, 32) and model.n_ctx == 17
    # a ViT does not resize its positions: the same mismatch is refused there
    vit = _directory(root, "vit")
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    (vit / "preprocessor_config.json").write_text(json.dumps({**processor, "crop_size": 24}))
    try:
        with pytest.raises(HeadlabError, match="model takes 32"):
            probe.load_model(str(vit), device="cpu")
    finally:
        (vit / "preprocessor_config.json").unlink()


def test_dinov2_register_tokens_are_prefix_tokens(root: Path) -> None:
    model = probe.load_model(str(_directory(root, "dinov2_with_registers")), device="cpu")
    assert model.image is not None
    assert model.image.prefix_names == ("cls", "register0", "register1", "register2", "register3")
    assert model.n_ctx == 21 and model.image.token_of(0, 0) == 5
    mask = vision.region_mask(model, rows=[0])
    assert mask[:5].sum() == 0 and mask[5:9].all() and mask.sum() == 4


def test_unsupported_vision_checkpoints_are_refused_with_config_errors(tmp_path: Path) -> None:
    for model_type, match in (("siglip", "SiglipVisionModel"), ("swin", "does not hook yet")):
        directory = tmp_path / model_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ConfigError, match=match):
            probe.load_model(str(directory), device="cpu")
