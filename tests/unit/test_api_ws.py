"""`WS /ws/prices` through Quart's test client, with the node's hub running."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
from quart.typing import TestWebsocketConnectionProtocol as WebSocket
from quart.wrappers.base import ClientDisconnectedError
from quart_trio import QuartTrio
from trio.testing import MockClock

from marketflow.api.app import create_app
from marketflow.config import build_config
from marketflow.node import Node
from tests.unit.node_fakes import NOW_MS, make_node


@pytest.fixture
async def served() -> AsyncIterator[tuple[QuartTrio, Node]]:
    config = build_config({"app": {"ws_min_interval_ms": 100, "ws_max_lag_s": 2}})
    node = make_node(config)
    app = create_app(config, node=node).fallback  # WebSocket connections go to Quart-Trio
    assert isinstance(app, QuartTrio)
    async with app.test_app(), trio.open_nursery() as nursery:
        await nursery.start(node.hub.run, node.stopping)  # as Node.run does
        yield app, node
        nursery.cancel_scope.cancel()


OLD_CLIENT_TYPES = {"snapshot", "prices", "error"}


async def receive(ws: WebSocket) -> dict[str, Any]:
    """The next frame as a client written before protocol v1 sees it: it ignores the `seq`
    field and the frame types it does not know (ack, heartbeat, ...)."""
    while True:
        with trio.fail_after(5):
            data = await ws.receive()
        frame = orjson.loads(data)
        assert isinstance(frame, dict) and isinstance(frame.pop("seq"), int)
        if frame["type"] in OLD_CLIENT_TYPES:
            return frame


async def closed_with(ws: WebSocket) -> int:
    with trio.fail_after(5), pytest.raises(ClientDisconnectedError) as info:
        while True:
            await ws.receive()
    code = info.value.args[0]
    assert isinstance(code, int)
    return code


def keys(frame: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["exchange"], e["symbol"]) for e in frame["data"]]


async def test_snapshot_then_coalesced_prices(
    served: tuple[QuartTrio, Node], autojump_clock: MockClock
) -> None:
    app, node = served
    async with app.test_client().websocket("/ws/prices") as ws:
        snapshot = await receive(ws)
        assert snapshot["type"] == "snapshot"
        assert keys(snapshot) == [("test-exchange1", "BTCUSDT"), ("test-exchange2", "BTCUSDT")]
        assert snapshot["data"][0] == {
            "symbol": "BTCUSDT",
            "exchange": "test-exchange1",
            "price": 101.0,
            "timestamp": NOW_MS - 1000,
        }
        key = node.state.key("test-exchange1", "ETHUSDT")
        for i in range(5):  # five ticks in one interval: one entry, the latest
            key.fold([("ETHUSDT", 3000.0 + i, NOW_MS + i)])
        node.state.key("exchange1", "ETHUSDT").fold([("ETHUSDT", 1.0, NOW_MS)])  # not in mode
        frame = await receive(ws)
        assert frame == {
            "type": "prices",
            "data": [
                {
                    "symbol": "ETHUSDT",
                    "exchange": "test-exchange1",
                    "price": 3004.0,
                    "timestamp": NOW_MS + 4,
                }
            ],
        }


async def test_query_filters_the_subscription(
    served: tuple[QuartTrio, Node], autojump_clock: MockClock
) -> None:
    app, node = served
    path = "/ws/prices?symbols=btcusdt&exchanges=exchange1,test-exchange2"
    async with app.test_client().websocket(path) as ws:
        snapshot = await receive(ws)
        assert keys(snapshot) == [("exchange1", "BTCUSDT"), ("test-exchange2", "BTCUSDT")]
        node.state.key("test-exchange1", "BTCUSDT").fold([("BTCUSDT", 1.0, NOW_MS + 1)])
        node.state.key("exchange1", "BTCUSDT").fold([("BTCUSDT", 2.0, NOW_MS + 1)])
        frame = await receive(ws)
        assert keys(frame) == [("exchange1", "BTCUSDT")]


@pytest.mark.parametrize(
    "query",
    [
        "symbols=",
        "symbols=BTCUSDT,",
        "symbols=B",
        "symbols=XRPUSDT",
        "exchanges=exchange9",
        "exchanges=..%2F..",
        "exchanges=",
        "symbols=" + "A" * 5000,
    ],
)
async def test_bad_query_gets_an_error_frame_then_1008(
    served: tuple[QuartTrio, Node], query: str, autojump_clock: MockClock
) -> None:
    app, _ = served
    async with app.test_client().websocket(f"/ws/prices?{query}") as ws:
        frame = await receive(ws)
        assert frame["type"] == "error" and frame["error"]
        assert await closed_with(ws) == 1008


async def test_subscribe_unsubscribe_and_bad_messages(
    served: tuple[QuartTrio, Node], autojump_clock: MockClock
) -> None:
    app, node = served
    async with app.test_client().websocket("/ws/prices?symbols=ETHUSDT") as ws:
        assert (await receive(ws))["data"] == []
        await ws.send(orjson.dumps({"op": "subscribe", "symbols": ["btcusdt"]}))
        frame = await receive(ws)
        assert frame["type"] == "snapshot"
        assert keys(frame) == [("test-exchange1", "BTCUSDT"), ("test-exchange2", "BTCUSDT")]

        for bad in [
            "not json",
            "[1]",
            '{"op":"subscribe"}',
            '{"op":"drop","symbols":["BTCUSDT"]}',
            '{"op":"subscribe","symbols":"BTCUSDT"}',
            '{"op":"subscribe","symbols":[1]}',
            '{"op":"subscribe","symbols":["XRPUSDT"]}',
            '{"op":"subscribe","exchanges":["../.."]}',
            b"\xff\xfe",
        ]:
            await ws.send(bad)
            frame = await receive(ws)
            assert frame["type"] == "error" and frame["error"], bad

        await ws.send('{"op":"unsubscribe","exchanges":["test-exchange1"]}')
        frame = await receive(ws)
        assert keys(frame) == [("test-exchange2", "BTCUSDT")]
        await ws.send('{"op":"subscribe","exchanges":["exchange1"]}')
        frame = await receive(ws)
        assert keys(frame) == [("exchange1", "BTCUSDT"), ("test-exchange2", "BTCUSDT")]

        node.state.key("exchange1", "BTCUSDT").fold([("BTCUSDT", 5.0, NOW_MS + 9)])
        frame = await receive(ws)
        assert frame["type"] == "prices" and keys(frame) == [("exchange1", "BTCUSDT")]


async def test_shutdown_closes_with_1001(
    served: tuple[QuartTrio, Node], autojump_clock: MockClock
) -> None:
    app, node = served
    async with app.test_client().websocket("/ws/prices") as ws:
        await receive(ws)
        node.stop()
        assert await closed_with(ws) == 1001


async def test_not_ready_refuses_the_handshake(autojump_clock: MockClock) -> None:
    config = build_config({})
    app = create_app(config, node=make_node(config, ready=False)).fallback
    assert isinstance(app, QuartTrio)
    async with app.test_app(), app.test_client().websocket("/ws/prices") as ws:
        with trio.fail_after(5), pytest.raises(Exception) as info:
            await ws.receive()
        response = getattr(info.value, "response", None)
        assert response is not None and response.status_code == 503


async def test_a_client_going_away_leaves_nothing_behind(
    served: tuple[QuartTrio, Node], autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, node = served
    hub = node.hub
    for _ in range(3):
        async with app.test_client().websocket("/ws/prices") as ws:
            await receive(ws)
            assert len(hub.clients) == 1
        await trio.sleep(0.5)
        assert not hub.clients
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
