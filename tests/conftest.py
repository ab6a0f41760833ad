"""Shared fixtures: seeded RNGs, tiny models built once per session, the real embedded model; and the
dashboard tests' helpers (component JSON, plotly typed arrays, callbacks through Dash's endpoint)."""

from __future__ import annotations

import base64
import copy
import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from plotly.utils import PlotlyJSONEncoder

import probe
from analyses import runstore
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


def to_json(component: Any) -> str:
    """A Dash component tree (or a figure) as JSON text: what the browser receives."""
    return json.dumps(component, cls=PlotlyJSONEncoder)


def decode_array(z: Any) -> Any:
    """A plotly JSON array (a plain list, or a typed array {dtype, bdata, shape})."""
    if isinstance(z, dict) and "bdata" in z:
        arr = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return arr.reshape([int(v) for v in str(z.get("shape", len(arr))).split(",")])
    return z


def post_callback(
    app: Any,
    output: str,
    inputs: Sequence[tuple[str, Any] | tuple[str, str, Any]],
    changed: list[str] | None = None,
) -> Any:
    """Run the callback of ``output`` ("element.property") through Dash's update endpoint, as a
    browser does, and return the output's new value. ``inputs``: (element, value) pairs of
    ``value`` properties, or (element, property, value) triples; ``changed``: the properties that
    changed ("element.property"; None: the last input's)."""
    named = [(i[0], "value", i[1]) if len(i) == 2 else i for i in inputs]
    element, prop = output.split(".")
    payload = {
        "output": output,
        "outputs": {"id": element, "property": prop},
        "inputs": [{"id": i, "property": p, "value": v} for i, p, v in named],
        "changedPropIds": [f"{named[-1][0]}.{named[-1][1]}"] if changed is None else changed,
        "state": [],
    }
    response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert response.status_code == 200, response.data[:500]
    return json.loads(response.data)["response"][element][prop]


def render_route(app: Any, pathname: str, search: str = "") -> str:
    """The dashboard's routed page for ``pathname`` + ``search``, served through Dash's update
    endpoint as a browser would request it, as the JSON text of its children."""
    page = post_callback(
        app,
        "page-content.children",
        [("url", "pathname", pathname), ("url", "search", search)],
        ["url.pathname"],
    )
    return json.dumps(page)


FIXED_REVISION = "0" * 40


def fixed_revision(source_dir: object = None) -> str:
    """Stands in for :func:`analyses.runstore.code_revision`: :data:`FIXED_REVISION`, without git."""
    return FIXED_REVISION


@contextmanager
def fixed_code_revision() -> Iterator[None]:
    """Runs saved inside record :data:`FIXED_REVISION` as their code revision instead of asking git
    (usable in module-scoped fixtures, where the ``monkeypatch`` fixture is not)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        yield
