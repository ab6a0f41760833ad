"""DuoAttention: which KV heads need the whole context (retrieval heads) and which can stream.

Background: Xiao et al. (2025), "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
and Streaming Heads". One gate per KV head mixes full attention with streaming attention (the first
``sink`` and last ``recent`` keys, :mod:`probe.streaming`); the gates are trained (:mod:`.train`) to
keep the final hidden states of the full model on synthetic multi-needle contexts (:mod:`.data`)
while an L1 term pushes them to 0. The top share of KV heads by gate are kept whole
(:func:`binarise`), and needle-in-a-haystack recall with them (:mod:`.evaluate`) is compared with the
same share chosen by Wu et al.'s retrieval score and at random.

Usage:

>>> result = run_duo(model, DuoConfig(steps=200, lengths=(1024,), shares=(0.25,)))
>>> result.tables["accuracy"]

See docs/analyses/duo.md.
"""

from analyses.duo.config import DuoConfig
from analyses.duo.data import PasskeyContext, passkey_context
from analyses.duo.evaluate import duo_decode, kv_head_scores, selections
from analyses.duo.gates import (
    agreement_table,
    binarise,
    kv_ratio,
    load_gates,
    n_retrieval,
    resolve_gates_file,
    save_gates,
    shipped_path,
    spearman,
)
from analyses.duo.run import memory_table, run_duo
from analyses.duo.summary import summary
from analyses.duo.train import duo_loss, full_targets, train_gates
from analyses.registry import Analysis, register
from analyses.roles import Role

__all__ = [
    "DuoConfig",
    "PasskeyContext",
    "agreement_table",
    "binarise",
    "duo_decode",
    "duo_loss",
    "full_targets",
    "kv_head_scores",
    "kv_ratio",
    "load_gates",
    "memory_table",
    "n_retrieval",
    "passkey_context",
    "resolve_gates_file",
    "run_duo",
    "save_gates",
    "selections",
    "shipped_path",
    "spearman",
    "summary",
    "train_gates",
]

ANALYSIS = register(
    Analysis(
        name="duo",
        config_cls=DuoConfig,
        run=run_duo,
        summary=summary,
        help="DuoAttention: train one gate per KV head (full vs sink+recent attention), then test the top "
        "share as retrieval heads on needle tests against the retrieval score and random heads.",
        docs="docs/analyses/duo.md",
        atlas_metrics=("duo_gate",),
        roles=(
            Role(
                "duo_retrieval",
                "Duo retrieval head (top 25% of gates)",
                "duo_rank",
                "rank_share",
                0.25,
                "Xiao et al. 2025, DuoAttention",
                per_kv_head=True,
            ),
        ),
        page="dashboard.duo.page:DuoPage",
        report="dashboard.duo.report:report_sections",
        # small enough for two CPU cores: the gates headlab ships for the model (trained on the GPU),
        # else 5 training steps at 384-512 tokens; one share, two needle tests at 384 tokens, the
        # retrieval score on two short tests
        demo={
            "gates_from": "auto",
            "train_min_length": 384,
            "train_max_length": 512,
            "train_n_lengths": 2,
            "n_passkeys": 4,
            "steps": 5,
            "n_contexts": 2,
            "shares": (0.25,),
            "lengths": (384,),
            "depths": (0.5,),
            "n_needles": 2,
            "random_seeds": 1,
            "score_lengths": (256,),
            "score_depths": (0.0,),
            "score_needles": 2,
        },
    )
)
