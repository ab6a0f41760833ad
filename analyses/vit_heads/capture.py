"""The capture pass of the vit-heads analysis: one forward over every image that keeps the
embeddings, and for the attention images the attention statistics, residual norms (artifact
tokens) and pattern maps; for the train images the mean head outputs of mean ablation.
See docs/analyses/vit-heads.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analyses.vit_heads import attention as va
from analyses.vit_heads import patterns as vp
from analyses.vit_heads.config import VitHeadsConfig
from analyses.vit_heads.data import patch_grid
from probe import vision
from probe.errors import ConfigError
from probe.loading import LoadedModel


@dataclass
class Capture:
    embeddings: torch.Tensor  # [N, D] for every image of the pass
    means: dict[int, torch.Tensor] | None
    offset: np.ndarray  # [L, H, 2r-1, 2c-1] mean over attention images
    mad: np.ndarray  # [L, H]
    patch_share: np.ndarray  # [L, H]
    alpha0: np.ndarray  # [n_att, L, H]
    alpha_prefix: np.ndarray  # [n_att, L, H]
    alpha_artifacts: np.ndarray  # [n_att, L, H], NaN where the layer has no artifact token
    norms: np.ndarray  # [n_att, L + 1, T]
    maps: np.ndarray  # [M, 2r-1, 2c-1]
    map_head: np.ndarray  # [M] layer·H + head
    map_query: np.ndarray  # [M]
    map_image: np.ndarray  # [M]


def artifact_mask(norms: np.ndarray, n_prefix: int, ratio: float) -> np.ndarray:
    """``[..., T]`` bool: patch tokens whose norm exceeds ``ratio`` × the median patch norm (prefix never)."""
    patch = norms[..., n_prefix:]
    median = np.median(patch, axis=-1, keepdims=True)
    out = np.zeros(norms.shape, dtype=bool)
    out[..., n_prefix:] = patch > ratio * median
    return out


def _chunks(att: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of image rows: the attention images first, in smaller batches (all patterns of a
    batch are held at once), then the others."""
    att_batch = max(1, min(batch_size, 8))
    order = np.concatenate([np.flatnonzero(att), np.flatnonzero(~att)])
    chunks: list[np.ndarray] = []
    att_part, rest = order[: att.sum()], order[att.sum() :]
    chunks += [att_part[i : i + att_batch] for i in range(0, len(att_part), att_batch)]
    chunks += [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return chunks


class _Sums:
    """What the capture pass adds up, batch by batch."""

    def __init__(
        self,
        model: LoadedModel,
        n_images: int,
        att_rows: np.ndarray,
        cfg: VitHeadsConfig,
        queries: np.ndarray,
    ) -> None:
        L, H = model.n_layers, model.n_heads
        self.model, self.cfg, self.queries = model, cfg, queries
        self.grid = patch_grid(model)
        self.n_prefix = int(model.extra["n_prefix"])
        gr, gc = self.grid
        self.embeddings = torch.zeros(n_images, int(model.extra["embedding_dim"]))
        self.sums = {
            layer: torch.zeros(model.n_ctx, H, model.d_head, dtype=torch.float64) for layer in range(L)
        }
        self.n_train = 0
        self.offset = np.zeros((L, H, 2 * gr - 1, 2 * gc - 1))
        self.mad = np.zeros((L, H))
        self.share = np.zeros((L, H))
        self.n_att = len(att_rows)
        self.att_pos = {int(r): i for i, r in enumerate(att_rows)}
        self.alpha0 = np.full((self.n_att, L, H), np.nan)
        self.alpha_prefix = np.full((self.n_att, L, H), np.nan)
        self.alpha_art = np.full((self.n_att, L, H), np.nan)
        self.norms = np.zeros((self.n_att, L + 1, model.n_ctx))
        self.maps: list[np.ndarray] = []
        self.map_head: list[np.ndarray] = []
        self.map_query: list[np.ndarray] = []
        self.map_image: list[np.ndarray] = []

    def add_train(self, cap: vision.VisionCapture, is_train: np.ndarray) -> None:
        """Sum the train images' head outputs (for the mean of mean ablation)."""
        for layer in range(self.model.n_layers):
            self.sums[layer] += cap.head_outputs[layer][torch.as_tensor(is_train)].double().sum(0)
        self.n_train += int(is_train.sum())

    def add_attention(self, cap: vision.VisionCapture, chunk: np.ndarray, is_att: np.ndarray) -> None:
        """Add the attention images of a batch: norms, artifact tokens, every layer's statistics."""
        sel = np.flatnonzero(is_att)
        positions = [self.att_pos[int(chunk[i])] for i in sel]
        assert cap.resid_norms is not None
        norms = cap.resid_norms[sel].numpy().astype(np.float64)  # [b, L+1, T]
        self.norms[positions] = norms
        art = artifact_mask(norms, self.n_prefix, self.cfg.artifact_ratio)  # [b, L+1, T]
        for layer in range(self.model.n_layers):
            p = cap.patterns[layer][sel].numpy()  # [b, H, T, T]
            self._add_layer(layer, p, positions, art[:, layer])  # resid_pre of this layer

    def _add_layer(self, layer: int, p: np.ndarray, positions: list[int], mask: np.ndarray) -> None:
        grid, n_prefix = self.grid, self.n_prefix
        b = p.shape[0]
        self.offset[layer] += va.offset_maps(p, grid, n_prefix) * b
        self.mad[layer] += va.mean_attention_distance(p, grid, n_prefix) * b
        self.share[layer] += va.patch_attention_share(p, grid, n_prefix) * b
        received = p.mean(axis=2, dtype=np.float64)  # [b, H, T]: mean attention from all queries
        self.alpha0[positions, layer] = received[:, :, 0]
        self.alpha_prefix[positions, layer] = received[:, :, :n_prefix].sum(-1)
        on_art = (received * mask[:, None, :]).sum(-1)
        self.alpha_art[positions, layer] = np.where(np.any(mask, axis=-1)[:, None], on_art, np.nan)
        for j, pos in enumerate(positions):
            if pos >= self.cfg.pattern_images:
                continue
            m, h, q = vp.pattern_maps(p[j : j + 1], grid, n_prefix, queries=self.queries)
            self.maps.append(m)
            self.map_head.append(layer * self.model.n_heads + h)
            self.map_query.append(q)
            self.map_image.append(np.full(len(h), pos, dtype=np.int64))

    def finish(self, want_means: bool) -> Capture:
        means = None
        if want_means:
            if self.n_train == 0:
                raise ConfigError(
                    "mean ablation needs train images for the mean head outputs; use ablation='zero'"
                )
            means = {layer: (s / self.n_train).to(self.model.dtype) for layer, s in self.sums.items()}
        gr, gc = self.grid
        cells = (2 * gr - 1, 2 * gc - 1)
        n_att = max(self.n_att, 1)
        return Capture(
            embeddings=self.embeddings,
            means=means,
            offset=self.offset / n_att,
            mad=self.mad / n_att,
            patch_share=self.share / n_att,
            alpha0=self.alpha0,
            alpha_prefix=self.alpha_prefix,
            alpha_artifacts=self.alpha_art,
            norms=self.norms,
            maps=np.concatenate(self.maps) if self.maps else np.zeros((0, *cells), dtype=np.float32),
            map_head=np.concatenate(self.map_head) if self.map_head else np.zeros(0, dtype=np.int64),
            map_query=np.concatenate(self.map_query) if self.map_query else np.zeros(0, dtype=np.int64),
            map_image=np.concatenate(self.map_image) if self.map_image else np.zeros(0, dtype=np.int64),
        )


def capture_pass(
    model: LoadedModel,
    pixels: torch.Tensor,
    att_rows: np.ndarray,
    train_rows: np.ndarray,
    cfg: VitHeadsConfig,
    queries: np.ndarray,
) -> Capture:
    """One pass over every image: embeddings; for the attention images the attention statistics,
    residual norms and pattern maps; for the train images the mean head outputs (mean ablation).

    Patterns are reduced batch by batch (never all images' ``[L, H, T, T]`` at once)."""
    from tqdm.auto import tqdm

    n_images = int(pixels.shape[0])
    att = np.zeros(n_images, dtype=bool)
    att[att_rows] = True
    train = np.zeros(n_images, dtype=bool)
    train[train_rows] = True
    want_means = cfg.ablation == "mean"
    sums = _Sums(model, n_images, att_rows, cfg, queries)
    bar = tqdm(
        _chunks(att, cfg.batch_size), desc="capture", unit="batch", disable=not cfg.progress, leave=False
    )
    for chunk in bar:
        is_att = att[chunk]
        is_train = train[chunk]
        cap = vision.capture(
            model,
            pixels[chunk],
            patterns="all" if is_att.any() else None,
            head_outputs="all" if want_means and is_train.any() else None,
            residual=bool(is_att.any()),
            batch_size=len(chunk),
        )
        sums.embeddings[chunk] = cap.embedding
        if want_means and is_train.any():
            sums.add_train(cap, is_train)
        if is_att.any():
            sums.add_attention(cap, chunk, is_att)
    bar.close()
    return sums.finish(want_means)
