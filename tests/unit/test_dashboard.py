"""The dashboard's files and headers (`marketflow.dashboard.respond`), and its temporary route."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import pytest

import marketflow.dashboard as dashboard
from marketflow.dashboard import CHART_LIBRARY, Dashboard, content_security_policy, respond
from tests.unit.test_api_app import call, make_app

PACKAGE = Path(dashboard.__file__).parent
LIBRARY_HEAD = (
    b"/*!\n * @license\n * TradingView Lightweight Charts\xe2\x84\xa2 v9.9.9\n"
    b" * Copyright (c) 2099 TradingView, Inc.\n"
    b" * Licensed under Apache License 2.0 https://www.apache.org/licenses/LICENSE-2.0\n */\n"
)


@pytest.fixture
def packaged(tmp_path: Path) -> Path:
    """A copy of the dashboard's own files, without vendor/ (as a plain `pip install .`)."""
    root = tmp_path / "dashboard"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("vendor", "__pycache__"))
    return root


def headers(reply: dashboard.Reply) -> dict[str, str]:
    return dict(reply.headers)


def test_index_carries_a_same_origin_policy_and_no_inline_code(packaged: Path) -> None:
    reply = Dashboard(packaged).respond("/", host="127.0.0.1:8080")
    assert reply is not None and reply.status == 200
    h = headers(reply)
    assert h["Content-Type"] == "text/html; charset=utf-8"
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Cache-Control"] == "no-cache"
    policy = dict(d.strip().split(" ", 1) for d in h["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    page = reply.body.decode()
    assert "<script>" not in page and "<style" not in page and " style=" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers
    assert re.findall(r'<script[^>]*src="([^"]+)"', page) == ["/assets/app.js"]
    # Everything the page loads is its own (the TradingView link is only a link).
    loaded = re.findall(r'<(?:link|script|img)[^>]*(?:src|href)="([^"]+)"', page)
    assert loaded and all(url.startswith(("/assets/", "data:")) for url in loaded), loaded


@pytest.mark.parametrize(
    "host", ["evil.com; script-src *", "a b", "x" * 300, "'self'", "[::1]:8080\r\nX: y"]
)
def test_a_strange_host_header_stays_out_of_the_policy(host: str) -> None:
    policy = content_security_policy(host)
    assert policy == content_security_policy(None)
    assert "connect-src 'self';" in policy


def test_ipv6_host_gets_its_websocket_forms() -> None:
    assert "ws://[::1]:8080 wss://[::1]:8080" in content_security_policy("[::1]:8080")


def test_without_the_library_the_page_says_so(packaged: Path) -> None:
    board = Dashboard(packaged)
    assert not board.has_chart_library
    page = board.respond("/")
    assert page is not None
    assert b'data-chart-library=""' in page.body
    assert b"chart library not installed" in page.body
    assert board.respond("/assets/" + CHART_LIBRARY) is None
    assert board.respond("/assets/app.js") is not None


def test_with_the_library_the_page_names_it_and_its_licence(packaged: Path) -> None:
    (packaged / "vendor").mkdir()
    (packaged / "vendor" / "lightweight-charts.mjs").write_bytes(LIBRARY_HEAD + b"export {};")
    (packaged / "vendor" / "LICENSE").write_text("Apache License\n")
    board = Dashboard(packaged)
    assert board.has_chart_library
    page = board.respond("/")
    assert page is not None
    assert b'data-chart-library="/assets/vendor/lightweight-charts.mjs"' in page.body
    assert "TradingView Lightweight Charts™ v9.9.9 · Copyright (c) 2099 TradingView, Inc." in (
        page.body.decode()
    )
    library = board.respond("/assets/vendor/lightweight-charts.mjs")
    assert library is not None
    assert headers(library)["Content-Type"] == "text/javascript; charset=utf-8"
    licence = board.respond("/assets/vendor/LICENSE")
    assert licence is not None and headers(licence)["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/assets/",
        "/assets/../__init__.py",
        "/assets/__init__.py",
        "/assets/vendor/.installed",
        "/assets//app.js",
        "/assets/APP.JS",
        "/prices/latest/BTCUSDT",
        "",
    ],
)
def test_only_its_own_files_are_served(packaged: Path, path: str) -> None:
    assert Dashboard(packaged).respond(path) is None


def test_every_module_the_page_imports_is_served(packaged: Path) -> None:
    """A new JavaScript module must be added to the served list, or the page breaks."""
    board = Dashboard(packaged)
    for script in packaged.glob("*.js"):
        assert board.respond(f"/assets/{script.name}") is not None, script.name
        for name in re.findall(r"from '\./([\w.]+)'", script.read_text()):
            assert (packaged / name).is_file(), (script.name, name)
            assert board.respond(f"/assets/{name}") is not None, (script.name, name)
    # Each imported module is preloaded by the page, so they load in one round, not a chain.
    index = (packaged / "index.html").read_text()
    preloaded = set(re.findall(r'<link rel="modulepreload" href="/assets/([\w.]+)">', index))
    assert preloaded == {p.name for p in packaged.glob("*.js")} - {"app.js"}


def test_revalidation_answers_304_and_gzip_when_accepted(packaged: Path) -> None:
    board = Dashboard(packaged)
    plain = board.respond("/assets/board.js")
    assert plain is not None
    etag = headers(plain)["ETag"]
    assert board.respond("/assets/board.js", if_none_match=etag) == (
        304,
        plain.headers[: len(plain.headers) - 1],  # everything but Content-Type
        b"",
    )
    assert board.respond("/assets/board.js", if_none_match='"other"') == plain

    zipped = board.respond("/assets/board.js", accept_encoding="br, gzip;q=0.8")
    assert zipped is not None
    h = headers(zipped)
    assert h["Content-Encoding"] == "gzip" and h["Vary"] == "Accept-Encoding"
    assert h["ETag"] != etag  # another representation, another tag
    assert gzip.decompress(zipped.body) == plain.body
    for refused in ("gzip;q=0", "br", "identity", ""):
        reply = board.respond("/assets/board.js", accept_encoding=refused)
        assert reply is not None and reply.body == plain.body, refused


def test_the_packaged_default_serves_the_page() -> None:
    reply = respond("/")
    assert reply is not None and reply.status == 200
    assert b'<script type="module" src="/assets/app.js">' in reply.body


async def test_the_route_serves_the_page_with_its_headers() -> None:
    app, _ = make_app()
    status, body, h = await call(app, "GET", "/", headers={"Host": "example.test:8080"})
    assert status == 200
    assert h["Content-Type"] == "text/html; charset=utf-8"
    assert "ws://example.test:8080" in h["Content-Security-Policy"]
    assert h["X-Request-ID"]
    assert b"<title>marketflow</title>" in body
    status, body, h = await call(app, "GET", "/assets/style.css")
    assert status == 200 and h["Content-Type"] == "text/css; charset=utf-8"
    status, again, _ = await call(
        app, "GET", "/assets/style.css", headers={"If-None-Match": h["ETag"]}
    )
    assert status == 304 and again == b""
    status, body, _ = await call(app, "GET", "/assets/nothing.js")
    assert status == 404 and body == {"error": "not found"}
