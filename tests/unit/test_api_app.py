"""The HTTP API through the production ASGI app (the one route table), against a node built on
in-memory fakes.

The node is never run: it is marked ready by hand and its state filled by folding ticks.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.api.app import create_app
from marketflow.api.http import HttpApp
from marketflow.config import Config, build_config
from marketflow.models import MinuteRow
from marketflow.node import Node
from marketflow.queries import rfc3339
from marketflow.store.memory import MemoryAggregateStore
from tests.unit.node_fakes import MINUTE, NOW_MS, make_node

TOKEN = "s3cret-token"
STATS = ("highest", "lowest", "average")


def make_app(config: Config | None = None, *, ready: bool = True) -> tuple[HttpApp, Node]:
    config = config or build_config({})
    node = make_node(config, ready=ready)
    return create_app(config, node=node), node


async def call(app: HttpApp, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """One request through the ASGI app as a server would pass it (the path as sent)."""
    if "headers" in kwargs:  # as raw bytes, so tests can send what a client could (UTF-8 too)
        kwargs["headers"] = {k: v.encode() for k, v in kwargs["headers"].items()}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://marketflow") as client:
        request = client.build_request(method, "http://marketflow/", **kwargs)
        request.url = httpx.URL(request.url, raw_path=path.encode())
        response = await client.send(request)
    body = response.content
    json = response.headers.get("content-type") == "application/json"
    parsed = orjson.loads(body) if json and body else body
    return response.status_code, parsed, response.headers


# --- happy paths ---------------------------------------------------------------------------


async def test_latest_for_one_source() -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", "/prices/latest/test-exchange2/btcusdt")
    assert status == 200
    assert body == {
        "symbol": "BTCUSDT",
        "exchange": "test-exchange2",
        "price": 102.0,
        "timestamp": NOW_MS - 999,
        "time": rfc3339(NOW_MS - 999),
    }


async def test_latest_across_the_current_mode() -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", "/prices/latest/BTCUSDT")
    assert status == 200
    assert body["exchange"] == "test-exchange2"  # freshest of the test sources
    assert [s["exchange"] for s in body["sources"]] == ["test-exchange1", "test-exchange2"]


async def test_per_source_answers_work_for_the_other_mode() -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", "/prices/latest/exchange1/BTCUSDT")
    assert (status, body["price"]) == (200, 103.0)
    status, body, _ = await call(app, "GET", "/prices/highest/exchange1/BTCUSDT?period=1m")
    assert (status, body["price"], body["exchange"]) == (200, 103.0, "exchange1")


@pytest.mark.parametrize("stat", STATS)
async def test_statistics_across(stat: str) -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", f"/prices/{stat}/BTCUSDT?period=30s")
    assert status == 200
    assert body["exchange"] == "all" and body["period"] == "30s" and body["resolution"] == "1s"
    assert body["count"] == 4
    expected = {"highest": 102.0, "lowest": 100.0, "average": (100 + 101 + 101 + 102) / 4}
    assert body["price"] == pytest.approx(expected[stat])
    assert ("at" in body) == (stat != "average")


async def test_statistics_from_minutes_and_all_history() -> None:
    app, node = make_app()
    reader = node.minutes.store
    assert isinstance(reader, MemoryAggregateStore)
    reader.upsert(
        [MinuteRow("test-exchange1", "BTCUSDT", (MINUTE - 30) * 60_000, 2, 50.0, 20, 30, 20, 30)]
    )
    status, body, _ = await call(app, "GET", "/prices/lowest/BTCUSDT?period=1h")
    assert status == 200
    assert (body["price"], body["at"], body["count"], body["resolution"]) == (
        20.0,
        (MINUTE - 30) * 60_000,
        6,
        "1m",
    )
    status, body, _ = await call(app, "GET", "/prices/average/test-exchange1/BTCUSDT")
    assert status == 200
    assert body["period"] == "all"
    assert body["from"] == rfc3339((MINUTE - 30) * 60_000)
    assert body["price"] == pytest.approx((50 + 201) / 4)


async def test_postgres_down_is_503_unless_memory_covers() -> None:
    app, node = make_app()
    reader = node.minutes.store
    assert isinstance(reader, MemoryAggregateStore)
    reader.fail_with = OSError("connection refused")
    status, body, _ = await call(app, "GET", "/prices/average/BTCUSDT?period=1h")
    assert status == 503 and "PostgreSQL" in body["error"]
    status, body, _ = await call(app, "GET", "/prices/average/BTCUSDT?period=5m")
    assert status == 200


async def test_candles_across_the_current_mode_and_for_one_source() -> None:
    app, _ = make_app()
    second = NOW_MS // 1000 * 1000
    status, body, _ = await call(app, "GET", "/prices/candles/btcusdt?interval=1s")
    assert status == 200
    assert body == {
        "symbol": "BTCUSDT",
        "exchange": "all",
        "interval": "1s",
        "candles": [
            {
                "t": second - 5000,
                "open": 100.0,
                "high": 101.0,
                "low": 100.0,
                "close": 101.0,
                "average": 100.5,
                "count": 2,
                "closed": True,
            },
            {
                "t": second - 1000,
                "open": 101.0,
                "high": 102.0,
                "low": 101.0,
                "close": 102.0,
                "average": 101.5,
                "count": 2,
                "closed": False,  # ends 0.5 s before now: grace_ms (2 s) has not passed
            },
        ],
    }
    status, body, _ = await call(app, "GET", "/prices/candles/exchange1/BTCUSDT?interval=1h")
    assert status == 200 and body["exchange"] == "exchange1" and body["interval"] == "1h"
    [candle] = body["candles"]
    assert candle["t"] == MINUTE * 60_000 // 3_600_000 * 3_600_000
    assert (candle["open"], candle["close"], candle["count"]) == (102.0, 103.0, 2)
    status, body, _ = await call(app, "GET", "/prices/candles/ETHUSDT?interval=5m&limit=3")
    assert (status, body["candles"]) == (200, [])  # no tick, no candle


GOOD_CANDLES = [
    ("/prices/candles/BTCUSDT", "all", "1m"),
    ("/prices/candles/btcusdt?interval=1s&limit=1", "all", "1s"),
    ("/prices/candles/test-exchange1/BTCUSDT?interval=1h&end=2026-11-25T22:41:51.826Z", None, "1h"),
    ("/prices/candles/exchange1/BTCUSDT?interval=15s&start=0", None, "15s"),
    ("/prices/candles/BTCUSDT?interval=1w&start=0&end=9999999999999&limit=1000", "all", "1w"),
    ("/prices/candles/BTCUSDT?interval=1d&start=2026-11-26T00:41:51%2B02:00", "all", "1d"),
]


@pytest.mark.parametrize(("path", "label", "interval"), GOOD_CANDLES)
async def test_candle_queries_that_are_answered(
    path: str, label: str | None, interval: str
) -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", path)
    assert status == 200, body
    exchange = label or path.split("/")[3]
    assert (body["symbol"], body["exchange"], body["interval"]) == ("BTCUSDT", exchange, interval)
    assert isinstance(body["candles"], list) and "fallback" not in body


async def test_openapi_document_covers_every_route() -> None:
    app, _ = make_app()
    status, body, _ = await call(app, "GET", "/openapi.json")
    assert status == 200
    assert body["openapi"].startswith("3.")

    def shape(path: str) -> str:
        return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)

    documented = {shape(p) for p in body["paths"]}
    for route in app.router.routes:
        assert shape(route.pattern) in documented, route.pattern
    for path, item in body["paths"].items():
        for operation in item.values():
            assert "responses" in operation, path


async def test_request_id_is_echoed_or_generated() -> None:
    app, _ = make_app()
    _, _, headers = await call(
        app, "GET", "/prices/latest/BTCUSDT", headers={"X-Request-ID": "r-1"}
    )
    assert headers["X-Request-ID"] == "r-1"
    _, _, headers = await call(app, "GET", "/prices/latest/BTCUSDT")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    _, _, headers = await call(
        app, "GET", "/prices/latest/BTCUSDT", headers={"X-Request-ID": "bad id\u00e9"}
    )
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])


# --- bad input: a documented 4xx JSON error, never a 500 -----------------------------------

BAD_PERIODS = ["abc", "-1m", "0s", "1.5m", "10y", "99999999999d", "", "1m1m", "%00", "%FF"]
BAD_PERIODS += ["1%E2%80%8Bm", "%D9%A1m", "1m%20", "+1m"]  # zero-width space, Arabic 1

BAD_REQUESTS: list[tuple[str, str, int]] = [
    ("GET", "/prices/latest/B", 400),
    ("GET", "/prices/latest/XRPUSDT", 404),
    ("GET", "/prices/latest/ETHUSDT", 404),  # configured, no price yet
    ("GET", "/prices/latest/BTC-USDT", 400),
    ("GET", "/prices/latest/" + "A" * 5000, 400),
    ("GET", "/prices/latest/%00", 400),
    ("GET", "/prices/latest/%FF%FE", 400),
    ("GET", "/prices/latest/" + quote("\uff22\uff34\uff23"), 400),
    ("GET", "/prices/latest/BTC%0AUSDT", 400),
    ("GET", "/prices/latest/..%2F..", 400),
    ("GET", "/prices/latest/%2e%2e/%2e%2e", 400),
    ("GET", "/prices/latest/../../etc/passwd", 404),
    ("GET", "/prices/latest/exchange9/BTCUSDT", 404),
    ("GET", "/prices/latest/ex%20change/BTCUSDT", 400),
    ("GET", "/prices/latest/" + "e" * 33 + "/BTCUSDT", 400),
    ("GET", "/prices/latest/exchange1/XRPUSDT", 404),
    ("GET", "/prices/latest/exchange2/BTCUSDT", 404),  # configured, no data
    ("GET", "/prices/latest/BTCUSDT/", 404),
    ("GET", "/prices/median/BTCUSDT", 404),
    ("GET", "/nope", 404),
    ("POST", "/mode/banana", 404),
    ("POST", "/mode/" + "x" * 5000, 404),
]
for _stat in STATS:
    BAD_REQUESTS += [
        ("GET", f"/prices/{_stat}/B", 400),
        ("GET", f"/prices/{_stat}/XRPUSDT", 404),
        ("GET", f"/prices/{_stat}/ETHUSDT", 404),
        ("GET", f"/prices/{_stat}/ETHUSDT?period=5m", 404),
        ("GET", f"/prices/{_stat}/exchange9/BTCUSDT", 404),
        ("GET", f"/prices/{_stat}/bad%2Fname/BTCUSDT", 404),
        ("GET", f"/prices/{_stat}/bad.name/BTCUSDT", 400),
        ("GET", f"/prices/{_stat}/exchange2/BTCUSDT?period=1h", 404),
        ("GET", f"/prices/{_stat}/BTCUSDT?period=1m&period=2m", 400),
        ("GET", f"/prices/{_stat}/BTCUSDT?period", 400),
        *[("GET", f"/prices/{_stat}/BTCUSDT?period={p}", 400) for p in BAD_PERIODS],
        *[("GET", f"/prices/{_stat}/exchange1/BTCUSDT?period={p}", 400) for p in BAD_PERIODS],
    ]
BAD_REQUESTS += [
    ("GET", "/prices/candles/B", 400),
    ("GET", "/prices/candles/XRPUSDT", 404),
    ("GET", "/prices/candles/exchange9/BTCUSDT", 404),
    ("GET", "/prices/candles/bad.name/BTCUSDT", 400),
    ("GET", "/prices/candles/exchange1/XRPUSDT", 404),
    ("GET", "/prices/candles/BTCUSDT?interval=2m", 400),
    ("GET", "/prices/candles/BTCUSDT?interval=", 400),
    ("GET", "/prices/candles/BTCUSDT?interval=1m&interval=5m", 400),
    ("GET", "/prices/candles/BTCUSDT?start=10&end=10", 400),
    ("GET", "/prices/candles/BTCUSDT?start=20&end=10", 400),
    ("GET", "/prices/candles/BTCUSDT?limit=0", 400),
    ("GET", "/prices/candles/BTCUSDT?limit=1001", 400),
    ("GET", "/prices/candles/BTCUSDT?limit=5.5", 400),
    ("GET", "/prices/candles/BTCUSDT?start=yesterday", 400),
    ("GET", "/prices/candles/BTCUSDT?end=2026-13-01T00:00:00Z", 400),
    ("GET", "/prices/candles/BTCUSDT?interval=1s&end=1000", 400),  # before the window
    ("GET", "/prices/candles/test-exchange1/BTCUSDT?interval=15s&start=0&end=1000", 400),
]


@pytest.mark.parametrize(("method", "path", "status"), BAD_REQUESTS)
async def test_bad_input_is_a_json_4xx(method: str, path: str, status: int) -> None:
    app, _ = make_app()
    got, body, headers = await call(app, method, path, headers={"X-Request-ID": "bad-1"})
    assert got == status, body
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    assert headers["X-Request-ID"] == "bad-1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/prices/latest/BTCUSDT"),
        ("DELETE", "/prices/latest/exchange1/BTCUSDT"),
        ("PUT", "/prices/highest/BTCUSDT"),
        ("POST", "/prices/average/exchange1/BTCUSDT?period=5m"),
        ("PATCH", "/prices/lowest/BTCUSDT"),
        ("POST", "/openapi.json"),
        ("POST", "/health"),
        ("DELETE", "/metrics"),
        ("PUT", "/mode"),
        ("GET", "/mode/test"),
    ],
)
async def test_wrong_method_is_405_json(method: str, path: str) -> None:
    app, _ = make_app()
    status, body, headers = await call(app, method, path)
    assert status == 405
    assert body == {"error": "method not allowed"}
    assert headers["Allow"]
    assert headers["X-Request-ID"]


async def test_not_ready_is_503_but_bad_input_is_still_400() -> None:
    app, _ = make_app(ready=False)
    status, body, _ = await call(app, "GET", "/prices/latest/BTCUSDT")
    assert status == 503 and body["error"]
    status, _, _ = await call(app, "GET", "/prices/highest/BTCUSDT?period=5m")
    assert status == 503
    status, _, _ = await call(app, "GET", "/prices/latest/B")
    assert status == 400


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": TOKEN}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {TOKEN}x"}, 401),
        ({"Authorization": "Bearer \u00e9"}, 401),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ],
)
async def test_admin_token_guards_mode_changes(headers: dict[str, str], status: int) -> None:
    app, _ = make_app(build_config({"http": {"admin_token": TOKEN}}))
    got, body, _ = await call(app, "POST", "/mode/test", headers=headers)
    assert got == status
    if status == 401:
        assert body == {"error": "missing or wrong admin token"}
        assert TOKEN not in str(body)
    else:
        assert body["changed"] is False and body["mode"] == "test"


async def test_reads_need_no_admin_token() -> None:
    app, _ = make_app(build_config({"http": {"admin_token": TOKEN}}))
    status, _, _ = await call(app, "GET", "/prices/latest/BTCUSDT")
    assert status == 200


@settings(max_examples=150, deadline=None)
@given(
    segments=st.lists(st.text(max_size=40), min_size=1, max_size=2),
    stat=st.sampled_from(("latest", *STATS)),
    period=st.none() | st.text(max_size=12),
)
async def test_no_path_or_period_makes_a_500(
    segments: list[str], stat: str, period: str | None
) -> None:
    app, _ = make_app()
    path = f"/prices/{stat}/" + "/".join(quote(s, safe="") for s in segments)
    if period is not None:
        path += "?period=" + quote(period, safe="")
    status, body, _ = await call(app, "GET", path)
    assert status in (200, 400, 404), (path, body)
    assert isinstance(body, dict)
