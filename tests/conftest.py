"""Shared fixtures: seeded RNGs, tiny models built once per session, the real embedded model."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import numpy as np
import pytest
import torch

import probe
from probe.loading import LoadedModel

_TINY: dict[str, LoadedModel] = {}
_REAL: dict[str, LoadedModel] = {}


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002  (seeds code that still uses the legacy global generator)
    torch.manual_seed(0)


def _tiny(name: str) -> LoadedModel:
    if name not in _TINY:
        _TINY[name] = probe.load_model(name, device="cpu")
    return _TINY[name]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny architecture in turn (built once per session; never mutated by tests)."""
    return _tiny(request.param)


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return _tiny("tiny-llama")


@pytest.fixture
def tiny_gpt2() -> LoadedModel:
    return _tiny("tiny-gpt2")


def real_model(name: str = probe.DEFAULT_MODEL) -> LoadedModel:
    if name not in _REAL:
        _REAL[name] = probe.load_model(name, device="cpu")
    return _REAL[name]


@pytest.fixture
def smollm() -> LoadedModel:
    """The embedded default model (fetched and converted on first use), shared across tests."""
    return real_model(probe.DEFAULT_MODEL)


@pytest.fixture
def fresh_tiny_llama() -> LoadedModel:
    """A private deep copy, for tests that must be free to change the model."""
    return copy.deepcopy(_tiny("tiny-llama"))


def render_route(app: Any, pathname: str, search: str = "") -> str:
    """The dashboard's routed page for ``pathname`` + ``search``, served through Dash's update
    endpoint as a browser would request it, as the JSON text of its children."""
    payload = {
        "output": "page-content.children",
        "outputs": {"id": "page-content", "property": "children"},
        "inputs": [
            {"id": "url", "property": "pathname", "value": pathname},
            {"id": "url", "property": "search", "value": search},
        ],
        "changedPropIds": ["url.pathname"],
        "state": [],
    }
    response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert response.status_code == 200, response.data[:500]
    return json.dumps(json.loads(response.data)["response"]["page-content"]["children"])
