"""The ASGI fast path answers exactly what the Quart routes answer, for good and bad input."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from marketflow.api.app import create_app
from marketflow.api.fast import FastRoutes
from marketflow.config import build_config
from tests.unit.service_fakes import make_service
from tests.unit.test_api_app import BAD_REQUESTS, STATS

GOOD = [
    "/prices/latest/BTCUSDT",
    "/prices/latest/btcusdt",
    "/prices/latest/test-exchange1/BTCUSDT",
    "/prices/latest/exchange1/BTCUSDT",
    *[f"/prices/{s}/BTCUSDT" for s in STATS],
    *[f"/prices/{s}/BTCUSDT?period=30s" for s in STATS],
    *[f"/prices/{s}/BTCUSDT?period=1h" for s in STATS],
    *[f"/prices/{s}/test-exchange1/BTCUSDT?period=5m" for s in STATS],
    "/prices/candles/BTCUSDT",
    "/prices/candles/btcusdt?interval=1s&limit=1",
    "/prices/candles/test-exchange1/BTCUSDT?interval=1h&end=2026-11-25T22:41:51.826Z",
    "/prices/candles/exchange1/BTCUSDT?interval=15s&start=0",
    "/prices/candles/BTCUSDT?interval=1w&start=0&end=9999999999999&limit=1000",
]
PATHS = GOOD + [path for method, path, _ in BAD_REQUESTS if method == "GET"]


async def fast_call(
    fast: FastRoutes, target: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, Any, dict[bytes, bytes], bool]:
    path, _, query = target.partition("?")
    sent: list[dict[str, Any]] = []
    passed_through = False

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"x-request-id", b"req-1"), *(extra_headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "extensions": {},
    }
    original = fast.app

    async def quart(scope: Any, receive: Any, send: Any) -> None:
        nonlocal passed_through
        passed_through = True
        await original(scope, receive, send)

    fast.app = quart
    fast.app.extensions = original.extensions  # type: ignore[attr-defined]
    try:
        await fast(scope, receive, send)
    finally:
        fast.app = original
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], orjson.loads(body), dict(start["headers"]), passed_through


@pytest.mark.parametrize("target", PATHS)
async def test_fast_path_equals_quart(target: str) -> None:
    config = build_config({})
    service = make_service(config)
    app = create_app(config, service=service)
    fast = FastRoutes(app, config)
    async with app.test_app():
        response = await app.test_client().get(target, headers={"X-Request-ID": "req-1"})
        want_status = response.status_code
        want_body = orjson.loads(await response.get_data())
        status, body, headers, passed_through = await fast_call(fast, target)
    assert status == want_status
    if status == 200:
        assert body == want_body
    else:  # the same refusal; an undecodable query may be quoted differently in the message
        assert body.keys() == want_body.keys() == {"error"}
    assert headers[b"x-request-id"] == b"req-1"
    assert headers[b"content-type"] == b"application/json"
    if target in GOOD:
        assert status == 200 and not passed_through


async def test_not_ready_falls_through_to_quart() -> None:
    config = build_config({})
    service = make_service(config, ready=False)
    app = create_app(config, service=service)
    fast = FastRoutes(app, config)
    async with app.test_app():
        status, body, _, passed_through = await fast_call(fast, "/prices/latest/BTCUSDT")
    assert passed_through and status == 503 and body["error"]


async def test_a_get_with_a_body_goes_to_quart_and_its_limits() -> None:
    config = build_config({})
    service = make_service(config)
    app = create_app(config, service=service)
    fast = FastRoutes(app, config)
    async with app.test_app():
        status, body, _, passed_through = await fast_call(
            fast, "/prices/latest/BTCUSDT", [(b"content-length", b"100000")]
        )
    assert passed_through and status == 413 and body["error"]


async def test_a_bug_is_a_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    from marketflow import queries

    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(queries, "latest_across", broken)
    config = build_config({})
    service = make_service(config)
    app = create_app(config, service=service)
    fast = FastRoutes(app, config)
    async with app.test_app():
        status, body, headers, _ = await fast_call(fast, "/prices/latest/BTCUSDT")
    assert status == 500 and body == {"error": "internal error"}
    assert headers[b"content-length"] == str(len(orjson.dumps(body))).encode()
