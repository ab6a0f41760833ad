"""probe: the only package that touches a model.

It loads models (offline first), registers hooks, reduces activations to small per-head statistics
on the device, applies reversible interventions, estimates memory before it runs, and checks that
every hook it asked for actually fired. See docs/models.md, docs/capture.md and
docs/interventions.md.
"""

from probe._offline import ensure_offline_default

ensure_offline_default()  # before anything imports transformers

# The language sources register with probe.loading; the vision and vision-language packages add
# theirs when they are imported. Import all three here, in this order, so that load_model always
# sees the whole table (docs/models.md).
from probe import loading, vision, vlm  # noqa: E402, F401
from probe.errors import HeadlabError  # noqa: E402
from probe.loading import Batch, BosPolicy, LoadedModel, load_model  # noqa: E402
from probe.wrap import wrap  # noqa: E402
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
    "wrap",
]
