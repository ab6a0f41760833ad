"""How a vision model sees an image: preprocessing (resize, crop, normalise) and the patch-token grid.

:class:`ImageSpec` is shared by every part of probe that handles images (the model wrapper, the
vision and vision-language modules); it imports nothing from probe but its errors. See
docs/models.md for the vision architectures that use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch

from probe.errors import ConfigError

Resample = Literal["nearest", "bilinear", "bicubic"]
RGB = tuple[float, float, float]
ImageInput = np.ndarray | Sequence[Any] | torch.Tensor
"""uint8 RGB arrays ``[H, W, 3]`` (one, a list, or a stack ``[N, H, W, 3]``), PIL images, or
pixel values ``[N, 3, H, W]`` already made by :meth:`ImageSpec.preprocess`."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {
    "nearest": 0,
    "bilinear": 2,
    "bicubic": 3,
}  # PIL's codes, as preprocessor_config.json writes them


@dataclass(frozen=True)
class ImageSpec:
    """How a model sees an image: its preprocessing and its token grid.

    Preprocessing follows the checkpoint's image processor: either resize the shortest side to
    ``shortest_edge`` (the long side to ``int(shortest_edge · long / short)``, as CLIP and
    transformers compute it) or resize to exactly ``resize_to`` (height, width); then, if ``crop``
    is set, take the centre ``crop`` (top = ``(H - h) // 2``, left = ``(W - w) // 2``); scale to
    ``[0, 1]`` and normalise per channel with ``mean``/``std``. Resizing uses Pillow on the uint8
    image, so the numbers are those of the reference processors.
    """

    image_size: int  # the model's input, square
    patch_size: int
    n_prefix: int  # CLS (+ distillation) tokens before the patches
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shortest_edge: int | None = None
    resize_to: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    resample: Resample = "bicubic"
    prefix_names: tuple[str, ...] = ("cls",)

    def __post_init__(self) -> None:
        if (self.shortest_edge is None) == (self.resize_to is None):
            raise ConfigError("an ImageSpec resizes either to a shortest edge or to an exact size; give one")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image size {self.image_size} is not a multiple of patch size {self.patch_size}"
            )
        final = self.crop or self.resize_to
        if final is None or tuple(final) != (self.image_size, self.image_size):
            raise ConfigError(
                f"preprocessing ends at {final}, but the model takes {self.image_size}×{self.image_size} "
                "images; set crop (or resize_to) to the model's image size"
            )
        if self.shortest_edge is not None and self.crop is not None and self.shortest_edge < max(self.crop):
            raise ConfigError(f"shortest edge {self.shortest_edge} is smaller than the crop {self.crop}")
        if self.resample not in _PIL_RESAMPLE:
            raise ConfigError(f"resample must be one of {', '.join(_PIL_RESAMPLE)}, got {self.resample!r}")
        if len(self.prefix_names) != self.n_prefix:
            raise ConfigError("prefix_names must name each prefix token")

    # ------------------------------------------------------------------ geometry
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def token_of(self, row: int, col: int) -> int:
        """Token index of the patch at (row, col) of the grid (row-major, after the prefix tokens)."""
        rows, cols = self.grid
        if not (0 <= row < rows and 0 <= col < cols):
            raise ConfigError(f"patch ({row}, {col}) is outside the {rows}×{cols} grid")
        return self.n_prefix + row * cols + col

    def patch_rc(self) -> torch.Tensor:
        """``[T, 2]`` (row, col) of every token; prefix tokens get (-1, -1)."""
        rows, cols = self.grid
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        patches = torch.stack([r.flatten(), c.flatten()], dim=1)
        return torch.cat([torch.full((self.n_prefix, 2), -1, dtype=torch.long), patches])

    # ------------------------------------------------------------------ preprocessing
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, before the crop."""
        if self.resize_to is not None:
            return self.resize_to
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """uint8 RGB images -> pixel values ``[N, 3, image_size, image_size]`` (float32, CPU)."""
        if isinstance(images, torch.Tensor):
            return self._check_pixels(images)
        arrays = _as_uint8_images(images)
        out = np.empty((len(arrays), 3, self.image_size, self.image_size), dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        for i, array in enumerate(arrays):
            resized = self._resize(array)
            if self.crop is not None:
                h, w = self.crop
                top, left = (resized.shape[0] - h) // 2, (resized.shape[1] - w) // 2
                resized = resized[top : top + h, left : left + w]
            scaled = resized.astype(np.float32) / np.float32(255.0)
            out[i] = ((scaled - mean) / std).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def _resize(self, array: np.ndarray) -> np.ndarray:
        height, width = array.shape[:2]
        new_h, new_w = self.output_size(height, width)
        if (new_h, new_w) == (height, width):
            return array
        from PIL import Image

        resized = Image.fromarray(array, mode="RGB").resize(
            (new_w, new_h), resample=_PIL_RESAMPLE[self.resample]
        )
        return np.asarray(resized)

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected or not pixels.is_floating_point():
            raise ConfigError(
                f"pixel values must be a float tensor [N, {expected[0]}, {expected[1]}, {expected[2]}], got "
                f"{pixels.dtype} {tuple(pixels.shape)}; pass uint8 RGB arrays [H, W, 3] and let "
                "model.preprocess make them"
            )
        return pixels

    # ------------------------------------------------------------------ records
    def describe(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "n_prefix": self.n_prefix,
            "prefix": list(self.prefix_names),
            "n_tokens": self.n_tokens,
            "shortest_edge": self.shortest_edge,
            "resize_to": list(self.resize_to) if self.resize_to else None,
            "crop": list(self.crop) if self.crop else None,
            "resample": self.resample,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def to_processor_config(self) -> dict[str, Any]:
        """The same preprocessing as a transformers ``preprocessor_config.json``."""
        size: dict[str, int] = (
            {"shortest_edge": self.shortest_edge}
            if self.shortest_edge is not None
            else {"height": self.resize_to[0], "width": self.resize_to[1]}  # type: ignore[index]
        )
        out: dict[str, Any] = {
            "do_resize": True,
            "size": size,
            "resample": _PIL_RESAMPLE[self.resample],
            "do_center_crop": self.crop is not None,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.crop is not None:
            out["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return out

    @classmethod
    def from_processor_config(
        cls, config: Mapping[str, Any], *, image_size: int, patch_size: int, prefix_names: tuple[str, ...]
    ) -> ImageSpec:
        """Read a transformers ``preprocessor_config.json`` (CLIP, ViT and DeiT processors)."""
        size = config.get("size", image_size)
        shortest: int | None = None
        exact: tuple[int, int] | None = None
        if isinstance(size, int):
            exact = (size, size)
        elif isinstance(size, Mapping) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, Mapping) and {"height", "width"} <= set(size):
            exact = (int(size["height"]), int(size["width"]))
        else:
            raise ConfigError(
                f"preprocessor size {size!r} is not understood; give shortest_edge or height/width"
            )
        crop: tuple[int, int] | None = None
        if config.get("do_center_crop", False):
            c = config.get("crop_size", image_size)
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        codes = {v: k for k, v in _PIL_RESAMPLE.items()}
        resample = cast(Resample, codes.get(int(config.get("resample", 3)), "bicubic"))
        mean = cast(RGB, tuple(float(x) for x in config.get("image_mean", (0.5, 0.5, 0.5))))
        std = cast(RGB, tuple(float(x) for x in config.get("image_std", (0.5, 0.5, 0.5))))
        if not config.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            n_prefix=len(prefix_names),
            prefix_names=prefix_names,
            mean=mean,
            std=std,
            shortest_edge=shortest,
            resize_to=exact,
            crop=crop,
            resample=resample,
        )


CLIP_IMAGE = ImageSpec(
    image_size=224,
    patch_size=16,
    n_prefix=1,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    shortest_edge=224,
    crop=(224, 224),
    resample="bicubic",
)
"""CLIP ViT-B/16's preprocessing: shortest side to 224 (bicubic), centre crop 224, CLIP mean/std."""


def _as_uint8_images(images: Any) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            items: list[Any] = [images]
        elif images.ndim == 4:
            items = list(images)
        else:
            raise ConfigError(
                f"an image array must be [H, W, 3] or a stack [N, H, W, 3], got shape {images.shape}; "
                "for a grayscale image use np.stack([img] * 3, axis=-1)"
            )
    elif isinstance(images, Sequence) and not isinstance(images, str | bytes):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ConfigError("no images given; pass at least one uint8 RGB array [H, W, 3]")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, np.ndarray) and hasattr(item, "convert") and hasattr(item, "size"):
            item = np.asarray(item.convert("RGB"))  # a PIL image
        if not isinstance(item, np.ndarray):
            raise ConfigError(f"image {i} is a {type(item).__name__}; pass uint8 RGB numpy arrays [H, W, 3]")
        if item.ndim != 3 or item.shape[2] != 3:
            fix = (
                "drop the alpha channel with img[..., :3]"
                if item.ndim == 3 and item.shape[2] == 4
                else "for a grayscale image use np.stack([img] * 3, axis=-1)"
            )
            raise ConfigError(f"image {i} has shape {item.shape}, not [H, W, 3] RGB; {fix}")
        if item.dtype != np.uint8:
            raise ConfigError(
                f"image {i} is {item.dtype}, not uint8; convert floats in [0, 1] with "
                "(img * 255).round().clip(0, 255).astype(np.uint8)"
            )
        if min(item.shape[:2]) < 1:
            raise ConfigError(f"image {i} is empty ({item.shape})")
        out.append(np.ascontiguousarray(item))
    return out
