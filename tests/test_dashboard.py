"""The Dash app: pages and routing, census callbacks (called directly), and which runs it may open."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probe
from analyses import census, runstore
from analyses.census import CensusConfig, run_census
from dashboard.act.page import ActPage
from dashboard.app import build_pages, create_app
from dashboard.atlas.page import AtlasPage
from dashboard.catalog import RunCatalog
from dashboard.census import views
from dashboard.census.page import CensusPage
from dashboard.circuits.page import CircuitsPage
from dashboard.core import figures
from dashboard.core.home import HomePage
from dashboard.duo.page import DuoPage
from dashboard.retrieval.page import RetrievalPage
from dashboard.sinks.page import SinksPage
from dashboard.vhd.page import VhdPage
from dashboard.vit_heads.page import VitPage
from probe.errors import ConfigError, RunStoreError
from tests.conftest import fixed_revision, post_callback, render_route, to_json

SMALL = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)


@pytest.fixture(scope="module")
def census_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs root holding two census runs of the tiny llama (different seeds)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", fixed_revision)
        model = probe.load_model("tiny-llama", device="cpu")
        run_census(model, SMALL, progress=False).save(root)
        run_census(model, CensusConfig(**{**SMALL.__dict__, "seed": 1}), progress=False).save(root)
    yield root


@pytest.fixture
def root(census_root: Path, tmp_path: Path) -> Path:
    """A private copy of the two runs, free to damage."""
    copy = tmp_path / "runs"
    shutil.copytree(census_root, copy)
    return copy


def _run_ids(root: Path) -> list[str]:
    return [s.path.name for s in runstore.list_runs(root)]


def _census_page(root: Path) -> CensusPage:
    page = next(p for p in build_pages(root) if isinstance(p, CensusPage))
    return page


def _find(component: Any, element_id: str) -> Any:
    """The element with ``element_id`` in a Dash component tree."""
    return next(c for c in component._traverse() if getattr(c, "id", None) == element_id)


def _click(layer: int, head: int) -> dict[str, Any]:
    """What dcc.Graph puts in clickData for a click on cell (layer, head) of the census map."""
    return {"points": [{"curveNumber": 0, "x": str(head), "y": str(layer), "z": 0.5}]}


def test_create_app_builds_every_page_and_wires_the_census_callbacks(root: Path) -> None:
    app = create_app(root)
    assert {
        "census-heatmap.figure",
        "census-head.data",
        "census-head-detail.children",
        "census-pattern.figure",
    } <= set(app.callback_map)
    client = app.server.test_client()
    index = client.get("/")
    assert index.status_code == 200 and b"<title>headlab</title>" in index.data
    assert b"--accent" in index.data  # the stylesheet is inlined: nothing outside the packages is needed
    assert client.get("/_dash-layout").status_code == 200
    assert [type(p) for p in build_pages(root)] == [
        HomePage,
        CensusPage,
        SinksPage,
        ActPage,
        RetrievalPage,
        DuoPage,
        CircuitsPage,
        VitPage,
        VhdPage,
        AtlasPage,
    ]


def test_routing_renders_the_census_page_on_the_requested_run(root: Path) -> None:
    app = create_app(root)
    older = _run_ids(root)[-1]
    text = render_route(app, "/census", f"?run={older}")
    assert '"id": "census-run"' in text and f'"value": "{older}"' in text
    assert "Not found" in render_route(app, "/nowhere")
    home = json.dumps(
        post_callback(app, "page-content.children", [("url", "pathname", "/"), ("url", "search", "")], [])
    )
    assert all(f"/census?run={run_id}" in home for run_id in _run_ids(root))


def test_heatmap_differs_between_metrics(root: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    heads = runstore.open_run(root / run_id).heads
    z_by_metric = {}
    for metric in census.METRICS:
        fig = page.heatmap_figure(run_id, metric, None)
        assert census.METRIC_LABELS[metric] in fig.layout.title.text
        z = np.asarray(fig.data[0].z, dtype=float)
        np.testing.assert_allclose(z, heads.pivot(index="layer", columns="head", values=metric).to_numpy())
        z_by_metric[metric] = z
    assert not np.allclose(z_by_metric["entropy"], z_by_metric["induction"])
    assert len({z.tobytes() for z in z_by_metric.values()}) == len(census.METRICS)


def test_clicking_a_head_selects_it_and_shows_its_numbers_and_pattern(root: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    heads = runstore.open_run(root / run_id).heads
    selected = page.select_head(run_id, _click(1, 2), "induction", None, "census-heatmap")
    assert selected == {"run": run_id, "layer": 1, "head": 2}

    detail = to_json(page.head_detail(run_id, selected, "induction"))
    assert "L1H2: layer 1, head 2" in detail
    row = heads[(heads["layer"] == 1) & (heads["head"] == 2)].iloc[0]
    assert f"{row['induction']:.4g}" in detail and f"{row['entropy']:.4g}" in detail

    fig = page.heatmap_figure(run_id, "induction", selected)
    (shape,) = fig.layout.shapes  # the selected cell is outlined
    assert (shape.x0, shape.x1, shape.y0, shape.y1) == (1.5, 2.5, 0.5, 1.5)

    pattern = page.pattern_figure(run_id, selected, 0, "linear")
    other = page.pattern_figure(run_id, {"run": run_id, "layer": 0, "head": 0}, 0, "linear")
    image = pattern.data[0]
    assert image.type == "image" and image.source.startswith("data:image/png;base64,")
    assert image.source != other.data[0].source
    tokens = views.example_tokens(runstore.open_run(root / run_id), 0)
    n = len(tokens)
    assert np.asarray(image.customdata).shape == (n, n)
    assert image.hovertext[5][3].startswith(f"query 5 {figures.token_label(tokens[5])}<br>key 3 ")
    np.testing.assert_allclose(
        np.asarray(image.customdata),
        runstore.open_run(root / run_id).array("example_patterns")[0, 1, 2, :n, :n].astype(np.float32),
    )


def test_head_selection_follows_the_run_not_a_stale_click(root: Path) -> None:
    page = _census_page(root)
    first, second = _run_ids(root)
    held = {"run": first, "layer": 1, "head": 2}
    # The run changed: the old click is ignored and the new run's most notable head is chosen.
    chosen = page.select_head(second, _click(1, 2), "entropy", held, "census-run")
    top = views.top_head(runstore.open_run(root / second).heads, "entropy")
    assert chosen == {"run": second, "layer": top.layer, "head": top.head}
    # A click outside the heads of the run, or a malformed one, keeps the current head.
    assert page.select_head(first, _click(99, 0), "entropy", held, "census-heatmap") == held
    assert page.select_head(first, {"points": []}, "entropy", held, "census-heatmap") == held
    # A stored head of another run does not leak into this run's detail or pattern.
    assert "No head selected" in to_json(page.head_detail(second, held, "entropy"))


def test_select_head_reaches_the_callback_through_dash_context(root: Path) -> None:
    app = create_app(root)
    run_id = _run_ids(root)[0]
    result = post_callback(
        app,
        "census-head.data",
        [
            ("census-run", "value", run_id),
            ("census-heatmap", "clickData", _click(2, 3)),
            ("census-metric", "value", "induction"),
            ("census-head", "data", None),
        ],
        ["census-heatmap.clickData"],
    )
    assert result == {"run": run_id, "layer": 2, "head": 3}


def test_only_runs_under_the_root_are_offered_or_opened(root: Path, tmp_path: Path) -> None:
    other_root = tmp_path / "other"
    other_run = Path(shutil.copytree(root / _run_ids(root)[0], other_root / "20990101-000000-census-x-0000"))
    page = _census_page(root)
    offered = [o["value"] for o in page.run_options()]
    assert offered == _run_ids(root)
    catalog = RunCatalog(root)
    for bad in (
        other_run.name,
        str(other_run),
        f"../other/{other_run.name}",
        "..",
        ".",
        f".{_run_ids(root)[0]}.tmp",
        "",
    ):
        with pytest.raises(RunStoreError, match="only opens run directories under its root"):
            catalog.open(bad)
    fig = page.heatmap_figure(str(other_run), "induction", None)
    assert len(fig.data) == 0 and "cannot show run" in fig.layout.annotations[0].text
    assert page.select_head(str(other_run), None, "induction", None) is None
    layout = page.layout({"run": str(other_run)})  # a path in the URL: ignored, newest run shown
    assert _find(layout, "census-run").value == _run_ids(root)[0]
    assert "is not an intact census run under the root" in to_json(layout)


def test_damaged_run_is_listed_as_damaged_and_not_offered(root: Path) -> None:
    good, bad = _run_ids(root)
    page = _census_page(root)
    page.heatmap_figure(bad, "induction", None)  # opened (and cached) while intact
    table = root / bad / "heads.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))  # same size: only the sha256 tells

    options = {o["value"]: o for o in page.run_options()}
    assert not options[good].get("disabled")
    assert options[bad]["disabled"] is True and "damaged" in options[bad]["label"]
    with pytest.raises(RunStoreError, match="sha256"):
        page.catalog.open(bad)
    assert "cannot show run" in page.heatmap_figure(bad, "induction", None).layout.annotations[0].text
    home = next(p for p in build_pages(root) if isinstance(p, HomePage))
    listing = to_json(home.layout({}))
    assert "damaged" in listing and f"/census?run={good}" in listing and f"/census?run={bad}" not in listing


def test_example_picker_and_empty_root(root: Path, tmp_path: Path) -> None:
    page = _census_page(root)
    run_id = _run_ids(root)[0]
    options, value = page.example_options(run_id, None)
    assert [o["value"] for o in options] == [0, 1] and value == 0
    assert page.example_options(run_id, 1)[1] == 1
    empty = _census_page(tmp_path / "no-runs-here")
    assert empty.run_options() == []
    layout = to_json(empty.layout({}))
    assert "No intact census run" in layout and "headlab run census" in layout
    assert (
        empty.heatmap_figure(None, "induction", None).layout.annotations[0].text == "no census run selected"
    )


def test_pattern_colours_mark_masked_cells_but_keep_leaks_visible() -> None:
    weights = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    rgb = figures.pattern_rgb(weights)
    assert rgb.shape == (3, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == figures.MASKED_RGB and tuple(rgb[1, 0]) != figures.MASKED_RGB
    leaking = weights.copy()
    leaking[0, 2] = 0.25  # attention to a future key must stay visible
    assert tuple(figures.pattern_rgb(leaking)[0, 2]) != figures.MASKED_RGB
    assert figures.token_label("<|im_start|>\n") == "'&lt;|im_start|&gt;\\n'"


# ------------------------------------------------------------------ what the server answers, to whom

_DASH_LAYOUT = "/_dash-layout"


def _first_script(index: str) -> str:
    match = re.search(r'<script src="(/[^"]+)"', index)
    assert match, index[:2000]
    return match.group(1)


def _update(app: Any, host: str, run_id: str) -> Any:
    """A census heat-map update through Dash's endpoint, as a browser at ``host`` would send it."""
    payload = {
        "output": "census-heatmap.figure",
        "outputs": {"id": "census-heatmap", "property": "figure"},
        "inputs": [
            {"id": "census-run", "property": "value", "value": run_id},
            {"id": "census-metric", "property": "value", "value": "induction"},
            {"id": "census-head", "property": "data", "value": None},
        ],
        "changedPropIds": ["census-metric.value"],
        "state": [],
    }
    return app.server.test_client().post("/_dash-update-component", json=payload, headers={"Host": host})


@pytest.mark.parametrize(
    ("listen", "allowed", "good", "bad"),
    [
        (
            "127.0.0.1",
            (),
            ["127.0.0.1:8050", "localhost:8050", "[::1]:8050", "LocalHost:8050", "localhost.:8050"],
            [
                "evil.example:8050",
                "127.0.0.1:8051",
                "localhost",
                "127.0.0.1.evil.example:8050",
                "127.0.0.2:8050",
                "[::1]",
                "::1:8050",
                "localhost:8050:1",
                "localhost:",
                "local host:8050",
                "user@localhost:8050",
                "",
            ],
        ),
        ("192.0.2.10", (), ["192.0.2.10:8050"], ["127.0.0.1:8050", "localhost:8050", "evil.example:8050"]),
        (
            "127.0.0.1",
            ("dash.example.org", "localhost:9000"),
            ["dash.example.org:8050", "localhost:9000", "localhost:8050"],
            ["dash.example.org:9000", "127.0.0.1:9000", "evil.example:9000"],
        ),
    ],
    ids=["loopback", "one-address", "allowed-hosts"],
)
def test_only_requests_for_the_address_it_listens_on_are_answered(
    root: Path, listen: str, allowed: tuple[str, ...], good: list[str], bad: list[str]
) -> None:
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 sends Host: evil.example."""
    app = create_app(root, host=listen, port=8050, allowed_hosts=allowed)
    client = app.server.test_client()
    run_id = _run_ids(root)[0]
    for host in good:
        assert client.get("/", headers={"Host": host}).status_code == 200, host
        assert _update(app, host, run_id).status_code == 200, host
    for host in bad:
        for response in (
            client.get("/", headers={"Host": host}),
            client.get(f"/census?run={run_id}", headers={"Host": host}),
            client.get(_DASH_LAYOUT, headers={"Host": host}),
            _update(app, host, run_id),
        ):
            assert response.status_code == 400, host
            assert response.mimetype == "text/plain"
            text = response.get_data(as_text=True)
            assert text.count("\n") == 1 and text.startswith("headlab dashboard: refused a request for host")
            assert "--allowed-host" in text and "Traceback" not in text and run_id not in text
            assert response.headers["X-Frame-Options"] == "DENY"
    assert not app.server.wsgi_app.allows(None)  # type: ignore[attr-defined]  # no Host header at all


def test_hosts_for_every_interface_an_unknown_port_and_bad_allowed_hosts(root: Path) -> None:
    import socket

    everywhere = create_app(root, host="0.0.0.0", port=8050).server.test_client()
    for host in ("127.0.0.1:8050", "localhost:8050", f"{socket.gethostname()}:8050"):
        assert everywhere.get("/", headers={"Host": host}).status_code == 200, host
    assert everywhere.get("/", headers={"Host": "evil.example:8050"}).status_code == 400
    any_port = create_app(root).server.test_client()  # the port is not known: the names on any port
    assert any_port.get("/").status_code == 200  # the test client's Host: localhost
    assert any_port.get("/", headers={"Host": "127.0.0.1:1234"}).status_code == 200
    assert any_port.get("/", headers={"Host": "evil.example:1234"}).status_code == 400
    for bad in ("a b", "localhost:port", "[::1", "[localhost]:80", "evil.example/x", ""):
        with pytest.raises(ConfigError, match="is not a host name or address"):
            create_app(root, allowed_hosts=[bad])


def test_every_response_carries_the_security_headers(root: Path) -> None:
    app = create_app(root, port=8050)
    client = app.server.test_client()
    host = {"Host": "127.0.0.1:8050"}
    run_id = _run_ids(root)[0]
    responses = {
        "/": client.get("/", headers=host),
        "a page": client.get(f"/census?run={run_id}", headers=host),
        "an update": _update(app, "127.0.0.1:8050", run_id),
        "the layout": client.get(_DASH_LAYOUT, headers=host),
        "a script": client.get(
            _first_script(client.get("/", headers=host).get_data(as_text=True)), headers=host
        ),
        "a missing file": client.get("/_dash-component-suites/dash/nothing.js", headers=host),
        "a refused host": client.get("/", headers={"Host": "evil.example"}),
    }
    assert [responses[k].status_code for k in ("/", "a page", "an update", "the layout", "a script")] == [
        200
    ] * 5
    for what, response in responses.items():
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff", what
        assert headers["X-Frame-Options"] == "DENY", what
        assert headers["Referrer-Policy"] == "no-referrer", what
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin", what
        assert headers["Cross-Origin-Resource-Policy"] == "same-origin", what
        policy = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
        assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'", what
        assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'", what
        scripts = policy["script-src"].split()
        assert scripts[0] == "'self'" and all(s.startswith("'sha256-") for s in scripts[1:]), what
        assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts, what
        assert len(headers.getlist("Content-Security-Policy")) == 1, what
    # The policy names Dash's inline start-up script by its hash (the browser test proves the pages run).
    policy = responses["/"].headers["Content-Security-Policy"]
    assert set(app.csp_hashes()) <= set(policy.replace(";", " ").split())


def test_a_run_name_of_5000_characters_is_ignored_with_a_message_not_a_500(root: Path) -> None:
    app = create_app(root)
    client = app.server.test_client()
    long = "a" * 5000
    assert (
        client.get(f"/census?run={long}").status_code == 200
    )  # the index page: the app routes in the browser
    newest = _run_ids(root)[0]
    for path in ("/census", "/sinks", "/circuits", "/vit", "/vhd", "/", "/nowhere"):
        payload = {
            "output": "page-content.children",
            "outputs": {"id": "page-content", "property": "children"},
            "inputs": [
                {"id": "url", "property": "pathname", "value": path},
                {"id": "url", "property": "search", "value": f"?run={long}&metric=entropy"},
            ],
            "changedPropIds": ["url.pathname"],
            "state": [],
        }
        response = client.post("/_dash-update-component", json=payload)
        assert response.status_code == 200, path
        body = json.loads(response.data)
        message = json.dumps(body["sideUpdate"]["app-message"]["children"])
        assert "Ignored the URL's parameter 'run': longer than 255 characters" in message, path
        assert "aaaa" not in json.dumps(body), path  # neither echoed nor used
    page = render_route(app, "/census", f"?run={long}&metric=entropy")
    assert f'"value": "{newest}"' in page and '"value": "entropy"' in page  # the other parameters still apply
    # A parameter of normal length clears the message.
    payload["inputs"][1]["value"] = f"?run={newest}"  # type: ignore[index]
    cleared = json.loads(client.post("/_dash-update-component", json=payload).data)
    assert cleared["sideUpdate"]["app-message"]["children"] is None


def test_a_failing_callback_answers_with_a_message_on_the_page_and_logs_the_traceback(
    root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error inside a callback (here the file system refusing a 5,000-character name,
    as it did before the catalog learnt to refuse such names itself) becomes one line on the page,
    never a 500 or a traceback in the browser."""

    def refuse(self: RunCatalog, run_id: str, **kwargs: object) -> None:
        raise OSError(36, "File name too long", run_id)

    app = create_app(root)
    monkeypatch.setattr(RunCatalog, "open", refuse)
    payload = {
        "output": "census-head.data",
        "outputs": {"id": "census-head", "property": "data"},
        "inputs": [
            {"id": "census-run", "property": "value", "value": "a" * 5000},
            {"id": "census-heatmap", "property": "clickData", "value": _click(1, 2)},
        ],
        "changedPropIds": ["census-heatmap.clickData"],
        "state": [
            {"id": "census-metric", "property": "value", "value": "induction"},
            {"id": "census-head", "property": "data", "value": None},
        ],
    }
    with caplog.at_level("ERROR", logger="headlab.dashboard"):
        response = app.server.test_client().post("/_dash-update-component", json=payload)
    assert response.status_code == 200
    body = json.loads(response.data)
    assert body["response"] == {}  # the outputs keep their values
    message = json.dumps(body["sideUpdate"]["app-message"]["children"])
    assert "Something went wrong while updating census-head" in message and "log has the details" in message
    assert "Traceback" not in response.get_data(as_text=True) and "aaaa" not in message
    assert any(r.exc_info for r in caplog.records if "census-head" in r.getMessage())


def test_a_page_that_fails_to_draw_says_so_without_a_traceback(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    draw = CensusPage.layout

    def fail(self: CensusPage, params: Any) -> Any:
        if "run" not in params:  # the app's validation layout
            return draw(self, params)
        raise OSError(36, "File name too long", str(root / ("a" * 300)))

    monkeypatch.setattr(CensusPage, "layout", fail)
    app = create_app(root)
    with caplog.at_level("ERROR", logger="headlab.dashboard"):
        page = render_route(app, "/census", "?run=x")
    assert "This page could not be drawn (File name too long)" in page and "log has the details" in page
    assert str(root) not in page and "Traceback" not in page  # no path, no traceback in the browser
    assert any(r.exc_info for r in caplog.records if "/census" in r.getMessage())


def test_the_catalog_answers_a_name_no_file_system_takes_as_no_such_run(root: Path) -> None:
    catalog = RunCatalog(root)
    for name in ("a" * 5000, "é" * 200):  # 5,000 characters; 400 bytes in UTF-8
        with pytest.raises(RunStoreError, match=r"no run .* pick one of the listed runs"):
            catalog.open(name)
