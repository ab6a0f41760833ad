"""probe: the only package that touches a model.

It loads models (offline first), registers hooks, reduces activations to small per-head statistics
on the device, applies reversible interventions, estimates memory before it runs, and checks that
every hook it asked for actually fired.
"""

from probe._offline import ensure_offline_default

ensure_offline_default()  # before anything imports transformers

from probe.errors import HeadlabError  # noqa: E402
from probe.loading import Batch, BosPolicy, LoadedModel, load_model  # noqa: E402
from probe.zoo import CATALOGUE, DEFAULT_MODEL, fetch  # noqa: E402

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "Batch",
    "BosPolicy",
    "HeadlabError",
    "LoadedModel",
    "fetch",
    "load_model",
]
