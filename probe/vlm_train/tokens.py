"""Training examples as token rows (prompt, answer, end of turn) and right-padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from probe import vlm
from probe.errors import ConfigError, HeadlabError
from probe.model import LoadedModel
from probe.vlm_train.config import TrainExample


@dataclass
class _Tokens:
    ids: list[list[int]]  # prompt (BOS policy applied, image tokens expanded) + answer + end of turn
    n_prompt: list[int]
    images: list[int]


def _tokenize(model: LoadedModel, examples: Sequence[TrainExample], n_images: int) -> _Tokens:
    tok = model.tokenizer
    end = tok.eos_token_id
    if end is None:
        raise HeadlabError(f"{model.name}'s tokenizer has no end-of-sequence token to end answers with")
    prefix = [model.bos.token_id] if model.bos.prepend and model.bos.token_id is not None else []
    prompts: dict[str, list[int]] = {}
    out = _Tokens([], [], [])
    for ex in examples:
        if not 0 <= ex.image < n_images:
            raise ConfigError(f"an example names image {ex.image}, but there are {n_images} images")
        if ex.prompt not in prompts:
            prompts[ex.prompt] = prefix + vlm.prompt_ids(model, ex.prompt)
        answer = tok(ex.target, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ConfigError(f"an example for image {ex.image} has an empty answer")
        ids = prompts[ex.prompt] + answer + [end]
        model.check_context(len(ids))
        out.ids.append(ids)
        out.n_prompt.append(len(prompts[ex.prompt]))
        out.images.append(ex.image)
    return out


def _batch(tokens: _Tokens, rows: Sequence[int], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and the answer mask (positions whose token is scored)."""
    width = max(len(tokens.ids[r]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        row = tokens.ids[r]
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        answer[i, tokens.n_prompt[r] : len(row)] = True
    images = torch.tensor([tokens.images[r] for r in rows], dtype=torch.long)
    return {
        "ids": ids.to(device),
        "attention": attention.to(device),
        "answer": answer.to(device),
        "images": images,
    }
