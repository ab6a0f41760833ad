"""VHD and T-VHD: the distance between each head's output with and without the image at every step
of a caption (teacher forced), T-VHD of the generated tokens, and the test of T-VHD of hallucinated
against correct object words.

See docs/analyses/vhd.md for the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyses.tasks import scenes as sc
from analyses.vhd.forward import Rows, forward_rows, o_proj_hooks
from probe.errors import CaptureError, ConfigError
from probe.loading import LoadedModel


def step_vhd(model: LoadedModel, rows: Rows, n_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VHD ``[B, n_steps, layers, heads]`` between the image rows and their text-only twins at the
    positions that produce answer tokens ``0..n_steps-1``, the text-only output norms there, and the
    image rows' logits there ``[B, n_steps, vocab]`` (their argmax is the greedy next token)."""
    b = rows.n_image_rows
    if rows.ids.shape[0] != 2 * b:
        raise ConfigError("step_vhd needs image rows and their text-only twins (make_rows(text_twin=True))")
    span = slice(rows.width - 1, rows.width - 1 + n_steps)
    vhd = torch.zeros(b, n_steps, model.n_layers, model.n_heads)
    norm = torch.zeros_like(vhd)
    fired: set[int] = set()

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0][:, span].float()
            z = z.reshape(*z.shape[:-1], model.n_heads, -1)
            vhd[:, :, layer] = torch.linalg.vector_norm(z[:b] - z[b:], dim=-1).cpu()
            norm[:, :, layer] = torch.linalg.vector_norm(z[b:], dim=-1).cpu()
            fired.add(layer)

        return hook

    with o_proj_hooks(model, hook_for):
        logits = forward_rows(model, rows, read=list(range(span.start, span.stop)))
    if len(fired) != model.n_layers:
        raise CaptureError(
            f"o_proj hooks of layers {sorted(set(range(model.n_layers)) - fired)[:5]} never fired"
        )
    return vhd, norm, logits[:b].cpu()


def t_vhd(vhd: np.ndarray, top_k: int) -> np.ndarray:
    """T-VHD ``[..., steps]``: per step, the sum over layers of the ``top_k`` largest VHD of the layer
    (``vhd``: ``[..., steps, layers, heads]``; NaN steps stay NaN)."""
    k = min(top_k, vhd.shape[-1])
    top = -np.sort(-vhd, axis=-1)[..., :k]
    return top.sum(axis=(-1, -2))


TOKEN_COLUMNS = ["scene", "step", "token", "token_id", "t_vhd", "object", "word", "shape", "hallucinated"]


def token_table(
    model: LoadedModel, scene: sc.Scene, tokens: Sequence[int], t: np.ndarray, index: int
) -> pd.DataFrame:
    """One row per generated token of a caption: text, T-VHD, the object word it starts (if any)."""
    tok = model.tokenizer
    full = tok.decode(list(tokens), skip_special_tokens=True)
    offsets = [len(tok.decode(list(tokens[:i]), skip_special_tokens=True)) for i in range(len(tokens) + 1)]
    starts: dict[int, sc.Mention] = {}
    for mention in sc.find_objects(full):
        step = next((i for i in range(len(tokens)) if offsets[i] <= mention.start < offsets[i + 1]), None)
        if step is not None and step not in starts:
            starts[step] = mention
    present = set(scene.classes)
    rows = []
    for i, token in enumerate(tokens):
        m = starts.get(i)
        rows.append(
            {
                "scene": index,
                "step": i,
                "token": full[offsets[i] : offsets[i + 1]],
                "token_id": int(token),
                "t_vhd": float(t[i]),
                "object": m is not None,
                "word": m.text if m else "",
                "shape": m.shape if m else "",
                "hallucinated": bool(m is not None and m.shape not in present),
            }
        )
    return pd.DataFrame(rows, columns=TOKEN_COLUMNS)


def tvhd_test(words: pd.DataFrame) -> pd.DataFrame:
    """Hallucinated vs correct object words: counts, means, medians, Mann–Whitney U (two-sided) and the
    AUROC of T-VHD for telling a correct word from a hallucinated one (0.5: no signal)."""
    from scipy.stats import mannwhitneyu

    h = words.loc[words["hallucinated"], "t_vhd"].to_numpy(float)
    c = words.loc[~words["hallucinated"], "t_vhd"].to_numpy(float)
    row: dict[str, Any] = {
        "n_hallucinated": len(h),
        "n_correct": len(c),
        "mean_hallucinated": float(h.mean()) if len(h) else math.nan,
        "mean_correct": float(c.mean()) if len(c) else math.nan,
        "median_hallucinated": float(np.median(h)) if len(h) else math.nan,
        "median_correct": float(np.median(c)) if len(c) else math.nan,
        "u": math.nan,
        "p_value": math.nan,
        "auroc_correct": math.nan,
    }
    if len(h) and len(c):
        test = mannwhitneyu(c, h, alternative="two-sided")
        row.update(
            u=float(test.statistic),
            p_value=float(test.pvalue),
            auroc_correct=float(test.statistic) / (len(h) * len(c)),
        )
    return pd.DataFrame([row])
