"""Prompts for vision-language models: the chat template, the expanded image token, left-padded batches."""

from __future__ import annotations

from collections.abc import Sequence

from probe.assemblies import IMAGE_TOKEN
from probe.errors import ConfigError, HeadlabError
from probe.model import Batch, LoadedModel
from probe.vlm.wrap import _require_vlm


def format_prompt(model: LoadedModel, text: str, *, image: bool = True) -> str:
    """The user turn ``text`` (after the image placeholder) as the model's prompt, ready to answer.

    Uses the tokenizer's chat template (SmolLM2's for ``scene-llava``) with the generation prompt;
    without one, LLaVA-1.5's ``USER: <image>\\n{text} ASSISTANT:``. ``image=False`` leaves the image
    placeholder out (the text-only twin of the same prompt).
    """
    _require_vlm(model)
    content = f"{IMAGE_TOKEN}\n{text}" if image else text
    if getattr(model.tokenizer, "chat_template", None):
        return str(
            model.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"USER: {content} ASSISTANT:"


def _expand_image_tokens(ids: Sequence[int], image_token_id: int, n: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([image_token_id] * n if t == image_token_id else [t])
    return out


def prompt_ids(model: LoadedModel, text: str, *, image: bool = True) -> list[int]:
    """Token ids of :func:`format_prompt` (no BOS), the image token expanded to ``image_seq_length`` copies."""
    ids = model.tokenizer(format_prompt(model, text, image=image), add_special_tokens=False)["input_ids"]
    image_id = int(model.extra["image_token_id"])
    if image and ids.count(image_id) != 1:
        raise HeadlabError(f"the prompt should hold one image token, found {ids.count(image_id)}")
    return _expand_image_tokens(ids, image_id, int(model.extra["image_seq_length"]))


def encode_prompts(model: LoadedModel, texts: Sequence[str], *, image: bool = True) -> Batch:
    """Prompts as a left-padded :class:`~probe.loading.Batch` under the model's BOS policy."""
    _require_vlm(model)
    return model.batch_from_ids([prompt_ids(model, t, image=image) for t in texts])


def _as_list(prompts: str | Sequence[str], n: int) -> list[str]:
    items = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(items) != n:
        raise ConfigError(f"{len(items)} prompts for {n} images; give one prompt, or one per image")
    return items
