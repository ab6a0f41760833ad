"""Write docs/support.md: every architecture family of probe.families against every support check.

Usage: python scripts/support_table.py [--out docs/support.md]

Each family's tiny checkpoint is written into a temporary directory, checked with the checks of
probe.support and given to every language-model analysis (analyses.support.family_support), the
functions tests/test_architectures.py runs.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path

from analyses import vision_support
from analyses.support import SCORES, family_support, language_analyses, settings_text
from probe.families import FAMILIES
from probe.support import CHECKS, CheckResult
from probe.vision_families import VISION_FAMILIES

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# Architecture support

Which transformers architecture families probe handles, checked on tiny random-weight checkpoints
(`probe/families.py`: 2-3 layers, width 64, 4 heads, grouped-query attention where the family has
it, the byte tokenizer with the circuit tasks' words as whole tokens) written as ordinary checkpoint
directories and loaded with
`probe.load_model(directory)`. Each cell is what the check returns now:

- ✓: probe's result equals transformers' own on the same checkpoint (or, for `recompute`,
  `padding` and `interventions`, the equalities the check names hold; an intervention that refuses
  the family is named in brackets);
- refused (why): probe raises a one-line `ConfigError` saying why and what to use instead (the
  refusal is the tested behaviour);
- ✗ (what): a wrong result or another error.

| check | what it asserts |
| --- | --- |
{checks}

This page is generated: `python scripts/support_table.py` re-makes it, and
`tests/test_architectures.py` runs the same checks (`probe/support.py`) and fails when a row here
disagrees with them. A family passing here is checked on tiny random weights, float32, CPU;
real checkpoints of the family use the same code paths.

What the checks found and what was fixed: BLOOM's ALiBi bias is computed inside its attention
layer, outside transformers' attention interface. `duo_attention` there gave logits off by 1.7 with
every gate at 1 (the bias was lost) and raised an AttributeError on MPT; both now refuse BLOOM and
MPT with a `ConfigError`, as do recompute captures (before any forward; before, a recompute capture
failed only after the forward, finding no rows). Gemma 2 soft-caps its attention scores, which SDPA
cannot do: recompute captures and decode scoring refused it; they now compute its attention with
eager's formula in blocks of query rows (see [capture.md](capture.md)), and pass here.
`decode-rows` found greedy_decode's recorded rows right wherever it decodes (also Gemma 2's
soft-capped rows and the absolute positions under Gemma 3's sliding-window cache). The analyses
below found three crashes on families whose checks pass: `sinks` raised a CaptureError on Phi-3,
GPT-NeoX and Falcon, whose fused-qkv bridges declare `hook_rot_k` but rotate their keys without
firing it; its key norms are now read at `hook_k` there (RoPE keeps norms, and those bridges have
no q/k norm), tested against the keys transformers' attention receives. `duo` raised SDPA's
ValueError on Gemma 2 and an AttributeError on MPT, whose gate training ran the full model's SDPA
path first; it now refuses, before any forward, every model `duo_attention` refuses. Later checks found
more: Falcon's new decoder architecture failed to load (the TransformerBridge cut
its KV-grouped qkv as all queries, all keys, all values, with one KV head); Mistral 7B v0.1's
config-wide sliding window (no `layer_types`) made `duo` raise a CaptureError, and pattern edits and
the memory plan ignored it; LongRoPE (`phi3-longrope`) failed `padding` (a short prompt padded
beside a long one was rotated with the long factors), `greedy-decode` (no recompute where the
generation crosses the switch, as `generate` does) and `decode-rows` (see [models.md](models.md));
on GPT-J, `edit_pattern` and `uniform_attention` changed nothing (its bridge's `hook_pattern` is
not used by the forward): they now refuse there.
Models and sources are described in
[models.md](models.md), captures and decoding in [capture.md](capture.md).

"""


ANALYSES_INTRO = """## Analyses

Every registered analysis of language models (all but the head atlas, which reads other runs and
computes nothing on a model) on each family's checkpoint above, loaded once for both tables, run
through its registry entry as `headlab run` runs it, with these settings over its config's
defaults: the smallest that run every stage of the analysis (a random tiny model recalls no
needle, so the retrieval heads of `retrieval` and `duo` have nothing to validate). Each cell:

- ✓: it ran, and its head scores below are finite numbers, one per layer and head (a run, not a
  check of the scores' values: on random weights they mean nothing);
- refused (why): the analysis raises a one-line `ConfigError`;
- ✗ (what): another error, or head scores of another shape or not finite.

| analysis | settings (`--set`) | head scores |
| --- | --- | --- |
{settings}

`analyses/support.py` runs them; `tests/test_architectures.py` runs it too and fails when a row
here disagrees.
"""


def _table(
    lead: list[str], columns: Iterable[str], rows: Iterable[tuple[list[str], dict[str, CheckResult]]]
) -> list[str]:
    """A markdown table: the ``lead`` columns, then one column per check (its cell per row)."""
    names = list(columns)
    lines = [
        "| " + " | ".join([*lead, *(f"`{c}`" for c in names)]) + " |",
        "| " + " | ".join(["---"] * (len(lead) + len(names))) + " |",
    ]
    for first, row in rows:
        lines.append("| " + " | ".join([*first, *(row[c].cell().replace("|", "/") for c in names)]) + " |")
    return lines


def render(
    results: dict[str, dict[str, CheckResult]], analysis_results: dict[str, dict[str, CheckResult]]
) -> str:
    checks = "\n".join(f"| `{name}` | {what} |" for name, what in CHECKS.items())
    lines = [INTRO.format(checks=checks).rstrip("\n"), ""]
    rows = [([f"`{f}`", FAMILIES[f].what], row) for f, row in results.items()]
    lines += _table(["family", "what it exercises"], CHECKS, rows)
    return "\n".join(lines) + "\n\n" + render_analyses(analysis_results)


def render_analyses(results: dict[str, dict[str, CheckResult]]) -> str:
    """The analyses section: each analysis's settings and head scores, then family × analysis."""
    names = language_analyses()
    settings = "\n".join(
        f"| `{name}` | `{settings_text(name) or '(defaults)'}` | {SCORES[name][0] if name in SCORES else '?'} |"
        for name in names
    )
    lines = [ANALYSES_INTRO.format(settings=settings).rstrip("\n"), ""]
    lines += _table(["family"], names, [([f"`{f}`"], row) for f, row in results.items()])
    return "\n".join(lines) + "\n"


VISION_INTRO = """## Vision families

The vision transformers and the LLaVA assembly, checked the same way on tiny random-weight
checkpoints (`probe/vision_families.py`: 2 layers, width 32, 4 heads, 32-pixel images in 8-pixel
patches; `llava` joins the `clip` tower and the `llama` family above) loaded with
`probe.load_model(directory)`, by `probe/vision_support.py` and, for the analyses' columns,
`analyses/vision_support.py`; `tests/test_vision_architectures.py` fails when a row here disagrees.

| check | what it asserts |
| --- | --- |
{checks}

What the checks found and what was fixed: probe loaded neither SigLIP nor DINOv2 (with or without
registers). Both now load, with their layouts in `probe.vision.ARCHITECTURES`: SigLIP has no CLS
token (its embedding is its attention-pooling head's output, where probe would have taken the first
patch), DINOv2's register tokens are prefix tokens, and DINOv2's processor crop may differ from its
position table (which it interpolates). vit-heads refuses SigLIP: its sink columns read token 0 as
CLS.
"""


def render_vision(results: dict[str, dict[str, CheckResult]]) -> str:
    checks = vision_support.CHECKS
    rows = "\n".join(f"| `{name}` | {what} |" for name, what in checks.items())
    lines = [VISION_INTRO.format(checks=rows).rstrip("\n"), ""]
    cells = [([f"`{f}`", VISION_FAMILIES[f].what], row) for f, row in results.items()]
    lines += _table(["vision family", "what it exercises"], checks, cells)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "support.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {}
        analysis_rows = {}
        for family in FAMILIES:
            results[family], analysis_rows[family] = family_support(family, root)
            done = {**results[family], **analysis_rows[family]}
            print(family, " ".join(f"{c}={r.status}" for c, r in done.items()), flush=True)
        vision = {f: vision_support.family_results(f, Path(root) / "vision") for f in VISION_FAMILIES}
    args.out.write_text(render(results, analysis_rows) + "\n" + render_vision(vision))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
