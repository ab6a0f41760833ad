"""The vision-language models the workbench assembles from catalogue parts and a trained projector.

Data only: each :class:`AssemblySpec` names its image tower and language model (catalogue names),
its projector file in ``data/`` and the command that trains it. :mod:`probe.zoo` lists them,
:mod:`probe.vlm` loads them. See docs/models.md (scene-llava).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

IMAGE_TOKEN = "<image>"
FeatureStrategy = Literal["default", "full"]
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class AssemblySpec:
    """A vision-language model the workbench assembles: catalogue parts + a projector file in ``data/``."""

    name: str
    description: str
    vision: str  # catalogue name of the image tower
    language: str  # catalogue name of the language model
    projector_file: str  # file name under data/
    train_command: str
    vision_feature_layer: int = -2
    vision_feature_select_strategy: FeatureStrategy = "default"
    projector_hidden_act: str = "gelu"

    @property
    def projector_path(self) -> Path:
        return DATA_DIR / self.projector_file

    def describe_parts(self) -> dict[str, Any]:
        return {
            "vision": self.vision,
            "language": self.language,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "image_token": IMAGE_TOKEN,
        }


ASSEMBLIES: dict[str, AssemblySpec] = {
    spec.name: spec
    for spec in [
        AssemblySpec(
            name="scene-llava",
            description="LLaVA-style: clip-vit-b16 (frozen, layer -2, CLS dropped, 196 image tokens) -> "
            "2-layer MLP projector trained on synthetic scene captions -> smollm2-135m (frozen)",
            vision="clip-vit-b16",
            language="smollm2-135m",
            projector_file="scene_llava_projector.safetensors",
            train_command="headlab train scene-llava",
        ),
    ]
}
