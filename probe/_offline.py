"""Offline by default: hub access is switched off before transformers is imported.

Importing :mod:`probe` calls :func:`ensure_offline_default`. A user who wants hub ids opts in with
``HEADLAB_ALLOW_HUB=1``, ``--allow-hub`` on the CLI or ``load_model(..., allow_hub=True)``; an
explicit ``HF_HUB_OFFLINE=0`` in the environment is respected as an opt-in too.
"""

from __future__ import annotations

import os
import sys

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def ensure_offline_default() -> None:
    if os.environ.get("HEADLAB_ALLOW_HUB") == "1":
        return
    for var in _OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    # Noise that says nothing to a user of an offline workbench.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def allow_hub() -> None:
    """Turn hub access on for this process (also when transformers is already imported)."""
    os.environ["HEADLAB_ALLOW_HUB"] = "1"
    for var in _OFFLINE_VARS:
        os.environ[var] = "0"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = False


def hub_allowed() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1") in ("0", "false", "False", "")
