"""Display patterns of the vit-heads analysis: the model-input crops of a few images and every
head's attention from the CLS query and a sub-grid of query patches, stored with the run for the
dashboard's overlay, and the readers of them. See docs/analyses/vit-heads.md (display patterns)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from analyses.base import AnalysisResult
from analyses.runstore import Run
from analyses.vit_heads.config import VitHeadsConfig
from analyses.vit_heads.data import ImageSet, patch_grid
from probe import vision
from probe.errors import ConfigError
from probe.loading import LoadedModel

DISPLAY_ARRAYS: tuple[str, ...] = ("display_images", "display_attention", "display_queries")
DISPLAY_HINT = "this run has no stored display patterns; re-run headlab run vit-heads"
"""What a reader says of a run saved before display patterns were stored (or with ``n_display=0``)."""


def display_query_grid(grid: tuple[int, int], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the stored query patches: every ``stride``-th of each, aligned so that
    the centre patch ``(rows // 2, cols // 2)`` is one of them."""
    if stride < 1:
        raise ConfigError(f"display_stride must be >= 1 (got {stride})")
    rows, cols = grid
    return np.arange((rows // 2) % stride, rows, stride), np.arange((cols // 2) % stride, cols, stride)


def input_crops(model: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    """The images the model received, ``uint8 [n, S, S, 3]``: ``pixels`` (``model.preprocess``'s output,
    after the model's own resize, crop and normalisation) un-normalised and rounded. Exact for pixels
    made by ``model.preprocess``, which scales uint8 values by 1/255 before normalising."""
    spec = model.image
    if spec is None:
        raise ConfigError(
            f"{model.name} is not a vision model; input_crops needs its ImageSpec (model.image)"
        )
    mean = torch.as_tensor(spec.mean, dtype=torch.float64)[:, None, None]
    std = torch.as_tensor(spec.std, dtype=torch.float64)[:, None, None]
    scaled = (pixels.detach().double().cpu() * std + mean) * 255.0
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def capture_display(
    model: LoadedModel, pixels: torch.Tensor, stride: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One eager forward over ``pixels [n, 3, S, S]``: ``(crops, attention, queries)``.

    ``crops``: :func:`input_crops`; ``attention``: ``float16 [n, L, H, Q, T]``, the post-softmax row
    of each stored query over all ``T`` keys (prefix tokens first, so a row sums to 1);
    ``queries``: ``int64 [Q, 3]`` (token, row, col) of each stored query: the prefix tokens (row and
    col ``-1``), then the patches of :func:`display_query_grid` in row-major order.
    """
    grid = patch_grid(model)
    n_prefix = int(model.extra["n_prefix"])
    rows, cols = display_query_grid(grid, stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    patch_tokens = n_prefix + rr.ravel() * grid[1] + cc.ravel()
    queries = np.concatenate(
        [
            np.stack([np.arange(n_prefix), np.full(n_prefix, -1), np.full(n_prefix, -1)], axis=1),
            np.stack([patch_tokens, rr.ravel(), cc.ravel()], axis=1),
        ]
    ).astype(np.int64)
    n = int(pixels.shape[0])
    attention = np.zeros((n, model.n_layers, model.n_heads, len(queries), model.n_ctx), dtype=np.float16)
    if n:
        cap = vision.capture(model, pixels, patterns="all", batch_size=n)
        index = torch.as_tensor(queries[:, 0])
        for layer in range(model.n_layers):
            attention[:, layer] = cap.patterns[layer][:, :, index].numpy().astype(np.float16)
    return input_crops(model, pixels), attention, queries


def display_rows(labels: Sequence[str], att_rows: np.ndarray, n_display: int) -> list[int]:
    """Rows of the display images: round robin over the natural attention images (label
    ``"attention"``), the scenes and the faces, so that two are one photograph and one scene."""
    pools = [[int(r) for r in att_rows if labels[int(r)] == "attention"]]
    pools += [[i for i, x in enumerate(labels) if x == kind] for kind in ("scenes", "faces")]
    out: list[int] = []
    for group in itertools.zip_longest(*pools):
        for row in group:
            if row is not None and row not in out and len(out) < n_display:
                out.append(row)
    return out


@dataclass(frozen=True)
class DisplayImage:
    """A display image of a run: its index in the display arrays, name, source and ``uint8 [S, S, 3]``
    model-input crop."""

    index: int
    name: str
    source: str
    pixels: np.ndarray


@dataclass(frozen=True)
class DisplayPattern:
    """One head's attention from one stored query of a display image.

    ``query`` is the query patch (row, col), or None for the CLS query; ``snapped`` says it is the
    stored query nearest to the asked one. ``patches [rows, cols]`` is the attention to each key
    patch, ``prefix [n_prefix]`` to the prefix tokens (CLS first); together they sum to 1.
    """

    image: int
    layer: int
    head: int
    query: tuple[int, int] | None
    token: int
    patches: np.ndarray
    prefix: np.ndarray
    snapped: bool = False

    @property
    def cls(self) -> float:
        """Attention to CLS."""
        return float(self.prefix[0])


DisplaySource = AnalysisResult | Run


def has_display(source: DisplaySource) -> bool:
    """Whether the run (or unsaved result) stores display images and patterns."""
    return "display" in source.table_names and set(DISPLAY_ARRAYS) <= set(source.array_names)


def _require_display(source: DisplaySource) -> pd.DataFrame:
    if not has_display(source):
        raise ConfigError(DISPLAY_HINT)
    return source.table("display")


def display_images(source: DisplaySource) -> list[DisplayImage]:
    """The run's display images (ConfigError with :data:`DISPLAY_HINT` when it has none)."""
    table = _require_display(source)
    crops = source.array("display_images")
    return [
        DisplayImage(int(r.image), str(r.name), str(r.source), crops[int(r.image)])
        for r in table.itertuples(index=False)
    ]


def display_geometry(source: DisplaySource) -> dict[str, Any]:
    """``grid`` (rows, cols), ``n_prefix``, ``patch_size`` (pixels of the crop), ``stride`` and
    ``queries`` (the stored query patches, (row, col) each) of the display patterns."""
    return _geometry(_require_display(source), source.array("display_queries"))


def _geometry(table: pd.DataFrame, queries: np.ndarray) -> dict[str, Any]:
    first = table.iloc[0]
    return {
        "grid": (int(first["grid_rows"]), int(first["grid_cols"])),
        "n_prefix": int(first["n_prefix"]),
        "patch_size": int(first["patch_size"]),
        "stride": int(first["stride"]),
        "queries": [(int(r), int(c)) for _, r, c in queries if r >= 0],
    }


def display_pattern(
    source: DisplaySource,
    image: int,
    layer: int,
    head: int,
    query: tuple[int, int] | Literal["cls"] | None = None,
    *,
    snap: bool = False,
) -> DisplayPattern:
    """Head ``(layer, head)``'s attention on display image ``image`` from query patch ``query``
    ((row, col); ``"cls"``: the CLS query; None: the centre patch). A patch that was not stored (see
    ``display_stride``) is an error, or with ``snap`` the nearest stored patch is used."""
    table = _require_display(source)
    queries = source.array("display_queries")
    geometry = _geometry(table, queries)
    rows, cols = geometry["grid"]
    n_prefix = geometry["n_prefix"]
    if int(image) not in set(table["image"].astype(int)):
        raise ConfigError(f"no display image {image}; the run has {', '.join(map(str, table['image']))}")
    attention = source.array("display_attention")
    n_layers, n_heads = attention.shape[1:3]
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise ConfigError(f"no head ({layer}, {head}): the run has {n_layers} layers × {n_heads} heads")
    snapped = False
    if isinstance(query, str):
        if query != "cls":
            raise ConfigError(f"query is a patch (row, col), 'cls' or None, got {query!r}")
        index, where = 0, None
    else:
        wanted = (rows // 2, cols // 2) if query is None else (int(query[0]), int(query[1]))
        stored = geometry["queries"]
        if wanted in stored:
            where = wanted
        elif snap:
            where = min(stored, key=lambda rc: ((rc[0] - wanted[0]) ** 2 + (rc[1] - wanted[1]) ** 2, rc))
            snapped = True
        else:
            raise ConfigError(
                f"query patch {wanted} is not stored (stride {geometry['stride']}: rows "
                f"{sorted({r for r, _ in stored})}, cols {sorted({c for _, c in stored})}); pass snap=True "
                "for the nearest, or re-run with display_stride=1"
            )
        index = n_prefix + stored.index(where)
    row = attention[int(image), layer, head, index].astype(np.float32)
    return DisplayPattern(
        image=int(image),
        layer=int(layer),
        head=int(head),
        query=where,
        token=int(queries[index, 0]),
        patches=row[n_prefix:].reshape(rows, cols),
        prefix=row[:n_prefix],
        snapped=snapped,
    )


def display_attention(
    source: DisplaySource,
    image: int,
    layer: int,
    head: int,
    query: tuple[int, int] | Literal["cls"] | None = None,
) -> np.ndarray:
    """``float32 [rows, cols]``: the attention of :func:`display_pattern` to each key patch."""
    return display_pattern(source, image, layer, head, query).patches


def display_step(
    model: LoadedModel, images: ImageSet, cfg: VitHeadsConfig
) -> tuple[dict[str, np.ndarray], pd.DataFrame | None, list[int]]:
    """The run's display images: ``(display arrays, the display table or None, their rows)``."""
    grid = patch_grid(model)
    row_sources = images.row_sources
    rows = display_rows(row_sources, images.att_rows, cfg.n_display)
    if not rows:
        return {}, None, rows
    crops, attention, queries = capture_display(model, images.pixels[rows], cfg.display_stride)
    arrays = {"display_images": crops, "display_attention": attention, "display_queries": queries}
    frame = pd.DataFrame(
        {
            "image": np.arange(len(rows)),
            "name": [images.all_names[r] for r in rows],
            "source": [
                cfg.attention_images if row_sources[r] == "attention" else row_sources[r] for r in rows
            ],
            "images_row": rows,
            "grid_rows": grid[0],
            "grid_cols": grid[1],
            "n_prefix": int(model.extra["n_prefix"]),
            "patch_size": crops.shape[1] // grid[0],
            "stride": cfg.display_stride,
        }
    )
    return arrays, frame, rows
