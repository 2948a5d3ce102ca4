"""The HTTP front (`api/http.py`): the route table's matching, limits and error shapes, on the
same ASGI app production runs."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio

from marketflow.api.app import create_app
from marketflow.api.http import MAX_BODY_BYTES, Reply, Request, Route, Router
from marketflow.config import build_config
from tests.unit.node_fakes import make_node


async def handler(req: Request) -> Reply:
    return Reply(200, orjson.dumps({"params": req.params}))


def test_router_matches_literals_and_parameters() -> None:
    router = Router(
        [
            Route("GET", "/prices/latest/{exchange}/{symbol}", handler),
            Route("GET", "/prices/latest/{symbol}", handler),
            Route("POST", "/mode/{name}", handler),
            Route("GET", "/mode", handler),
        ]
    )
    found = router.match("/prices/latest/ex1/BTCUSDT")
    assert found is not None and found[1] == ("ex1", "BTCUSDT") and set(found[0]) == {"GET"}
    assert router.match("/prices/latest/BTCUSDT")[1] == ("BTCUSDT",)  # type: ignore[index]
    assert router.match("/prices/latest/BTCUSDT/") is None  # an empty segment is no parameter
    assert router.match("/prices/latest//BTCUSDT") is None
    assert router.match("/prices/median/BTCUSDT") is None
    assert router.match("/mode/test")[0].keys() == {"POST"}  # type: ignore[index]
    assert router.match("/") is None


async def asgi_call(
    app: Any,
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: list[dict[str, Any]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request straight into the ASGI callable, messages as a server sends them."""
    sent: list[dict[str, Any]] = []
    incoming = list(body or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), *(headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "extensions": {},
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), data


@pytest.fixture
def app() -> Any:
    config = build_config({})
    return create_app(config, node=make_node(config))


async def test_an_oversized_announced_body_is_413_before_any_route(app: Any) -> None:
    status, headers, data = await asgi_call(
        app, "/prices/latest/BTCUSDT", headers=[(b"content-length", b"100000")]
    )
    assert status == 413 and orjson.loads(data) == {"error": "request body too large"}
    assert headers[b"x-request-id"]


async def test_a_chunked_body_is_capped_in_size(app: Any) -> None:
    chunk = {"type": "http.request", "body": b"x" * 4096, "more_body": True}
    body = [chunk] * (MAX_BODY_BYTES // 4096 + 2)
    status, _, _ = await asgi_call(
        app,
        "/mode/test",
        method="POST",
        headers=[(b"transfer-encoding", b"chunked")],
        body=body,
    )
    assert status == 413


async def test_a_chunked_body_is_capped_in_time(app: Any, autojump_clock: object) -> None:
    first = {"type": "http.request", "body": b"x", "more_body": True}  # then nothing more
    status, _, data = await asgi_call(
        app, "/health", headers=[(b"transfer-encoding", b"chunked")], body=[first]
    )
    assert status == 408 and orjson.loads(data)["error"]


async def test_head_answers_as_get_without_a_body(app: Any) -> None:
    status, headers, data = await asgi_call(app, "/prices/latest/BTCUSDT", method="HEAD")
    assert status == 200 and data == b"" and int(headers[b"content-length"]) > 0


async def test_not_ready_is_503_on_the_hot_routes(app: Any) -> None:
    config = build_config({})
    starting = create_app(config, node=make_node(config, ready=False))
    status, _, data = await asgi_call(starting, "/prices/latest/BTCUSDT")
    assert status == 503 and orjson.loads(data)["error"]
    status, _, data = await asgi_call(starting, "/health")
    assert status == 503 and orjson.loads(data)["status"] == "starting"
    status, _, data = await asgi_call(starting, "/health/ready")
    assert status == 503 and orjson.loads(data) == {"ready": False}
    status, _, data = await asgi_call(app, "/health/ready")
    assert status == 200 and orjson.loads(data) == {"ready": True}


async def test_a_bug_is_a_json_500_with_a_traceback_logged(
    app: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from marketflow import queries

    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(queries, "latest_across", broken)
    status, headers, data = await asgi_call(app, "/prices/latest/BTCUSDT")
    assert status == 500 and orjson.loads(data) == {"error": "internal error"}
    assert headers[b"content-length"] == str(len(data)).encode()
    assert any(r.exc_info and r.levelno == logging.ERROR for r in caplog.records)


async def test_every_route_logs_one_access_line_at_debug(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="marketflow.http")
    for path in ("/prices/latest/BTCUSDT", "/openapi.json", "/nope", "/prices/average/BTCUSDT"):
        await asgi_call(app, path, headers=[(b"x-request-id", b"acc-1")])
    lines = [r for r in caplog.records if r.getMessage() == "http request"]
    assert [(r.ctx["path"], r.ctx["status"]) for r in lines] == [  # type: ignore[attr-defined]
        ("/prices/latest/BTCUSDT", 200),
        ("/openapi.json", 200),
        ("/nope", 404),
        ("/prices/average/BTCUSDT", 200),
    ]
