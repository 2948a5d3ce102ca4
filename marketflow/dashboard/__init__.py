"""The dashboard (contract: `GET /`): files inside this package, answered with their headers.

`respond(path, ...)` maps a request path to a `Reply` (status, headers, body) or None when the
path is not the dashboard's; the HTTP layer only wires it to a route. Pure apart from reading the
package's own files once (`Dashboard` caches them, compressed and uncompressed).

- `/` is index.html; `/assets/<name>` the page's own CSS and JavaScript modules, and the chart
  library under `/assets/vendor/` when `npm ci` put it into the (git-ignored) vendor folder.
  Without it the page is told so (an empty `data-chart-library`) and says "chart library not
  installed" instead of drawing the chart; everything else works.
- Every answer carries a Content-Security-Policy that allows the page's own origin only, no
  inline script or style and no eval; `X-Content-Type-Options: nosniff`; `Cache-Control:
  no-cache` with a strong ETag, so a browser revalidates (a 304) instead of running stale code
  after an upgrade. Text is gzip-compressed when the client accepts it (the chart library
  shrinks from ~200 kB to ~65 kB).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import re
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from typing import NamedTuple

CHART_LIBRARY = "vendor/lightweight-charts.mjs"
CHART_LICENSE = "vendor/LICENSE"
ASSETS_PREFIX = "/assets/"

# The page's own files: name under /assets/ -> content type. Nothing else is served.
_TYPES: Mapping[str, str] = {
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "board.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "health.js": "text/javascript; charset=utf-8",
    "mode.js": "text/javascript; charset=utf-8",
    "model.js": "text/javascript; charset=utf-8",
    CHART_LIBRARY: "text/javascript; charset=utf-8",
    CHART_LICENSE: "text/plain; charset=utf-8",
}
_HTML = "text/html; charset=utf-8"
# A Host header as browsers send it: name or IPv4 or [IPv6], optional port. Anything else is
# left out of the policy (then 'self' alone must cover the WebSocket, as CSP 3 browsers do).
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_GZIP_MIN_BYTES = 1024


class Reply(NamedTuple):
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class _File(NamedTuple):
    content_type: str
    body: bytes
    gzipped: bytes | None
    etag: str


def content_security_policy(host: str | None = None) -> str:
    """Only the page's own origin. `connect-src 'self'` covers same-origin ws:/wss: in CSP 3
    browsers; the explicit ws:// and wss:// forms of the request's host cover older ones."""
    connect = "'self'"
    if host and _HOST_RE.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; font-src 'self'; object-src 'none'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def library_notice(library: bytes) -> str:
    """The licence header of the chart library ("TradingView Lightweight Charts™ v5.2.1 ·
    Copyright (c) 2026 TradingView, Inc."), shown on the page as its licence asks."""
    head = library[:1024].decode("utf-8", "replace")
    match = re.match(r"\s*/\*!?(.*?)\*/", head, re.S)
    if not match:
        return "TradingView Lightweight Charts™ · Copyright (c) TradingView, Inc."
    lines = [line.strip(" *\t") for line in match.group(1).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("@license", "Licensed under"))]
    return " · ".join(kept)


class Dashboard:
    """The dashboard's files under `root` (the package folder by default), loaded once."""

    def __init__(self, root: Traversable | None = None) -> None:
        self.root = root or resources.files(__name__)
        self._files: dict[str, _File] | None = None

    @property
    def has_chart_library(self) -> bool:
        return CHART_LIBRARY in self._load()

    def respond(
        self,
        path: str,
        *,
        host: str | None = None,
        if_none_match: str | None = None,
        accept_encoding: str | None = None,
    ) -> Reply | None:
        """The answer to `GET path`, or None when `path` is not the dashboard's."""
        files = self._load()
        if path == "/":
            name = "index.html"
        elif path.startswith(ASSETS_PREFIX) and path[len(ASSETS_PREFIX) :] in files:
            name = path[len(ASSETS_PREFIX) :]
        else:
            return None
        file = files[name]
        gzipped = file.gzipped is not None and _accepts_gzip(accept_encoding)
        # A strong ETag names one representation: the gzipped body has its own.
        etag = file.etag[:-1] + '-gz"' if gzipped else file.etag
        headers = [
            ("Content-Security-Policy", content_security_policy(host)),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Cache-Control", "no-cache"),
            ("ETag", etag),
        ]
        if file.gzipped is not None:
            headers.append(("Vary", "Accept-Encoding"))
        if if_none_match and etag in (tag.strip() for tag in if_none_match.split(",")):
            return Reply(304, tuple(headers), b"")
        headers.append(("Content-Type", file.content_type))
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
            return Reply(200, tuple(headers), file.gzipped or b"")
        return Reply(200, tuple(headers), file.body)

    def _load(self) -> dict[str, _File]:
        if self._files is None:
            raw: dict[str, bytes] = {}
            for name in _TYPES:
                item = self.root.joinpath(*name.split("/"))
                if item.is_file():
                    raw[name] = item.read_bytes()
            library = raw.get(CHART_LIBRARY)
            page = self.root.joinpath("index.html").read_bytes()
            raw["index.html"] = render_index(page, library)
            types = {**_TYPES, "index.html": _HTML}
            self._files = {name: _file(types[name], body) for name, body in raw.items()}
        return self._files


def render_index(page: bytes, library: bytes | None) -> bytes:
    """index.html with the chart library's address (empty when it is not installed) and its
    attribution filled in."""
    if library is None:
        src, notice = "", "chart library not installed"
    else:
        src, notice = ASSETS_PREFIX + CHART_LIBRARY, library_notice(library)
    text = page.decode("utf-8")
    text = text.replace("{{chart_library}}", html.escape(src))
    text = text.replace("{{chart_notice}}", html.escape(notice))
    return text.encode("utf-8")


def _file(content_type: str, body: bytes) -> _File:
    gzipped = None
    if len(body) >= _GZIP_MIN_BYTES:
        gzipped = gzip.compress(body, compresslevel=9, mtime=0)
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _File(content_type, body, gzipped, etag)


def _accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether `Accept-Encoding` admits gzip (`gzip` or `*` with a q-value above 0)."""
    for part in (accept_encoding or "").split(","):
        coding, *params = (item.strip() for item in part.split(";"))
        if coding.lower() not in ("gzip", "*"):
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        return quality > 0
    return False


_default = Dashboard()


def respond(
    path: str,
    *,
    host: str | None = None,
    if_none_match: str | None = None,
    accept_encoding: str | None = None,
) -> Reply | None:
    """The packaged dashboard's answer to `GET path`, or None when the path is not its own."""
    return _default.respond(
        path, host=host, if_none_match=if_none_match, accept_encoding=accept_encoding
    )
