"""The interactive dashboard: a Dash app over the runs under one root.

Background
----------
One page per analysis (each in its folder, listed by :mod:`dashboard.registry`) plus a start page
listing every run and sweep. The app reads only run directories directly under its root (and the
sweeps' manifests under its ``.sweeps``), and pages name runs by run id, never by path
(:class:`dashboard.catalog.RunCatalog`); it listens on 127.0.0.1 unless told otherwise. Everything
it serves (Dash's scripts, plotly.js, the stylesheet) comes from the installed packages, so it
works offline.

Every request passes :class:`RequestGuard` first: a request whose ``Host`` header does not name the
address the dashboard listens on is refused (HTTP 400), so that a web page whose DNS name is
rebound to 127.0.0.1 cannot read the runs; every response carries headers that keep other sites
from framing the pages, reading their responses or running scripts in them
(:data:`SECURITY_HEADERS`, and a Content-Security-Policy that allows only the app's own scripts).
A callback that fails puts a one-line message on the page (the traceback goes to the server's log,
never to the browser), and URL parameters too long to name anything are ignored with a message.

Usage
-----
``headlab dashboard --root runs`` (see ``headlab/cli.py``), or::

    from dashboard.app import create_app
    app = create_app(Path("runs"), port=8050)
    app.run(port=8050)

``allowed_hosts`` (``--allowed-host``) adds names the dashboard is reached under besides the address
it listens on, e.g. the port of an SSH tunnel (``localhost:9000``) or a proxy's name.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from dash import Dash, Input, Output, ctx, dcc, html, set_props
from dash.development.base_component import Component
from werkzeug.exceptions import InternalServerError

from dashboard.catalog import RunCatalog
from dashboard.core.page import Page, Site
from dashboard.registry import pages
from dashboard.report import stylesheet
from probe.errors import ConfigError

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

log = logging.getLogger("headlab.dashboard")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listening on every interface
MAX_PARAM = 255  # the longest URL parameter a page reads: a run id is a directory name (NAME_MAX)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
"""Headers on every response; :func:`content_security_policy` adds the Content-Security-Policy."""

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def content_security_policy(script_hashes: Iterable[str]) -> str:
    """The policy the pages run under: scripts, styles, fonts and requests only from the dashboard
    itself, plus Dash's inline start-up script (by its hash; no other inline script, no ``eval``);
    images also as ``data:`` URLs (the attention patterns); no framing by any site, no plugins, no
    ``<base>``. Styles may be inline: plotly and Dash set element styles from script."""
    directives = {
        "default-src": ["'self'"],
        "script-src": ["'self'", *script_hashes],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:", "blob:"],
        "font-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(values)}" for name, values in directives.items())


def _host_name(name: str) -> str | None:
    """A host name lower-cased without a trailing dot, an IP address in its canonical form (IPv6
    without brackets); None when it cannot be one."""
    name = name.strip().lower().rstrip(".")
    if not name or any(c.isspace() or c in "/\\@?#[]" for c in name):
        return None
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None if ":" in name else name


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (``name``, ``name:port``, ``[IPv6]:port``) as (name, port or None), the name
    as :func:`_host_name` writes it; None when it is malformed."""
    value = value.strip()
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")) or ":" not in inside:
            return None
        name, port = inside, (rest[1:] if rest else None)
    else:
        name, colon, port_text = value.partition(":")
        port = port_text if colon else None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    normal = _host_name(name)
    return None if normal is None else (normal, int(port) if port is not None else None)


def allowed_host_names(host: str) -> frozenset[str]:
    """The names a browser may use to reach a dashboard listening on ``host``: the loopback names
    for a loopback address; for every interface (0.0.0.0, ::) those and this machine's host name;
    else ``host`` itself."""
    if _is_loopback(host):
        names = {*LOOPBACK_NAMES, host}
    elif host in WILDCARD_HOSTS:
        names = {*LOOPBACK_NAMES, socket.gethostname()}
    else:
        names = {host}
    return frozenset(normal for n in names if (normal := _host_name(n)) is not None)


@dataclass(frozen=True)
class RequestGuard:
    """WSGI middleware in front of the dashboard's Flask server: answers a request whose ``Host``
    header is not allowed with HTTP 400 and a one-line plain-text message, and puts the security
    headers on every response (replacing any the app set).

    ``names``: the host names allowed on the dashboard's ``port`` (None: on any port, for an app
    whose port is not known); ``pairs``: (name, port) pairs allowed as they are."""

    app: WsgiApp
    names: frozenset[str]
    port: int | None
    pairs: frozenset[tuple[str, int]]
    headers: tuple[tuple[str, str], ...]

    def allows(self, host_header: str | None) -> bool:
        split = _split_host(host_header) if host_header else None
        if split is None:
            return False
        name, port = split
        if self.port is None:
            return name in self.names or any(name == n for n, _ in self.pairs)
        return (name in self.names and (port or 80) == self.port) or (name, port or 80) in self.pairs

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if not self.allows(host):
            shown = "none" if host is None else repr(host[:100])
            body = (
                f"headlab dashboard: refused a request for host {shown}: it answers only to the address it "
                "listens on (start it with --allowed-host NAME to allow another name)\n"
            ).encode()
            start_response(
                "400 Bad Request",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    *self.headers,
                ],
            )
            return [body]
        ours = {name.lower() for name, _ in self.headers}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            kept = [(k, v) for k, v in headers if k.lower() not in ours]
            return start_response(status, kept + list(self.headers), exc_info)

        return self.app(environ, start)


def guard(
    app: Dash, host: str = "127.0.0.1", port: int | None = None, allowed_hosts: Iterable[str] = ()
) -> RequestGuard:
    """Put a :class:`RequestGuard` in front of ``app``'s server (call once the app's callbacks are
    registered: the policy allows the inline scripts by their hashes)."""
    names = set(allowed_host_names(host))
    pairs = set()
    for extra in allowed_hosts:
        bare_ipv6 = _host_name(extra) if extra.count(":") > 1 else None  # ::1, without brackets or port
        split = (bare_ipv6, None) if bare_ipv6 else _split_host(extra)
        if split is None:
            raise ConfigError(
                f"allowed host {extra!r} is not a host name or address with an optional :port "
                "(e.g. localhost:9000 or dashboard.example.org)"
            )
        if split[1] is None:
            names.add(split[0])
        else:
            pairs.add((split[0], split[1]))
    headers = (*SECURITY_HEADERS, ("Content-Security-Policy", content_security_policy(app.csp_hashes())))
    wrapped = RequestGuard(app.server.wsgi_app, frozenset(names), port, frozenset(pairs), headers)
    app.server.wsgi_app = wrapped
    return wrapped


def build_pages(root: Path) -> list[Page]:
    """One instance of every registered page, sharing one run catalog over ``root``."""
    catalog = RunCatalog(Path(root))
    classes = pages()
    paths = {name: cls.path for cls in classes for name in cls.shown_analyses()}
    site = Site(catalog=catalog, analysis_paths=paths)
    return [cls(site) for cls in classes]


def _ignored_message(keys: list[str]) -> Component | None:
    """The line saying which URL parameters were ignored as too long to name anything (None: none)."""
    if not keys:
        return None
    named = ", ".join(repr(k) if len(k) <= 40 else f"{k[:40]!r}…" for k in keys)
    return html.P(
        f"Ignored the URL's parameter {named}: longer than {MAX_PARAM} characters, so it names no run or "
        "setting.",
        className="error",
    )


def _what(err: BaseException) -> str:
    """What went wrong, in words that leak no path or value: an OSError's reason, else the type."""
    return err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__


def _callback_failed(err: Exception) -> None:
    """Dash's handler of an exception in any callback: the traceback to the server's log, one line
    on the page (the outputs keep their values)."""
    listed = ctx.outputs_list if isinstance(ctx.outputs_list, list) else [ctx.outputs_list]
    outputs = ", ".join(str(o["id"]) for o in listed if isinstance(o, dict) and "id" in o)
    log.error("dashboard callback for %s failed", outputs or "?", exc_info=err)
    what = _what(err)
    set_props(
        "app-message",
        {
            "children": html.P(
                f"Something went wrong while updating {outputs or 'the page'} ({what}); the dashboard's log "
                "has the details. Pick another run or reload the page.",
                className="error",
            )
        },
    )


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
            html.Div(id="app-message", role="alert", style={"padding": "0 24px"}),
            html.Div(id="page-content"),
        ]
    )


def create_app(
    root: Path, *, host: str = "127.0.0.1", port: int | None = None, allowed_hosts: Iterable[str] = ()
) -> Dash:
    """The dashboard over the runs under ``root`` (a root with no runs is fine: pages say so).

    It answers only requests for the address it listens on, ``host`` (with ``port``; None: any
    port), or for one of ``allowed_hosts`` (``name`` or ``name:port``); see :class:`RequestGuard`."""
    root = Path(root).expanduser()
    pages = build_pages(root)
    by_path = {p.path: p for p in pages}
    app = Dash(
        __name__,
        title="headlab",
        update_title="",  # no 'Updating...' flashing in the tab title
        assets_folder=str(Path(__file__).parent / "assets"),  # none today; never the caller's cwd
        serve_locally=True,
        on_error=_callback_failed,
    )
    app.index_string = _INDEX.replace("__HEADLAB_CSS__", stylesheet())
    shell = _shell(pages, root)
    app.layout = shell
    # Every page's elements, so that Dash checks callback ids against them (ids typos fail early).
    app.validation_layout = html.Div([shell, *(p.layout({}) for p in pages)])  # type: ignore[assignment]

    @app.callback(Output("page-content", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None) -> Component:
        params = dict(parse_qsl((search or "").lstrip("?")))
        too_long = [key for key in params if len(key) > MAX_PARAM or len(params[key]) > MAX_PARAM]
        for key in too_long:
            params.pop(key)
        # The message line under the top bar: cleared on every visit, unless a parameter was ignored.
        set_props("app-message", {"children": _ignored_message(too_long)})
        path = (pathname or "/").rstrip("/") or "/"
        page = by_path.get(path)
        if page is None:
            shown = path if len(path) <= MAX_PARAM else f"{path[:60]}… ({len(path):,} characters)"
            return html.Div(
                [html.H2("Not found"), html.P(f"No page at {shown}."), dcc.Link("all runs", href="/")],
                className="page",
            )
        try:
            return page.layout(params)
        except Exception as err:  # never a traceback in the browser: a message, and the log
            log.exception("dashboard page %s failed to draw", path)
            return html.Div(
                [
                    html.H2(page.title),
                    html.P(
                        f"This page could not be drawn ({_what(err)}); the dashboard's log has the details.",
                        className="error",
                    ),
                    dcc.Link("all runs", href="/"),
                ],
                className="page",
            )

    for page in pages:
        page.register_callbacks(app)

    @app.server.errorhandler(InternalServerError)
    def internal_error(err: InternalServerError) -> tuple[str, int, dict[str, str]]:
        return (
            "headlab dashboard: internal error; the dashboard's log has the details\n",
            500,
            {"Content-Type": "text/plain; charset=utf-8"},
        )

    guard(app, host, port, allowed_hosts)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(root: Path, host: str = "127.0.0.1", port: int = 8050, allowed_hosts: Iterable[str] = ()) -> None:
    """Serve the dashboard over ``root`` until interrupted (``allowed_hosts``: see :func:`create_app`)."""
    allowed_hosts = list(allowed_hosts)
    app = create_app(root, host=host, port=port, allowed_hosts=allowed_hosts)
    if not _is_loopback(host):
        print(
            f"warning: listening on {host}: anyone who can reach this machine on port {port} can read "
            f"the runs under {root}; use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
        )
    if host in WILDCARD_HOSTS and not allowed_hosts:
        print(
            f"note: requests are answered only for {', '.join(sorted(allowed_host_names(host)))} on port "
            f"{port}; add the names others use to reach this machine with --allowed-host NAME",
            file=sys.stderr,
        )
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else f"[{host}]" if ":" in host else host
    print(f"headlab dashboard over {root}: http://{shown}:{port}/")
    app.run(host=host, port=port, debug=False)
