"""The interactive dashboard: a Dash app over the runs under one root.

Background
----------
One page per analysis (:mod:`dashboard.pages`) plus a start page listing every run. The app reads
only run directories directly under its root, and pages name runs by run id, never by path
(:class:`dashboard.catalog.RunCatalog`); it listens on 127.0.0.1 unless told otherwise. Everything
it serves (Dash's scripts, plotly.js, the stylesheet) comes from the installed packages, so it
works offline.

Usage
-----
``headlab dashboard --root runs`` (see ``analyses/cli.py``), or::

    from dashboard.app import create_app
    app = create_app(Path("runs"))
    app.run(port=8050)
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from urllib.parse import parse_qsl

from dash import Dash, Input, Output, dcc, html
from dash.development.base_component import Component

from dashboard.catalog import RunCatalog
from dashboard.pages import PAGES, Page, Site
from dashboard.report import stylesheet

_INDEX = """<!DOCTYPE html>
<html lang="en">
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>__HEADLAB_CSS__</style>
    </head>
    <body>
        {%app_entry%}
        <footer>
            {%config%}
            {%scripts%}
            {%renderer%}
        </footer>
    </body>
</html>"""


def build_pages(root: Path) -> list[Page]:
    """One instance of every registered page, sharing one run catalog over ``root``."""
    catalog = RunCatalog(Path(root))
    paths = {name: cls.path for cls in PAGES for name in cls.shown_analyses()}
    site = Site(catalog=catalog, analysis_paths=paths)
    return [cls(site) for cls in PAGES]


def _shell(pages: list[Page], root: Path) -> Component:
    nav = html.Nav([dcc.Link(p.title, href=p.path, id=f"nav-{p.title.lower()}") for p in pages])
    return html.Div(
        [
            dcc.Location(id="url", refresh=False),
            html.Header(
                [
                    dcc.Link("headlab", href="/", className="brand"),
                    nav,
                    html.Span(f"runs: {root}", className="root"),
                ],
                className="topbar",
            ),
            html.Div(id="page-content"),
        ]
    )


def create_app(root: Path) -> Dash:
    """The dashboard over the runs under ``root`` (a root with no runs is fine: pages say so)."""
    root = Path(root).expanduser()
    pages = build_pages(root)
    by_path = {p.path: p for p in pages}
    app = Dash(
        __name__,
        title="headlab",
        update_title="",  # no 'Updating...' flashing in the tab title
        assets_folder=str(Path(__file__).parent / "assets"),  # none today; never the caller's cwd
        serve_locally=True,
    )
    app.index_string = _INDEX.replace("__HEADLAB_CSS__", stylesheet())
    shell = _shell(pages, root)
    app.layout = shell
    # Every page's elements, so that Dash checks callback ids against them (ids typos fail early).
    app.validation_layout = html.Div([shell, *(p.layout({}) for p in pages)])  # type: ignore[assignment]

    @app.callback(Output("page-content", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None) -> Component:
        page = by_path.get((pathname or "/").rstrip("/") or "/")
        if page is None:
            return html.Div(
                [html.H2("Not found"), html.P(f"No page at {pathname}."), dcc.Link("all runs", href="/")],
                className="page",
            )
        params = dict(parse_qsl((search or "").lstrip("?")))
        return page.layout(params)

    for page in pages:
        page.register_callbacks(app)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(root: Path, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard over ``root`` until interrupted."""
    app = create_app(root)
    if not _is_loopback(host):
        print(
            f"warning: listening on {host}: anyone who can reach this machine on port {port} can read "
            f"the runs under {root}; use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
        )
    print(
        f"headlab dashboard over {root}: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    )
    app.run(host=host, port=port, debug=False)
