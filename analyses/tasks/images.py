"""Real photographs and scans that are on every machine: the sample images shipped inside the
scikit-image, matplotlib and scikit-learn wheels, read straight from disk (never downloaded).

:func:`load_images` takes ``"all"``, a subset of :data:`SUBSETS` (``"natural"``, ``"faces"``, …)
or image names and returns :class:`ImageRecord` objects (RGB ``uint8`` pixels, kind, subject, face
label) in catalogue order; :func:`image_names` lists names without decoding.
See docs/analyses/vit-heads.md (the image sets).
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from probe.errors import ConfigError, MissingPackageError

if TYPE_CHECKING:
    import pandas as pd

Kind = Literal["natural", "scientific", "texture", "document", "face", "non_face"]
Source = Literal["scikit-image", "matplotlib", "scikit-learn"]
Subset = Literal[
    "all",
    "full_size",
    "natural",
    "scientific",
    "textures",
    "documents",
    "faces",
    "non_faces",
    "lfw",
    "scikit-image",
    "matplotlib",
    "scikit-learn",
]

KINDS: tuple[Kind, ...] = get_args(Kind)
SOURCES: tuple[Source, ...] = get_args(Source)
SUBSETS: tuple[Subset, ...] = get_args(Subset)

# Where each source package keeps its images: (import name, folder inside the package, pip command).
_PACKAGES: dict[Source, tuple[str, str, str]] = {
    "scikit-image": ("skimage", "data", "pip install scikit-image"),
    "matplotlib": ("matplotlib", "mpl-data/sample_data", "pip install matplotlib"),
    "scikit-learn": ("sklearn", "datasets/images", "pip install scikit-learn"),
}

LFW_FILE = "lfw_subset.npy"
LFW_FACES = 100  # the first 100 crops of lfw_subset.npy are faces, the next 100 non-faces
LFW_NON_FACES = 100
LFW_SIZE = 25


@dataclass(frozen=True)
class ImageSpec:
    """One full-size image of the catalogue, before decoding: where it is and what it shows."""

    name: str
    source: Source
    file: str  # file name inside the source package's image folder
    kind: Kind
    subject: str
    has_face: bool


CATALOGUE: tuple[ImageSpec, ...] = (
    ImageSpec(
        "astronaut", "scikit-image", "astronaut.png", "natural", "an astronaut in an orange spacesuit", True
    ),
    ImageSpec("camera", "scikit-image", "camera.png", "natural", "a man with a camera on a tripod", True),
    ImageSpec("chelsea", "scikit-image", "chelsea.png", "natural", "a tabby cat", False),
    ImageSpec("coffee", "scikit-image", "coffee.png", "natural", "a cup of coffee on a saucer", False),
    ImageSpec("coins", "scikit-image", "coins.png", "natural", "old coins on a dark background", False),
    ImageSpec("rocket", "scikit-image", "rocket.jpg", "natural", "a rocket on its launch pad at dusk", False),
    ImageSpec(
        "motorcycle", "scikit-image", "motorcycle_left.png", "natural", "a red motorcycle in a garage", False
    ),
    ImageSpec(
        "hubble_deep_field",
        "scikit-image",
        "hubble_deep_field.jpg",
        "scientific",
        "galaxies in deep space",
        False,
    ),
    ImageSpec("retina", "scikit-image", "retina.jpg", "scientific", "the retina of a human eye", False),
    ImageSpec("moon", "scikit-image", "moon.png", "scientific", "the cratered surface of the moon", False),
    ImageSpec("cell", "scikit-image", "cell.png", "scientific", "a cell under a microscope", False),
    ImageSpec(
        "ihc", "scikit-image", "ihc.png", "scientific", "a stained tissue section under a microscope", False
    ),
    ImageSpec("brick", "scikit-image", "brick.png", "texture", "a brick wall", False),
    ImageSpec("grass", "scikit-image", "grass.png", "texture", "grass", False),
    ImageSpec("gravel", "scikit-image", "gravel.png", "texture", "gravel", False),
    ImageSpec("text", "scikit-image", "text.png", "document", "handwritten equations on paper", False),
    ImageSpec("page", "scikit-image", "page.png", "document", "a scanned page of printed text", False),
    ImageSpec(
        "grace_hopper",
        "matplotlib",
        "grace_hopper.jpg",
        "natural",
        "a portrait of a woman in a naval uniform",
        True,
    ),
    ImageSpec("china", "scikit-learn", "china.jpg", "natural", "a Chinese temple above a lake", False),
    ImageSpec("flower", "scikit-learn", "flower.jpg", "natural", "an orange dahlia flower", False),
)

LFW_NAMES: tuple[str, ...] = tuple(f"lfw_face_{i:03d}" for i in range(LFW_FACES)) + tuple(
    f"lfw_non_face_{i:03d}" for i in range(LFW_NON_FACES)
)
ALL_NAMES: tuple[str, ...] = tuple(spec.name for spec in CATALOGUE) + LFW_NAMES


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its labels; ``pixels`` is RGB ``uint8`` ``[H, W, 3]``, read-only and shared.

    ``has_face`` is whether a human face is shown (for the LFW crops, the data set's own label);
    ``grayscale`` whether the file had one channel (then the three channels are equal).
    """

    name: str
    source: Source
    kind: Kind
    subject: str
    has_face: bool
    grayscale: bool
    pixels: np.ndarray

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


# ---------------------------------------------------------------------------------------- files


def package_dir(source: Source) -> Path:
    """The image folder inside ``source``'s installed package, found without importing it."""
    module, folder, pip = _PACKAGES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"{source} (its bundled images are part of the image set)", pip)
    return Path(next(iter(spec.submodule_search_locations))) / folder


def image_path(source: Source, file: str) -> Path:
    """The path of one bundled file; raises when the package was installed without it."""
    path = package_dir(source) / file
    if not path.is_file():
        pip = _PACKAGES[source][2].replace("pip install", "pip install --force-reinstall")
        raise MissingPackageError(f"{source}'s bundled {file} (expected at {path})", pip)
    return path


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    out = np.ascontiguousarray(array, dtype=np.uint8)
    out.setflags(write=False)
    return out


@cache
def _decode(source: Source, file: str) -> tuple[np.ndarray, bool]:
    """Pixels of one image file as read-only RGB uint8 and whether the file was grayscale."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingPackageError(
            "pillow (needed to decode the bundled images)", "pip install pillow"
        ) from None
    with Image.open(image_path(source, file)) as im:
        gray = im.mode in ("L", "I", "I;16", "F", "1")
        pixels = np.asarray(im.convert("L") if gray else im.convert("RGB"))
    return _rgb(pixels), gray


@cache
def _lfw() -> np.ndarray:
    """The 200 LFW crops as read-only uint8 ``[200, 25, 25, 3]``, checked against what the file claims."""
    crops = np.load(image_path("scikit-image", LFW_FILE))
    expected = (LFW_FACES + LFW_NON_FACES, LFW_SIZE, LFW_SIZE)
    if crops.shape != expected:
        raise MissingPackageError(
            f"scikit-image's {LFW_FILE} in the layout this module reads ({expected}; found {crops.shape})",
            "pip install --force-reinstall scikit-image",
        )
    if crops.dtype != np.uint8:  # stored as floats in [0, 1]
        crops = np.round(np.clip(crops, 0.0, 1.0) * 255.0)
    return _rgb(np.repeat(crops[..., None], 3, axis=3))


# ---------------------------------------------------------------------------------------- records


_BY_NAME: dict[str, ImageSpec] = {spec.name: spec for spec in CATALOGUE}


def load_image(name: str) -> ImageRecord:
    """One image by name: a :data:`CATALOGUE` name or an LFW crop (``lfw_face_007``, ``lfw_non_face_042``)."""
    spec = _BY_NAME.get(name)
    if spec is not None:
        pixels, gray = _decode(spec.source, spec.file)
        return ImageRecord(spec.name, spec.source, spec.kind, spec.subject, spec.has_face, gray, pixels)
    if name in LFW_NAMES:
        index = LFW_NAMES.index(name)
        face = index < LFW_FACES
        subject = "a face" if face else "a patch of background"
        return ImageRecord(
            name, "scikit-image", "face" if face else "non_face", subject, face, True, _lfw()[index]
        )
    close = difflib.get_close_matches(name, ALL_NAMES, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"unknown image {name!r}.{hint} Use a name from images.image_names() (e.g. 'astronaut', "
        f"'lfw_face_000') or a subset: {', '.join(SUBSETS)}"
    )


_SUBSET_KINDS: dict[str, Kind] = {
    "natural": "natural",
    "scientific": "scientific",
    "textures": "texture",
    "documents": "document",
    "faces": "face",
    "non_faces": "non_face",
}


def _in_subset(name: str, subset: str) -> bool:
    spec = _BY_NAME.get(name)
    if subset == "all":
        return True
    if subset in ("full_size", "lfw"):
        return (spec is not None) == (subset == "full_size")
    if subset in SOURCES:
        return (spec.source if spec is not None else "scikit-image") == subset
    kind = spec.kind if spec is not None else ("face" if name.startswith("lfw_face_") else "non_face")
    return kind == _SUBSET_KINDS[subset]


def image_names(subset: Subset | str = "all") -> tuple[str, ...]:
    """The names in ``subset`` (see :data:`SUBSETS`) in catalogue order, without decoding anything."""
    if subset not in SUBSETS:
        raise ConfigError(
            f"unknown image subset {subset!r}; choose one of {', '.join(SUBSETS)}, or pass a list of "
            "image names to load_images"
        )
    return tuple(n for n in ALL_NAMES if _in_subset(n, subset))


def load_images(subset: Subset | str | Sequence[str] = "all") -> tuple[ImageRecord, ...]:
    """The images of a subset (``"all"``, ``"natural"``, ``"faces"``, … see :data:`SUBSETS`) or of a
    sequence of names, in catalogue order (the order of ``ALL_NAMES``), each at most once.

    Raises :class:`~probe.errors.ConfigError` for an unknown subset or name and
    :class:`~probe.errors.MissingPackageError` when a source package is not installed.
    """
    if isinstance(subset, str):
        names = image_names(subset)
    else:
        wanted = list(subset)
        if not wanted:
            raise ConfigError("no image names given; pass a subset name such as 'all' or at least one name")
        for name in wanted:
            if name not in ALL_NAMES:
                load_image(name)  # raises with a suggestion
        chosen = set(wanted)
        names = tuple(n for n in ALL_NAMES if n in chosen)
    return tuple(load_image(n) for n in names)


def image_table(records: Sequence[ImageRecord]) -> pd.DataFrame:
    """One row per image: ``name, source, kind, subject, has_face, grayscale, height, width``."""
    import pandas as pd

    rows = [
        {
            "name": r.name,
            "source": r.source,
            "kind": r.kind,
            "subject": r.subject,
            "has_face": r.has_face,
            "grayscale": r.grayscale,
            "height": r.height,
            "width": r.width,
        }
        for r in records
    ]
    return pd.DataFrame(
        rows, columns=["name", "source", "kind", "subject", "has_face", "grayscale", "height", "width"]
    )


__all__ = [
    "ALL_NAMES",
    "CATALOGUE",
    "KINDS",
    "LFW_NAMES",
    "SOURCES",
    "SUBSETS",
    "ImageRecord",
    "ImageSpec",
    "image_names",
    "image_path",
    "image_table",
    "load_image",
    "load_images",
    "package_dir",
]
