"""Loading vision-language models: assemblies from the catalogue, LLaVA checkpoint directories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch

from probe import cache, zoo
from probe.assemblies import ASSEMBLIES, AssemblySpec
from probe.checkpoints import check_checkpoint_files, load_language_dir, quiet_transformers
from probe.checksums import checkpoint_sha256
from probe.devicemap import DeviceMapSpec
from probe.errors import HeadlabError
from probe.images import ImageSpec
from probe.model import BosMode, LoadedModel
from probe.vision.load import load_checkpoint
from probe.vlm.assembly import assemble, merge_lora
from probe.vlm.projector import ProjectorFile, read_projector
from probe.vlm.wrap import _image_spec, _require_vlm, wrap_vlm


def _converted(name: str, fetch_if_missing: bool) -> tuple[Path, dict[str, Any]]:
    """The converted directory of catalogue model ``name`` and its marker, content-checked first."""
    return zoo.verified_cache(zoo.get_spec(name), fetch_if_missing=fetch_if_missing)


def load_parts(
    spec: AssemblySpec, *, fetch_if_missing: bool = True
) -> tuple[torch.nn.Module, torch.nn.Module, Any, ImageSpec, dict[str, Any]]:
    """Load an assembly's image tower and language model (float32, CPU) from the converted cache.

    Returns (vision model, language model, tokenizer, image spec, provenance of both parts).
    """
    vision_dir, vision_marker = _converted(spec.vision, fetch_if_missing)
    language_dir, language_marker = _converted(spec.language, fetch_if_missing)
    vision_model, family, image = load_checkpoint(vision_dir, torch.float32)
    if family != "clip":
        raise HeadlabError(f"{spec.vision} is a {family} model; LLaVA assemblies take a CLIP image tower")
    language_model, tokenizer = load_language_dir(language_dir, torch.float32)
    parts = {}
    for role, name, directory, marker in (
        ("vision", spec.vision, vision_dir, vision_marker),
        ("language", spec.language, language_dir, language_marker),
    ):
        part = zoo.CATALOGUE[name]
        parts[role] = {
            "name": name,
            "path": str(directory),
            "weight_sha256": str(marker.get("source_sha256")),
            "caveat": part.caveat,
            "licence": part.licence,
        }
    return vision_model, language_model, tokenizer, image, parts


def load_assembly(
    name: str,
    *,
    projector: str | Path | Literal["fresh"] | None = None,
    device: torch.device,
    dtype: torch.dtype,
    bos: BosMode = "default",
    seed: int = 0,
    fetch_if_missing: bool = True,
    device_map: DeviceMapSpec = None,
) -> LoadedModel:
    """Load assembly ``name`` (e.g. ``scene-llava``) with its trained projector (spread by
    ``device_map`` once assembled in memory, if given).

    ``projector``: a projector file (default: the assembly's file in ``data/``) or ``"fresh"`` for a
    projector initialised from ``seed`` (what training starts from). A missing file is an error that
    names the training command.
    """
    if name not in ASSEMBLIES:
        raise HeadlabError(f"unknown assembly {name!r}; known: {', '.join(ASSEMBLIES)}")
    spec = ASSEMBLIES[name]
    trained: ProjectorFile | None = None
    projector_path: Path | None = None
    if projector != "fresh":
        projector_path = Path(projector) if projector is not None else spec.projector_path
        if not projector_path.is_file():
            raise HeadlabError(
                f"{name} needs its trained projector {projector_path}, which does not exist yet; train it "
                f"with: {spec.train_command} (a GPU run, see `{spec.train_command} --help`), or load the "
                f"untrained assembly with probe.vlm.load_assembly({name!r}, projector='fresh')"
            )
        trained = read_projector(projector_path)
        wanted = spec.describe_parts()
        got = {k: trained.meta.get(k) for k in wanted}
        if got != wanted:
            raise HeadlabError(
                f"{projector_path} was trained for {got}, not for {name} ({wanted}); train it again with: "
                f"{spec.train_command}"
            )
    vision_model, language_model, tokenizer, image, parts = load_parts(
        spec, fetch_if_missing=fetch_if_missing
    )
    hf_model, tokenizer = assemble(
        vision_model,
        language_model,
        tokenizer,
        seed=seed,
        projector_state=trained.projector if trained is not None else None,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act=spec.projector_hidden_act,
    )
    del vision_model, language_model
    lora_merged = 0
    if trained is not None and trained.lora:
        lora_merged = merge_lora(hf_model, trained.lora, trained.lora_scale)
    digest = hashlib.sha256()
    for role in ("vision", "language"):
        digest.update(parts[role]["weight_sha256"].encode())
    projector_sha = cache.sha256_file(projector_path) if projector_path is not None else f"fresh-seed-{seed}"
    digest.update(projector_sha.encode())
    caveats = [
        f"{parts[r]['name']}: {parts[r]['caveat']}" for r in ("vision", "language") if parts[r]["caveat"]
    ]
    if trained is None:
        caveats.append(f"untrained projector (random, seed {seed})")
    if lora_merged:
        caveats.append(f"language model changed by {lora_merged} merged LoRA deltas")
    return wrap_vlm(
        name,
        "assembled",
        hf_model,
        tokenizer,
        image,
        device=device,
        dtype=dtype,
        bos=bos,
        weight_sha256=digest.hexdigest(),
        path=None,
        caveat="; ".join(caveats),
        licence=f"{parts['vision']['name']}: {parts['vision']['licence']}; "
        f"{parts['language']['name']}: {parts['language']['licence']}",
        device_map=device_map,
        extra={
            "parts": parts,
            "projector": {
                "path": str(projector_path) if projector_path else None,
                "sha256": projector_sha,
                "trained": trained.meta.get("training") if trained is not None else None,
                "lora_merged": lora_merged,
            },
            "train_command": spec.train_command,
            "parts_meta": spec.describe_parts(),
        },
    )


def load_llava_dir(
    directory: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    bos: BosMode = "default",
    placement: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a local ``LlavaForConditionalGeneration`` checkpoint (config, weights, tokenizer, and
    ``preprocessor_config.json`` if present, else CLIP's preprocessing for the tower's size);
    ``placement``: ``from_pretrained``'s device map and offload folder
    (:func:`probe.loading.placement`)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    check_checkpoint_files(directory, tokenizer=True)
    try:
        with quiet_transformers():
            loaded: Any = LlavaForConditionalGeneration.from_pretrained(
                str(directory),
                dtype=dtype if placement else torch.float32,  # placed: loaded in its dtype where it lies
                attn_implementation="eager",
                output_loading_info=True,
                **(placement or {}),
            )
        model, info = loaded
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise HeadlabError(
            f"could not load the LLaVA checkpoint in {directory}: {str(err).splitlines()[0]}; it needs "
            "config.json, model.safetensors and the tokenizer files written by save_pretrained"
        ) from None
    missing = [
        k for k in info.get("missing_keys", []) if "lm_head" not in k or not model.config.tie_word_embeddings
    ]
    if missing:
        raise HeadlabError(
            f"the checkpoint in {directory} lacks weights: {sorted(missing)[:4]}; they would be random. "
            "Re-save the full model with save_pretrained"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    image = _image_spec(model.config.vision_config, directory / "preprocessor_config.json")
    return wrap_vlm(
        directory.name,
        "local",
        model,
        tokenizer,
        image,
        device=device,
        dtype=dtype,
        bos=bos,
        weight_sha256=checkpoint_sha256(directory, name_files_if_no_weights=True),
        path=str(directory),
        device_map=(placement or {}).get("device_map"),
    )


def save_checkpoint(model: LoadedModel, directory: str | Path) -> Path:
    """Save a vision-language model as a plain LLaVA checkpoint directory that :func:`load_llava_dir` reads."""
    _require_vlm(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    native: Any = model.native_model
    native.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    if model.image is not None:
        (directory / "preprocessor_config.json").write_text(
            json.dumps(model.image.to_processor_config(), indent=2)
        )
    return directory
