"""Vision-language models in probe: a LLaVA assembled from parts, loaded, prompted, generated from, hooked.

A LLaVA reads an image through a CLIP tower, maps the patch features of one of its layers through
a two-layer MLP projector into the language model's embedding space and writes them over the
copies of the image token in the prompt. ``scene-llava`` is assembled here from ``clip-vit-b16``,
a projector trained by ``headlab train scene-llava`` and ``smollm2-135m``; every LLaVA checkpoint
directory goes through the same code, and ``tiny-llava`` is a random tiny one for tests. Stages,
each importing only the ones before it: ``assembly`` (layout, assembling, LoRA) <- ``wrap`` (the
loaded model) <- ``projector`` (projector files) <- ``load`` (assemblies, checkpoint directories)
<- ``prompts`` <- ``answers`` (generation), ``native_hooks`` (per-head outputs) <- ``sources``
(the vision-language model sources and ``tiny-llava``, registered on import).

See docs/models.md (vision-language models) and docs/capture.md.
"""

from __future__ import annotations

from probe.assemblies import ASSEMBLIES, DATA_DIR, IMAGE_TOKEN, AssemblySpec, FeatureStrategy
from probe.vlm.answers import YesNoAnswer, _native_generate, answer_yes_no, generate, image_features
from probe.vlm.assembly import (
    KIND,
    LAYOUT,
    LlavaLayout,
    add_image_token,
    assemble,
    is_llava_config,
    llava_config,
    lora_module_name,
    merge_lora,
)
from probe.vlm.load import load_assembly, load_llava_dir, load_parts, save_checkpoint
from probe.vlm.native_hooks import HeadOutputs, capture_head_outputs
from probe.vlm.projector import (
    LORA_PREFIX,
    MAX_PROJECTOR_BYTES,
    PROJECTOR_FORMAT,
    PROJECTOR_PREFIX,
    ProjectorFile,
    apply_projector,
    parts_meta,
    projector_module,
    read_projector,
    state_sha256,
    write_projector,
)
from probe.vlm.prompts import encode_prompts, format_prompt, prompt_ids
from probe.vlm.sources import build_tiny_llava
from probe.vlm.wrap import _require_vlm, wrap_vlm

__all__ = [
    "ASSEMBLIES",
    "DATA_DIR",
    "IMAGE_TOKEN",
    "KIND",
    "LAYOUT",
    "LORA_PREFIX",
    "MAX_PROJECTOR_BYTES",
    "PROJECTOR_FORMAT",
    "PROJECTOR_PREFIX",
    "AssemblySpec",
    "FeatureStrategy",
    "HeadOutputs",
    "LlavaLayout",
    "ProjectorFile",
    "YesNoAnswer",
    "_native_generate",
    "_require_vlm",
    "add_image_token",
    "answer_yes_no",
    "apply_projector",
    "assemble",
    "build_tiny_llava",
    "capture_head_outputs",
    "encode_prompts",
    "format_prompt",
    "generate",
    "image_features",
    "is_llava_config",
    "llava_config",
    "load_assembly",
    "load_llava_dir",
    "load_parts",
    "lora_module_name",
    "merge_lora",
    "parts_meta",
    "projector_module",
    "prompt_ids",
    "read_projector",
    "save_checkpoint",
    "state_sha256",
    "wrap_vlm",
    "write_projector",
]
