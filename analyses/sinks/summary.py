"""The few lines the CLI prints after a sinks run."""

from __future__ import annotations

from analyses.base import AnalysisResult
from analyses.sinks.config import QUANTITIES


def summary(result: AnalysisResult) -> str:
    """A few lines for the CLI: Sink_1 per input set, where the hidden sinks are, the norm ratios."""
    table = result.tables["summary"]
    bos = result.model_info.get("bos", {})
    lines = [
        f"sinks of {result.model_info['name']}: T={int(table['seq_len'].iloc[0])} "
        f"(BOS {'prepended: ' + str(bos.get('token')) if bos.get('prepend') else 'not prepended'}), "
        f"eps={table['eps'].iloc[0]}, {int(table['n_sequences'].iloc[0])} sequences per set"
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"  {row.input_set:<9} Sink_1 = {row.sink_1:6.2f}% ± {row.sink_1_sem:.2f}; "
            f"heads with a hidden sink {row.hidden_heads_pct:5.1f}%; top hidden position "
            f"{row.top_hidden_position} ({row.top_hidden_position_pct:.1f}% of heads)"
            + (f"; most listed hidden-sink token {row.top_hidden_token!r}" if row.top_hidden_token else "")
        )
    norms = result.tables.get("norms")
    if norms is not None and len(norms):
        nat = norms[norms["input_set"] == norms["input_set"].iloc[0]]
        for quantity in QUANTITIES:
            q = nat[nat["quantity"] == quantity]
            lines.append(
                f"  {quantity:<6} norm, first token / others ({nat['input_set'].iloc[0]}): "
                f"max ratio {q['ratio'].max():.2f} (layer {int(q.loc[q['ratio'].idxmax(), 'layer'])}), "
                f"min {q['ratio'].min():.2f}"
            )
    return "\n".join(lines)
