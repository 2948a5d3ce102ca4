"""`WS /ws/prices` protocol v1 through Quart's test client: seq, ids, ack, pong, heartbeat, and
candle subscriptions whose frames agree with `GET /prices/candles/...`."""

from __future__ import annotations

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
from marketflow.api.http import HttpApp
from marketflow.broadcast import Client
from marketflow.config import build_config
from marketflow.node import Node
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from tests.unit.node_fakes import NOW, NOW_MS, fake_node, take_over_all
from tests.unit.test_api_app import call

TEST = ["test-exchange1", "test-exchange2", "test-exchange3"]
MINUTE_START = NOW_MS // 60_000 * 60_000


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Served:
    """The production app around a node on fakes (its hub running): WebSockets through Quart's
    test client, HTTP through the route table."""

    def __init__(self, http: HttpApp, node: Node, clock: Clock) -> None:
        self.http = http
        self.node = node
        self.clock = clock
        quart = http.fallback  # WebSocket connections go to Quart-Trio
        assert isinstance(quart, QuartTrio)
        self.quart = quart

    def websocket(self, path: str) -> Any:
        return self.quart.test_client().websocket(path)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    config = build_config({"app": {"ws_min_interval_ms": 100, "ws_max_lag_s": 5}})
    clock = Clock()
    node = fake_node(config, clock=clock)
    await take_over_all(node)  # as a start does: every key holds from its horizon on
    assert node.ingest is not None
    node.ingest.running = True
    for i, source in enumerate(TEST[:2]):
        node.state.key(source, "BTCUSDT").fold(
            [("BTCUSDT", 100.0 + i, NOW_MS - 5_000 + i), ("BTCUSDT", 101.0 + i, NOW_MS - 900 + i)]
        )
    app = Served(create_app(config, node=node), node, clock)
    async with app.quart.test_app(), trio.open_nursery() as nursery:
        await nursery.start(node.hub.run, node.stopping)  # as Node.run does
        yield app
        nursery.cancel_scope.cancel()


class Frames:
    """A client that checks `seq` (1, 2, 3, ... without a gap) on every frame it reads.

    Tests whose server side hops to a thread (a PostgreSQL read) run on the real clock: Trio's
    autojump clock would jump the deadline while the thread works."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.seq = 0

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(5):
            frame = orjson.loads(await self.ws.receive())
        assert isinstance(frame, dict)
        self.seq += 1
        assert frame.pop("seq") == self.seq, frame
        return frame

    async def next_of(self, kind: str) -> dict[str, Any]:
        """The next frame of `kind`, skipping heartbeats."""
        while (frame := await self.next())["type"] == "heartbeat":
            pass
        assert frame["type"] == kind, frame
        return frame

    async def send(self, message: Any) -> None:
        await self.ws.send(orjson.dumps(message).decode())


async def closed_with(ws: WebSocket) -> int:
    with trio.fail_after(5), pytest.raises(ClientDisconnectedError) as info:
        while True:
            await ws.receive()
    code = info.value.args[0]
    assert isinstance(code, int)
    return code


async def test_seq_ids_ack_pong_errors_and_heartbeat(
    served: Served, autojump_clock: MockClock
) -> None:
    app, clock = served, served.clock
    async with app.websocket("/ws/prices?symbols=BTCUSDT") as ws:
        frames = Frames(ws)
        assert (await frames.next())["type"] == "snapshot"
        await frames.send({"op": "ping", "id": 7})
        assert await frames.next() == {"type": "pong", "id": 7}
        await frames.send({"op": "ping"})
        assert await frames.next() == {"type": "pong"}
        await frames.send({"op": "subscribe", "id": "a-1", "symbols": ["ethusdt"]})
        assert await frames.next() == {
            "type": "ack",
            "id": "a-1",
            "subscription": {"symbols": ["BTCUSDT", "ETHUSDT"], "exchanges": TEST, "candles": []},
        }
        snapshot = await frames.next()
        assert snapshot["type"] == "snapshot" and "candles" not in snapshot
        await frames.send({"op": "subscribe", "id": 9, "symbols": ["NOPE"]})
        assert await frames.next() == {"type": "error", "id": 9, "error": "unknown symbol NOPE"}
        await frames.send({"op": "unsubscribe", "id": 10, "candles": ["2m"]})
        error = await frames.next()
        assert error["id"] == 10 and "2m" in error["error"]
        for bad_id in (True, 1.5, None, [1], "x" * 129):
            await frames.send({"op": "ping", "id": bad_id})
            error = await frames.next()
            assert error["type"] == "error" and "id" not in error and "id" in error["error"]
        await frames.send({"op": "hello", "id": 11})
        assert (await frames.next())["id"] == 11
        await frames.send({"op": "unsubscribe", "id": 12, "exchanges": ["test-exchange1"]})
        ack = await frames.next()
        assert ack["subscription"]["exchanges"] == TEST[1:]
        assert (await frames.next())["type"] == "snapshot"
        started = trio.current_time()
        heartbeat = await frames.next()  # nothing changes: a heartbeat after a second
        assert heartbeat == {"type": "heartbeat", "time": int(clock.now * 1000)}
        # the hub notices at its next step: between 1 s and 1 s + ws_min_interval_ms
        assert 1.0 <= trio.current_time() - started <= 1.1 + 1e-6
        clock.now += 1
        assert (await frames.next())["time"] == int(clock.now * 1000)


def candle_of(frame: dict[str, Any], field: str = "data") -> dict[tuple[str, str, int], Any]:
    return {(c["exchange"], c["interval"], c["t"]): c for c in frame[field]}


async def rest_candle(app: Served, path: str, t: int) -> dict[str, Any]:
    status, body, _ = await call(app.http, "GET", path)
    assert status == 200, body
    [candle] = [c for c in body["candles"] if c["t"] == t]
    assert isinstance(candle, dict)
    return candle


def without_names(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("symbol", "exchange", "interval")}


async def test_candles_on_the_url_agree_with_rest_change_and_close(
    served: Served,
) -> None:
    app, node, clock = served, served.node, served.clock
    second = NOW_MS // 1000 * 1000 - 1000  # the 101.0/102.0 ticks' second
    path = "/ws/prices?symbols=BTCUSDT&exchanges=test-exchange1&candles=1m,1s"
    async with app.websocket(path) as ws:
        frames = Frames(ws)
        snapshot = await frames.next_of("snapshot")
        candles = candle_of(snapshot, "candles")
        assert set(candles) == {
            ("test-exchange1", "1s", second),
            ("all", "1s", second),
            ("test-exchange1", "1m", MINUTE_START),
            ("all", "1m", MINUTE_START),
        }
        for (exchange, interval, t), candle in candles.items():
            where = "" if exchange == "all" else f"{exchange}/"
            url = f"/prices/candles/{where}BTCUSDT?interval={interval}"
            assert without_names(candle) == await rest_candle(app, url, t)
        assert candles[("all", "1m", MINUTE_START)]["count"] == 4
        assert candles[("test-exchange1", "1m", MINUTE_START)]["open"] == 100.0

        # Five ticks in one interval: one candles frame, the changed candles only.
        key = node.state.key("test-exchange2", "BTCUSDT")
        for i in range(5):
            key.fold([("BTCUSDT", 90.0 + i, NOW_MS + i)])
        frame = await frames.next_of("candles")
        changed = candle_of(frame)
        assert set(changed) == {("all", "1m", MINUTE_START), ("all", "1s", NOW_MS // 1000 * 1000)}
        assert changed[("all", "1m", MINUTE_START)]["count"] == 9
        assert changed[("all", "1m", MINUTE_START)]["low"] == 90.0
        assert changed[("all", "1m", MINUTE_START)]["close"] == 94.0

        # The 1s candles close once their end + grace has passed: sent once more, closed.
        clock.now += 2.0
        frame = await frames.next_of("candles")
        closed = candle_of(frame)
        assert all(c["closed"] for c in closed.values())
        assert ("test-exchange1", "1s", second) in closed and ("all", "1s", second) in closed
        url = "/prices/candles/BTCUSDT?interval=1s"
        assert without_names(closed[("all", "1s", second)]) == await rest_candle(app, url, second)


async def test_subscribing_and_unsubscribing_candles(
    served: Served,
) -> None:
    app, node = served, served.node
    book = node.hub.book
    async with app.websocket("/ws/prices?symbols=BTCUSDT") as ws:
        frames = Frames(ws)
        await frames.next_of("snapshot")
        await frames.send({"op": "subscribe", "id": 1, "candles": ["5m", "1m"]})
        ack = await frames.next_of("ack")
        assert ack["subscription"]["candles"] == ["1m", "5m"]
        snapshot = await frames.next_of("snapshot")
        assert {(c["exchange"], c["interval"]) for c in snapshot["candles"]} == {
            (e, i) for e in ("test-exchange1", "test-exchange2", "all") for i in ("1m", "5m")
        }
        assert set(book.series) == {("BTCUSDT", 60_000), ("BTCUSDT", 300_000)}
        await frames.send({"op": "subscribe", "id": 2, "symbols": ["ETHUSDT"]})
        assert (await frames.next_of("ack"))["subscription"]["symbols"] == ["BTCUSDT", "ETHUSDT"]
        await frames.next_of("snapshot")
        assert len(book.series) == 4  # the candle pairs follow the symbols
        await frames.send({"op": "unsubscribe", "id": 3, "candles": ["1m", "5m"]})
        assert (await frames.next_of("ack"))["subscription"]["candles"] == []
        assert "candles" not in await frames.next_of("snapshot")
        assert not book.series and not book.mirrors
        await frames.send({"op": "subscribe", "candles": ["1w"]})
        await frames.next_of("ack")
        assert set(book.series) == {("BTCUSDT", 604_800_000), ("ETHUSDT", 604_800_000)}
    with trio.fail_after(5):
        while book.series:  # the handler releases them once it sees the client leave
            await trio.sleep(0.01)
    assert all(st.live_dirty is None for st in node.state.keys.values())


async def test_candles_needing_postgres_while_it_is_down(
    served: Served,
) -> None:
    app, node = served, served.node
    reader = node.minutes.store
    assert isinstance(reader, MemoryAggregateStore)
    reader.fail_with = OSError("connection refused")
    # The open hour began before the minutes memory holds: its first part is PostgreSQL's.
    async with app.websocket("/ws/prices?candles=1m") as ws:
        frames = Frames(ws)
        await frames.next_of("snapshot")
        await frames.send({"op": "subscribe", "id": "h", "candles": ["1h"]})
        error = await frames.next_of("error")
        assert error["id"] == "h" and "PostgreSQL" in error["error"]
        await frames.send({"op": "ping", "id": "after"})
        assert await frames.next_of("pong") == {"type": "pong", "id": "after"}
        assert {iv for _, iv in node.hub.book.series} == {60_000}  # nothing changed
    async with app.websocket("/ws/prices?candles=1h") as ws:
        frames = Frames(ws)
        error = await frames.next()
        assert error["type"] == "error" and "PostgreSQL" in error["error"]
        assert await closed_with(ws) == 1013


@pytest.mark.parametrize("query", ["candles=", "candles=1m,", "candles=2m", "candles=1M"])
async def test_bad_candles_in_the_query_are_an_error_then_1008(served: Served, query: str) -> None:
    app = served
    async with app.websocket(f"/ws/prices?{query}") as ws:
        frames = Frames(ws)
        frame = await frames.next()
        assert frame["type"] == "error" and frame["error"]
        assert await closed_with(ws) == 1008


def test_a_candles_frame_is_encoded_once_per_subscription_shape() -> None:
    from tests.unit.test_broadcast import make_hub, tick

    state = MarketState(300)
    hub = make_hub(state)
    hub.clock = hub.book.clock = lambda: NOW
    book_pairs = {("BTCUSDT", 60_000)}
    tick(state, "test-exchange1", "BTCUSDT", 1.0, NOW_MS - 10)

    async def follow() -> None:
        await hub.book.acquire(book_pairs)

    trio.run(follow)
    hub.publish(0.0)
    group = [hub.add(frozenset({"BTCUSDT"}), None, frozenset({"1m"})) for _ in range(50)]
    plain = [hub.add(None, None) for _ in range(50)]
    hub.frames_serialised = 0
    tick(state, "test-exchange1", "BTCUSDT", 2.0, NOW_MS)
    hub.publish(0.1)
    assert hub.frames_serialised == 3  # prices for each shape, candles for one
    assert len({id(c.candle_frame) for c in group}) == 1
    assert all(isinstance(c, Client) and not c.pending_candles for c in plain)
    frame = orjson.loads(group[0].candle_frame or "")
    assert frame["type"] == "candles"
    assert {(c["exchange"], c["count"]) for c in frame["data"]} == {
        ("test-exchange1", 2),
        ("all", 2),
    }
