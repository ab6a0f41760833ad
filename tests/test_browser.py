"""Every dashboard page in a real headless browser (Debian's chromium driven by selenium).

One server for the module, on 127.0.0.1 on a free port from a background thread, over one root with
a demo-like run of every analysis (:mod:`tests.browser_runs`, built once), and one browser for the
module. Each page (a test id per page, and per run kind where a page shows several) is loaded from
its run and must draw its figures with no error text, no failed callback and nothing refused by the
Content-Security-Policy; then one real interaction (a radio button, a dropdown, a link) must change
what it steers. The census page is also driven with the mouse: a head clicked at its cell's pixel
position (computed from plotly's axes) updates the map, the head's numbers and its pattern, and a
head clicked on the atlas's role grid opens its card. Missing
selenium or chromium is a failure naming the fix (``bash scripts/browser-deps.sh``), never a skip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import pytest

from analyses import runstore
from dashboard.app import create_app
from dashboard.atlas import views as atlas_views
from dashboard.census import views
from dashboard.registry import pages
from tests import browser_runs

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FIX = (
    "install them with `bash scripts/browser-deps.sh` (as root; it apt-installs chromium and chromium-driver)"
)
TIMEOUT = 30.0
T = TypeVar("T")

# The census map's plotly div.
_GRAPH = "document.querySelector('#census-heatmap .js-plotly-plot')"
# Offsets from the plot div's centre (what selenium's move_to_element_with_offset takes).
_CELL_OFFSET = f"""
const gd = {_GRAPH};
const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
const box = gd.getBoundingClientRect();
return [xa._offset + xa.l2p(xa.d2l(arguments[0])) - box.width / 2,
        ya._offset + ya.l2p(ya.d2l(arguments[1])) - box.height / 2];
"""


@contextlib.contextmanager
def _chromium() -> Iterator[Any]:
    """Headless chromium under selenium; a missing piece fails the calling test with the fix.

    (A context manager called by the test, not a fixture: a fixture that fails reports an error
    at setup, and this must be a plain test failure.)"""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        pytest.fail(
            f"selenium is not installed ({err}); install the dev extras (pip install -e '.[dev]'), then {FIX}"
        )
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"headless browser missing: {', '.join(missing)}; {FIX}")
    profile = tempfile.mkdtemp(prefix="headlab-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    except Exception as err:  # a broken install: say how to fix it rather than erroring obscurely
        shutil.rmtree(profile, ignore_errors=True)
        pytest.fail(f"chromium did not start ({type(err).__name__}: {err}); {FIX}")
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# Collects the Content-Security-Policy violations of each page (injected by the driver, so the
# policy under test does not apply to it).
_CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__cspViolations.push(e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline')));
"""


class _Browser:
    """One headless chromium for the module, started by the first test that asks for it (so that a
    missing chromium fails that test, naming the fix, instead of erroring in a fixture's setup)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._driver: Any = None
        self._failure: str | None = None

    def driver(self) -> Any:
        if self._failure is not None:
            pytest.fail(self._failure)
        if self._driver is None:
            try:
                self._driver = self._stack.enter_context(_chromium())
            except pytest.fail.Exception as err:
                self._failure = str(err)
                raise
            self._driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _CSP_WATCH})
        self._driver.get_log("browser")  # what earlier tests left
        return self._driver

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[_Browser]:
    held = _Browser()
    try:
        yield held
    finally:
        held.close()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass(frozen=True)
class Served:
    base: str  # http://127.0.0.1:PORT
    root: Path
    ids: dict[str, str]  # analysis -> run id
    log: _Records  # what the dashboard logged (failed callbacks, pages that could not be drawn)

    def url(self, path: str, analysis: str | None = None) -> str:
        return f"{self.base}{path}" + (f"?run={self.ids[analysis]}" if analysis else "")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The dashboard over a root with a run of every analysis, answering only 127.0.0.1:PORT and
    the other loopback names on the port it was given."""
    from werkzeug.serving import make_server

    root = tmp_path_factory.mktemp("runs")
    runs = browser_runs.build(root)
    apps: list[Any] = []
    server = make_server("127.0.0.1", 0, lambda env, start: apps[0](env, start), threaded=True)
    apps.append(create_app(root, host="127.0.0.1", port=server.port).server)
    log = _Records()
    logger = logging.getLogger("headlab.dashboard")
    logger.addHandler(log)
    thread = threading.Thread(target=server.serve_forever, name="headlab-dashboard", daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.port}", root, dict(runs.ids), log)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        logger.removeHandler(log)


def _wait(
    driver: Any,
    what: str,
    condition: Callable[[Any], T | Literal[False] | None],
    describe: Callable[[Any], str] | None = None,
) -> T:
    """What ``condition`` returns once truthy; fails after TIMEOUT with the page's message, what
    ``describe`` says of the page then, and the browser console."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return cast(T, WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(condition))
    except TimeoutException:
        logs = "\n".join(e["message"] for e in driver.get_log("browser"))
        shown = driver.execute_script(
            "const m = document.getElementById('app-message'); return m && m.innerText"
        )
        pytest.fail(
            f"timed out after {TIMEOUT} s waiting for {what}; {describe(driver) + '; ' if describe else ''}"
            f"the page's message: {shown or 'none'}; browser console:\n{logs}"
        )


def _heatmap(driver: Any) -> dict[str, Any] | None:
    """The census map as plotted: its title, z values and outlined cell (None until drawn)."""
    return driver.execute_script(
        f"""
        const gd = {_GRAPH};
        if (!gd || !gd._fullData || !gd._fullData.length || !gd._fullData[0].z) return null;
        const shape = (gd.layout.shapes || [])[0];
        // z as plotted: rows may be typed arrays (plotly ships numpy data as binary).
        const z = Array.from(gd._fullData[0].z, row => Array.from(row));
        return {{title: gd.layout.title.text, z: JSON.stringify(z),
                 outlined: shape ? [shape.x0, shape.y0] : null}};
        """
    )


def _pattern_source(driver: Any) -> str | None:
    return driver.execute_script(
        """
        const gd = document.querySelector('#census-pattern .js-plotly-plot');
        return gd && gd.data && gd.data.length && gd.data[0].type === 'image' ? gd.data[0].source : null;
        """
    )


def _pattern_title(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const gd = document.querySelector('#census-pattern .js-plotly-plot');"
            "return gd && gd.layout && gd.layout.title ? gd.layout.title.text : ''"
        )
    )


def _detail(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const el = document.getElementById('census-head-detail'); return el ? el.innerText : ''"
        )
    )


def test_census_page_metric_change_and_head_click_update_the_map_detail_and_pattern(
    served: Served, chromium: _Browser
) -> None:
    heads = runstore.open_run(served.root / served.ids["census"]).heads
    browser = chromium.driver()  # fails first, naming the fix, when selenium or chromium is missing
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(served.url("/census", "census"))

    first = _wait(browser, "the census heat map", lambda d: _heatmap(d))
    assert "induction score" in first["title"]  # the default metric
    top = views.top_head(heads, "induction")
    detail = _wait(browser, "the top head's detail", lambda d: _detail(d) if str(top) in _detail(d) else None)
    assert f"layer {top.layer}, head {top.head}" in detail
    first_pattern = _wait(browser, "the pattern image", _pattern_source)
    assert first_pattern.startswith("data:image/png;base64,")

    # Change the metric with the radio button: the map's values and title change.
    browser.find_element(By.CSS_SELECTOR, "#census-metric input[value='entropy']").click()
    changed = _wait(
        browser,
        "the entropy map",
        lambda d: m if (m := _heatmap(d)) and "entropy" in m["title"] else None,
    )
    assert changed["z"] != first["z"]
    expected = heads.pivot(index="layer", columns="head", values="entropy").to_numpy()
    assert json.loads(changed["z"])[0][0] == pytest.approx(expected[0, 0], rel=1e-6)
    # Entropy is measured on natural text: the pattern follows the metric to a natural example (the
    # induction default showed the repeated sequence). Waiting for it also lets that chain of updates
    # (metric -> input set -> example -> pattern) finish before the click below starts another.
    _wait(
        browser,
        "the pattern on a natural example",
        lambda d: (t := _pattern_title(d)).startswith(f"{top} on example") and t,
        lambda d: f"the pattern shown: {_pattern_title(d)!r}",
    )

    # Click another head with the mouse, at its cell's pixel position on the plot.
    last = views.PickedHead(int(heads["layer"].max()), int(heads["head"].max()))
    target = last if last != top else views.PickedHead(0, 0)
    graph = browser.find_element(By.CSS_SELECTOR, "#census-heatmap .js-plotly-plot")
    dx, dy = browser.execute_script(_CELL_OFFSET, str(target.head), str(target.layer))
    mouse = ActionChains(browser).move_to_element_with_offset(graph, int(dx), int(dy))
    mouse.pause(0.3).click().perform()  # plotly turns the hover + click into plotly_click

    detail = _wait(
        browser,
        f"the detail of {target}",
        lambda d: t if f"{target}: layer" in (t := _detail(d)) else None,
    )
    row = heads[(heads["layer"] == target.layer) & (heads["head"] == target.head)].iloc[0]
    assert f"{row['entropy']:.4g}" in detail and f"{row['induction']:.4g}" in detail
    new_pattern = _wait(
        browser,
        f"the pattern of {target}",
        lambda d: (
            s
            if _pattern_title(d).startswith(f"{target} on") and (s := _pattern_source(d)) != first_pattern
            else None
        ),
        lambda d: f"the pattern shown: {_pattern_title(d)!r}",
    )
    assert new_pattern and new_pattern.startswith("data:image/png;base64,")
    cell = [target.head - 0.5, target.layer - 0.5]
    _wait(browser, "the clicked cell outlined", lambda d: (m := _heatmap(d)) and m["outlined"] == cell)

    # Hovering the pattern shows the tokens and the weight of the cell under the mouse.
    pattern = browser.find_element(By.CSS_SELECTOR, "#census-pattern .nsewdrag")
    ActionChains(browser).move_to_element(pattern).pause(0.3).perform()
    hover = _wait(
        browser,
        "the pattern's hover label",
        lambda d: d.execute_script(
            "const h = document.querySelector('#census-pattern .hovertext'); return h && h.textContent"
        ),
    )
    assert "query" in hover and "key" in hover and "weight" in hover and "'" in hover  # quoted tokens

    errors = [
        e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]
    ]
    assert errors == []


# The atlas's role grid (numeric axes: a head's cell is centred on its number) and its head card.
_ATLAS_GRID = "document.querySelector('#atlas-grid .js-plotly-plot')"
_ATLAS_CELL = _CELL_OFFSET.replace(_GRAPH, _ATLAS_GRID)


def _atlas_grid(driver: Any) -> dict[str, Any] | None:
    """The atlas grid as plotted: its outlined head (None until drawn)."""
    return driver.execute_script(
        f"""
        const gd = {_ATLAS_GRID};
        if (!gd || !gd._fullData || !gd._fullData.length) return null;
        const rect = (gd.layout.shapes || []).find(s => s.type === 'rect');
        return {{outlined: rect ? [rect.x0, rect.y0] : null}};
        """
    )


def _atlas_card(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const el = document.getElementById('atlas-head-card'); return el ? el.innerText : ''"
        )
    )


def _atlas_pattern_title(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const gd = document.querySelector('#atlas-pattern .js-plotly-plot');"
            "return gd && gd.layout && gd.layout.title ? gd.layout.title.text : ''"
        )
    )


def test_atlas_page_a_head_clicked_on_the_grid_opens_its_card(served: Served, chromium: _Browser) -> None:
    atlas = runstore.open_run(served.root / served.ids["atlas"])
    heads = atlas.table("heads")
    browser = chromium.driver()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    served.log.records.clear()
    browser.get(served.url("/atlas", "atlas"))
    first = atlas_views.default_head(heads)  # the card opens on the head with the most roles
    _wait(browser, f"the card of {first}", lambda d: f"{first}: layer" in _atlas_card(d))
    _wait(browser, "the role grid", _atlas_grid)

    last = atlas_views.PickedHead(int(heads["layer"].max()), int(heads["head"].max()))
    target = last if last != first else atlas_views.PickedHead(0, 0)
    grid = browser.find_element(By.CSS_SELECTOR, "#atlas-grid .js-plotly-plot")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", grid)
    dx, dy = browser.execute_script(_ATLAS_CELL, target.head, target.layer)
    ActionChains(browser).move_to_element_with_offset(grid, int(dx), int(dy)).pause(0.3).click().perform()

    card = _wait(
        browser,
        f"the card of {target}",
        lambda d: (
            t if f"{target}: layer {target.layer}, head {target.head}" in (t := _atlas_card(d)) else None
        ),
        lambda d: f"the card shown: {_atlas_card(d)[:80]!r}",
    )
    census = atlas_views.source_run(atlas, "census")
    assert census is not None and census in card and "percentile" in card
    row = heads[(heads["layer"] == target.layer) & (heads["head"] == target.head)].iloc[0]
    assert f"{row['census.entropy']:.4g}" in card
    n = int(row["n_roles"])
    assert f"{n} role{'s' if n != 1 else ''}" in card
    cell = [target.head - 0.5, target.layer - 0.5]
    _wait(browser, "the clicked head outlined", lambda d: (m := _atlas_grid(d)) and m["outlined"] == cell)
    _wait(browser, f"the pattern of {target}", lambda d: _atlas_pattern_title(d).startswith(f"{target} on"))

    # A row's button in the heads table opens that head's card too.
    button = browser.find_element(By.CSS_SELECTOR, "#atlas-heads-rows button")
    row_head = str(button.text)
    assert row_head != str(target)  # the table lists the heads with the most roles first
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
    button.click()
    _wait(browser, f"the card of {row_head}", lambda d: f"{row_head}: layer" in _atlas_card(d))
    state = _settled(browser, served, "atlas page after a click on the grid")
    _assert_clean(browser, served, state, "atlas page after a click on the grid")


# ------------------------------------------------------------------------------------ every page

_ERROR_TEXT = re.compile(
    r"Traceback|\bError\b|Something went wrong|cannot (?:show|read) run|could not be drawn"
)
# The page once its callbacks are done: no element loading, no graph still saying "loading…".
_PAGE_STATE = """
const graphs = Array.from(document.querySelectorAll('.dash-graph'));
const waiting = graphs.filter(g => {
    const gd = g.querySelector('.js-plotly-plot');  // none until plotly.js is loaded and drew
    return !gd || !gd.layout || (gd.layout.annotations || []).some(a => String(a.text).includes('loading…'));
});
const root = document.getElementById('react-entry-point');
return {
    page: !!document.querySelector('#page-content > .page'),
    busy: document.querySelectorAll('[data-dash-is-loading="true"]').length,
    loading: waiting.map(g => g.id || '?'),
    graphs: graphs.length,
    text: root ? root.textContent : '',
    errors: Array.from(document.querySelectorAll('.error, [class*="dash-fe-error"], .dash-callback-error'))
        .map(e => e.textContent.trim()).filter(t => t),
    csp: window.__cspViolations || [],
};
"""
# A graph as drawn: its traces and the size of its SVG (None until plotly drew it).
_DRAWN = """
const el = document.getElementById(arguments[0]);
const gd = el && el.querySelector('.js-plotly-plot');
const svg = gd && gd.querySelector('.main-svg');
if (!gd || !gd.data || !svg) return null;
const box = svg.getBoundingClientRect();
return {traces: gd.data.length, width: box.width, height: box.height,
        messages: (gd.layout.annotations || []).map(a => String(a.text))};
"""
# What a graph shows, as text that changes when its data, title, marks or notes do.
_FINGERPRINT = """
const el = document.getElementById(arguments[0]);
const gd = el && el.querySelector('.js-plotly-plot');
if (!gd || !gd.data || !gd.layout) return null;
const plain = (key, value) => ArrayBuffer.isView(value) ? Array.from(value) : value;
return JSON.stringify([gd.data, gd.layout.title, gd.layout.annotations, gd.layout.shapes], plain);
"""


@dataclass(frozen=True)
class PageCase:
    """One page loaded from a run of ``analysis``: the graphs that must be drawn with data, and one
    interaction: pick the first option not chosen of the radio buttons or dropdown ``control``,
    after which graph ``watched`` must show something else."""

    name: str  # the test id
    path: str
    analysis: str
    drawn: tuple[str, ...]
    control: str
    kind: str  # "radio" or "dropdown"
    watched: str


_CIRCUIT_GRAPHS = ("circuits-metrics", "circuits-faithfulness", "circuits-graph", "circuits-heatmaps")
CASES = (
    PageCase(
        "census",
        "/census",
        "census",
        ("census-heatmap", "census-pattern"),
        "census-metric",
        "radio",
        "census-heatmap",
    ),
    PageCase(
        "sinks",
        "/sinks",
        "sinks",
        ("sinks-bars", "sinks-positions", "sinks-heatmap", "sinks-example-figure"),
        "sinks-input",
        "radio",
        "sinks-heatmap",
    ),
    PageCase(
        "act",
        "/act",
        "act",
        ("act-accuracy", "act-delta", "act-grid", "act-search", "act-margins"),
        "act-task",
        "dropdown",
        "act-grid",
    ),
    PageCase(
        "retrieval",
        "/retrieval",
        "retrieval",
        (
            "retrieval-grid",
            "retrieval-histogram",
            "retrieval-top",
            "retrieval-masking",
            "retrieval-test-grid",
        ),
        "retrieval-test",
        "dropdown",
        "retrieval-test-grid",
    ),
    PageCase(
        "duo",
        "/duo",
        "duo",
        ("duo-gates", "duo-loss", "duo-accuracy", "duo-memory"),
        "duo-metric",
        "radio",
        "duo-accuracy",
    ),
    PageCase(
        "circuits-ioi", "/circuits", "ioi", _CIRCUIT_GRAPHS, "circuits-stage", "radio", "circuits-heatmaps"
    ),
    PageCase(
        "circuits-colored-objects",
        "/circuits",
        "colored-objects",
        _CIRCUIT_GRAPHS,
        "circuits-stage",
        "radio",
        "circuits-heatmaps",
    ),
    PageCase(
        "circuits-reuse",
        "/circuits",
        "circuit-reuse",
        (*_CIRCUIT_GRAPHS, "circuits-overlap", "circuits-intervention"),
        "circuits-iv-metric",
        "radio",
        "circuits-intervention",
    ),
    PageCase(
        "vit",
        "/vit",
        "vit-heads",
        ("vit-importance", "vit-agreement", "vit-trend", "vit-distance"),
        "vit-head",
        "dropdown",
        "vit-distance",
    ),
    PageCase("vhd", "/vhd", "vhd", ("vhd-heads", "vhd-caption"), "vhd-metric", "dropdown", "vhd-heads"),
    PageCase(
        "vhr",
        "/vhd",
        "vhr",
        ("vhd-heads", "vhd-caption", "vhd-benchmarks", "vhd-deltas"),
        "vhd-scene",
        "dropdown",
        "vhd-caption",
    ),
    PageCase(
        "atlas",
        "/atlas",
        "atlas",
        ("atlas-grid", "atlas-pattern", "atlas-overlap", "atlas-compare-depth", "atlas-compare-metrics"),
        "atlas-compare-role",
        "dropdown",
        "atlas-compare-depth",
    ),
)


def _settled(driver: Any, served: Served, what: str) -> dict[str, Any]:
    """The page's state once its callbacks are done; fails with what is still loading otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    seen: list[str] = []

    def done(d: Any) -> dict[str, Any] | Literal[False]:
        state: dict[str, Any] = d.execute_script(_PAGE_STATE)
        if not state["page"] or state["busy"] or state["loading"]:
            seen.clear()
            return False
        seen.append(state["text"])  # settled: the same page twice in a row
        return state if len(seen) > 1 and seen[-1] == seen[-2] else False

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(done)
    except TimeoutException:
        state = driver.execute_script(_PAGE_STATE)
        logs = "\n".join(e["message"] for e in driver.get_log("browser"))
        failed = "\n".join(r.getMessage() for r in served.log.records)
        pytest.fail(
            f"{what}: still loading after {TIMEOUT} s: {state['loading']} ({state['busy']} busy); "
            f"page errors: {state['errors']}; dashboard log:\n{failed}\nbrowser console:\n{logs}"
        )


def _assert_clean(driver: Any, served: Served, state: dict[str, Any], what: str) -> None:
    """No error text on the page, no failed callback, nothing refused by the CSP, a quiet console."""
    shown = _ERROR_TEXT.search(state["text"])
    context = state["text"][max(0, shown.start() - 120) : shown.end() + 120] if shown else ""
    assert shown is None, f"{what}: error text on the page: …{context}…"
    assert state["errors"] == [], f"{what}: error lines on the page: {state['errors']}"
    assert state["csp"] == [], f"{what}: refused by the Content-Security-Policy: {state['csp']}"
    failed = [
        f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage() for r in served.log.records
    ]
    assert failed == [], f"{what}: the dashboard logged failures: {failed}"
    severe = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "favicon" not in e["message"]
    ]
    assert severe == [], f"{what}: browser console errors: {severe}"


def _pick_another(driver: Any, case: PageCase) -> str:
    """Choose the first option of ``case.control`` that is not chosen, as a user does; its label."""
    from selenium.webdriver.common.by import By

    if case.kind == "radio":
        radio = driver.find_element(By.CSS_SELECTOR, f"#{case.control} input[type=radio]:not(:checked)")
        label = radio.find_element(By.XPATH, "./ancestor::label[1]").text
        radio.click()
        return str(label)
    dropdown = driver.find_element(By.ID, case.control)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", dropdown)
    dropdown.click()  # opens the dropdown's list of options
    option = _wait(
        driver,
        f"the options of {case.control}",
        lambda d: d.execute_script(
            """const list = document.getElementById(arguments[0]).getAttribute('aria-controls');
            const box = list && document.getElementById(list);
            return box && box.querySelector('[role=option][aria-selected=false]');""",
            case.control,
        ),
    )
    label = str(option.text)
    _wait(driver, f"a click on {label!r} in {case.control}", lambda d: _clicked(d, option))
    return label


def _clicked(driver: Any, element: Any) -> bool:
    """Click ``element``, centred in its scrolled list first (a list's search box stays on top of
    the options scrolled under it); False while something else is over it (a list still opening)."""
    from selenium.common.exceptions import ElementClickInterceptedException

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    try:
        element.click()
    except ElementClickInterceptedException:
        return False
    return True


def test_every_registered_page_is_in_the_browser_test() -> None:
    assert {cls.path for cls in pages()} == {"/"} | {case.path for case in CASES}
    assert {case.analysis for case in CASES} == set(browser_runs.ANALYSES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_page_draws_its_run_and_answers_an_interaction(
    case: PageCase, served: Served, chromium: _Browser
) -> None:
    driver = chromium.driver()
    served.log.records.clear()
    driver.get(served.url(case.path, case.analysis))
    state = _settled(driver, served, f"{case.name} page")
    _assert_clean(driver, served, state, f"{case.name} page")
    for graph in case.drawn:
        drawn = driver.execute_script(_DRAWN, graph)
        assert drawn is not None, f"{case.name}: graph {graph} is not on the page"
        assert drawn["traces"] > 0, f"{case.name}: graph {graph} has no data: {drawn['messages']}"
        assert drawn["width"] > 50 and drawn["height"] > 50, (
            f"{case.name}: graph {graph} is not drawn: {drawn}"
        )
    before = driver.execute_script(_FINGERPRINT, case.watched)

    picked = _pick_another(driver, case)
    _wait(
        driver,
        f"{case.watched} to change after choosing {picked!r} in {case.control}",
        lambda d: (f := d.execute_script(_FINGERPRINT, case.watched)) is not None and f != before,
    )
    state = _settled(driver, served, f"{case.name} page after choosing {picked!r}")
    _assert_clean(driver, served, state, f"{case.name} page after choosing {picked!r}")


def test_home_page_lists_every_run_and_its_link_opens_the_run(served: Served, chromium: _Browser) -> None:
    from selenium.webdriver.common.by import By

    driver = chromium.driver()
    served.log.records.clear()
    driver.get(served.url("/"))
    state = _settled(driver, served, "home page")
    _assert_clean(driver, served, state, "home page")
    table = driver.find_element(By.ID, "runs-table").text
    assert all(run_id in table for run_id in served.ids.values()), table
    # Follow the ViT run's link (navigation inside the app, no reload): its page draws that run.
    driver.find_element(By.LINK_TEXT, served.ids["vit-heads"]).click()
    _wait(driver, "the ViT page", lambda d: d.current_url == served.url("/vit", "vit-heads"))
    state = _settled(driver, served, "ViT page opened from the home page")
    _assert_clean(driver, served, state, "ViT page opened from the home page")
    drawn = driver.execute_script(_DRAWN, "vit-importance")
    assert drawn is not None and drawn["traces"] > 0, drawn
    assert served.ids["vit-heads"] in driver.find_element(By.ID, "vit-run").text


def test_a_run_name_of_5000_characters_gets_a_message_not_an_error(
    served: Served, chromium: _Browser
) -> None:
    from selenium.webdriver.common.by import By

    driver = chromium.driver()
    served.log.records.clear()
    driver.get(served.url("/census") + "?run=" + "a" * 5000)
    state = _settled(driver, served, "census page with a long run name")
    message = driver.find_element(By.ID, "app-message").text
    assert "Ignored the URL's parameter 'run'" in message and "longer than 255 characters" in message
    assert "aaaa" not in state["text"]  # the name is not echoed
    # The newest census run is shown instead, and nothing failed.
    drawn = driver.execute_script(_DRAWN, "census-heatmap")
    assert drawn is not None and drawn["traces"] > 0, drawn
    state["errors"] = [e for e in state["errors"] if "Ignored the URL's parameter" not in e]
    _assert_clean(driver, served, state, "census page with a long run name")
