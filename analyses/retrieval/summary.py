"""The retrieval run in a few lines (the CLI's summary)."""

from __future__ import annotations

from analyses import validation
from analyses.base import AnalysisResult
from analyses.retrieval.config import RetrievalConfig
from analyses.retrieval.masking import masking_curve


def protocol_line(cfg: RetrievalConfig) -> str:
    """The protocol in words: what the model is asked for and what a hit is worth."""
    ask = (
        "reproduce the whole needle"
        if cfg.protocol == "needle"
        else "complete the needle's lead-in with its answer"
    )
    unit = "|needle|" if cfg.scored_span == "needle" else "|answer|"
    return f"protocol {cfg.protocol} (the model is asked to {ask}; one hit is worth 1/{unit})"


def validation_lines(result: AnalysisResult) -> list[str]:
    """The held-out validation: the shared lines (:func:`analyses.validation.summary_lines`), or why
    there is nothing to show."""
    cfg: RetrievalConfig = result.config
    if not cfg.validation:
        return ["  held-out validation: off (validation=False)"]
    table = result.tables.get("validation")
    if table is None or not len(table):
        return [f"  held-out validation: {result.notes.get('validation', 'no role was tested')}"]
    lines = validation.summary_lines(table)
    for row in table.itertuples(index=False):
        if int(row.n_inputs) == 0:
            lines.append(
                f"  ({row.role}: no held-out test was recalled unmasked, so there was no recall to lose)"
            )
    return lines


def summary(result: AnalysisResult) -> str:
    heads = result.heads
    notes = result.notes
    cfg: RetrievalConfig = result.config
    lines = [
        f"retrieval heads of {result.model_info['name']}, {protocol_line(cfg)}: {notes['tests_passed']}/"
        f"{notes['tests']} tests passed the ROUGE-1 gate (> {cfg.rouge_gate}); lengths {list(cfg.lengths)}, "
        f"depths {list(cfg.depths)}, {cfg.n_needles} needles",
    ]
    if notes["tests_passed"]:
        n_ret = int(heads["is_retrieval"].sum())
        line = f"  share of heads scoring > {cfg.threshold}: {n_ret}/{len(heads)} ({n_ret / len(heads):.1%})"
        if "copies_significantly" in heads:
            n_sig = int(heads["copies_significantly"].sum())
            line += f"; copying significantly more than never (t-test, BH at {cfg.alpha}): {n_sig}"
        lines.append(line)
        top = heads.nlargest(8, "retrieval_score")
        lines.append(
            "  top: " + ", ".join(f"L{r.layer}H{r.head} {r.retrieval_score:.2f}" for r in top.itertuples())
        )
    lines += validation_lines(result)
    if "masking" in result.tables:
        curve = masking_curve(result.tables["masking"])
        for row in curve.itertuples():
            lines.append(
                f"  mask {row.kind:<6} K={row.k:<4} recall {row.recall:.3f} (sd {row.recall_sd:.3f}) recalled {row.recalled:.0%}"
            )
    return "\n".join(lines)
