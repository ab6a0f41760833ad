"""The census page in a real headless browser (Debian's chromium driven by selenium).

The app is served on 127.0.0.1 on a free port from a background thread; the browser loads the
census page, changes the metric, and clicks a head with the mouse (at the cell's pixel position,
computed from plotly's axes), then checks what the page shows. Missing selenium or chromium is a
failure naming the fix (``bash scripts/browser-deps.sh``), never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import probe
from analyses import runstore
from analyses.census import CensusConfig, run_census
from dashboard.app import create_app
from dashboard.views import census as views

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FIX = (
    "install them with `bash scripts/browser-deps.sh` (as root; it apt-installs chromium and chromium-driver)"
)
SMALL = CensusConfig(n_natural=4, n_repeated=2, seq_len=32, repeat_len=8, n_examples=2)
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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The dashboard over a root with one tiny census run: (base URL, run directory)."""
    from werkzeug.serving import make_server

    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runstore, "code_revision", lambda source_dir=None: "0" * 40)
        model = probe.load_model("tiny-llama", device="cpu")
        run = run_census(model, SMALL, progress=False).save(root)
    server = make_server("127.0.0.1", 0, create_app(root).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="headlab-dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", run
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _wait(driver: Any, what: str, condition: Callable[[Any], T]) -> T:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(condition)  # type: ignore[no-any-return]
    except TimeoutException:
        logs = "\n".join(e["message"] for e in driver.get_log("browser"))
        pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}; browser console:\n{logs}")


def _heatmap(driver: Any) -> dict[str, Any] | None:
    """The census map as plotted: its title, z values and outlined cell (None until drawn)."""
    return driver.execute_script(  # type: ignore[no-any-return]
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
    return driver.execute_script(  # type: ignore[no-any-return]
        """
        const gd = document.querySelector('#census-pattern .js-plotly-plot');
        return gd && gd.data && gd.data.length && gd.data[0].type === 'image' ? gd.data[0].source : null;
        """
    )


def _detail(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const el = document.getElementById('census-head-detail'); return el ? el.innerText : ''"
        )
    )


def test_census_page_metric_change_and_head_click_update_the_map_detail_and_pattern(
    served: tuple[str, Path],
) -> None:
    base, run = served
    heads = runstore.open_run(run).heads
    with _chromium() as browser:  # fails first, naming the fix, when selenium or chromium is missing
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        browser.get(f"{base}/census?run={run.name}")

        first = _wait(browser, "the census heat map", lambda d: _heatmap(d))
        assert "induction score" in first["title"]  # the default metric
        top = views.top_head(heads, "induction")
        detail = _wait(
            browser, "the top head's detail", lambda d: _detail(d) if str(top) in _detail(d) else None
        )
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

        # Click another head with the mouse, at its cell's pixel position on the plot.
        last = views.Head(int(heads["layer"].max()), int(heads["head"].max()))
        target = last if last != top else views.Head(0, 0)
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
            "a new pattern image",
            lambda d: s if (s := _pattern_source(d)) != first_pattern else None,
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
