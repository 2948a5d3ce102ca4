"""Candles against the real process: ticks with known timestamps through the feeds, candles over
REST (memory, then PostgreSQL's open_time/close_time after a restart) equal the ones computed
from those ticks, and the WebSocket protocol v1 frames: seq, ids, ack, pong, heartbeat, candle
frames that agree with REST, and closings."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from marketflow.config import PostgresConfig
from marketflow.models import MinuteRow
from marketflow.store.postgres import PostgresAggregateStore
from tests.e2e.conftest import Factory
from tests.procs import Marketflow, ScriptedFeed, live_config, wait_for
from tests.unit.test_candles import INTERVALS, align, reference

MINUTE = 60_000
GRACE = 200
Sent = tuple[str, float, int]  # (source, price, ts)


@pytest.fixture
def feeds() -> Iterator[list[ScriptedFeed]]:
    made = [ScriptedFeed() for _ in range(3)]
    yield made
    for f in made:
        f.close()


def live(feeds: list[ScriptedFeed], **app: Any) -> dict[str, Any]:
    return live_config(feeds, grace_ms=GRACE, **app)


def send(feeds: list[ScriptedFeed], ticks: list[Sent]) -> None:
    """Each source's ticks down its own feed, in the order given."""
    for i, feed in enumerate(feeds):
        mine = [
            ("BTCUSDT", price, ts) for source, price, ts in ticks if source == f"exchange{i + 1}"
        ]
        if mine:
            feed.send(mine)


def folded(mf: Marketflow, count: int) -> None:
    wait_for(lambda: mf.health()["pipeline"]["updates_total"] == count, 10, f"{count} folded")


def check_rest(
    mf: Marketflow, ticks: list[Sent], interval: str, sources: list[str], *, since: int = 0
) -> list[dict[str, Any]]:
    """GET the candles of `sources` (one, or all three: across) and compare them with the ones
    computed from `ticks`: every field; `closed` where the request's time decides it."""
    label = sources[0] if len(sources) == 1 else "all"
    path = f"/prices/candles/{'' if label == 'all' else label + '/'}BTCUSDT?interval={interval}"
    before = int(time.time() * 1000)
    response = mf.get(path + (f"&start={since}" if since else ""))
    after = int(time.time() * 1000)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["symbol"], body["exchange"], body["interval"]) == ("BTCUSDT", label, interval)
    iv = INTERVALS[interval]
    want = reference([t for t in ticks if t[0] in sources], interval)
    want = {t: c for t, c in want.items() if t >= since}
    got = {c["t"]: c for c in body["candles"]}
    assert sorted(got) == sorted(want), (path, sorted(got), sorted(want))
    for t, candle in got.items():
        expected = want[t]
        for field in ("open", "high", "low", "close", "count"):
            assert candle[field] == expected[field], (path, t, field, candle, expected)
        assert candle["average"] == pytest.approx(expected["average"], rel=1e-12)
        end = t + iv + GRACE
        if end <= before:
            assert candle["closed"] is True, (path, candle)
        elif end > after:
            assert candle["closed"] is False, (path, candle)
    return list(body["candles"])


async def test_candles_equal_the_ticks_before_and_after_a_restart(
    marketflow: Factory, feeds: list[ScriptedFeed]
) -> None:
    first = marketflow(live(feeds))
    for f in feeds:
        f.wait_client()
    now = int(time.time() * 1000)
    m = now // MINUTE * MINUTE
    ticks: list[Sent] = [
        # Four minutes ago: across sources, out of order, equal times (ties by source name).
        ("exchange2", 101.5, m - 4 * MINUTE + 10_000),
        ("exchange1", 100.0, m - 4 * MINUTE + 10_000),
        ("exchange1", 103.0, m - 4 * MINUTE + 59_999),
        ("exchange3", 99.0, m - 4 * MINUTE + 30_250),
        ("exchange3", 98.5, m - 4 * MINUTE + 30_100),  # earlier, arriving later
        ("exchange2", 104.0, m - 3 * MINUTE + 1),
        ("exchange1", 102.0, m - 2 * MINUTE + 15_000),
        ("exchange2", 102.25, m - 2 * MINUTE + 15_000),
        # The last seconds: several in one second, one 15 s interval, one minute.
        ("exchange1", 110.0, now - 7_000),
        ("exchange1", 111.0, now - 7_000),
        ("exchange2", 109.5, now - 6_900),
        ("exchange3", 112.0, now - 3_000),
        ("exchange3", 108.0, now - 3_500),
        ("exchange2", 110.5, now - 1_000),
    ]
    send(feeds, ticks)
    folded(first, len(ticks))
    everyone = ["exchange1", "exchange2", "exchange3"]
    for interval in ("1s", "15s", "1m", "1h"):
        for sources in (["exchange1"], ["exchange2"], ["exchange3"], everyone):
            check_rest(first, ticks, interval, sources)
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    for f in feeds:
        f.close_clients()

    # The restart holds the last 120 s: the older minutes are PostgreSQL's, with their tick
    # times (open_time/close_time) deciding the open and close across sources.
    mf = marketflow(live(feeds, window_seconds=120))
    for f in feeds:
        f.wait_client()
    later = [("exchange1", 120.0, int(time.time() * 1000) - 500)]
    send(feeds, later)
    folded(mf, len(later))
    ticks += later
    for interval in ("1m", "3m", "1h", "1d"):
        for sources in (["exchange1"], ["exchange3"], everyone):
            check_rest(mf, ticks, interval, sources)
    # Seconds resumed from Redis or a stored row start with the first whole minute inside the
    # window; a minute resumed from its row holds its ticks up to the row's close time in no
    # second, so sub-minute candles start after the last tick of the first run.
    resumed = max(ts for _, _, ts in ticks[:-1]) + 1
    check_rest(mf, ticks, "15s", everyone, since=align(resumed, 15_000) + 15_000)

    # The WebSocket's open hourly and daily candles after the restart hold PostgreSQL's share
    # of them too (the first run's ticks, when the hour or day began before them; the snapshot
    # carries open candles only, and the last tick is in the open ones).
    url = f"ws://127.0.0.1:{mf.port}/ws/prices?symbols=BTCUSDT&candles=1h,1d"
    async with open_websocket_url(url) as ws:
        frames = Frames(ws)
        snapshot = await frames.next_of("snapshot")
        for interval in ("1h", "1d"):
            ws_open = {
                c["t"]: c
                for c in snapshot["candles"]
                if c["interval"] == interval and c["exchange"] == "all"
            }
            rest = {c["t"]: c for c in check_rest(mf, ticks, interval, everyone)}
            for t, candle in ws_open.items():  # REST equals the ticks (check_rest)
                assert without_names(candle) == {**rest[t], "closed": candle["closed"]}
            # The open day holds the last tick (unless the day ended since: a few seconds).
            assert ws_open or interval == "1h"
        await ws.aclose()


class Frames:
    """Reads frames and checks the v1 rule every frame obeys: `seq` 1, 2, 3, ... without gaps."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.seq = 0
        self.seen: list[dict[str, Any]] = []

    async def next(self, seconds: float = 5) -> dict[str, Any]:
        with trio.fail_after(seconds):
            frame = orjson.loads(await self.ws.get_message())
        assert isinstance(frame, dict)
        self.seq += 1
        assert frame.pop("seq") == self.seq, frame
        self.seen.append(frame)
        return frame

    async def next_of(self, kind: str, seconds: float = 5) -> dict[str, Any]:
        """The next frame of `kind`; frames of other kinds in between are kept in `seen`."""
        with trio.fail_after(seconds):
            while (frame := await self.next())["type"] != kind:
                pass
        return frame

    async def send(self, message: Any) -> None:
        await self.ws.send_message(orjson.dumps(message).decode())


def recent_ticks() -> list[Sent]:
    """Five ticks of the last 1.5 s on the three sources, all in the minute open now: a
    subscription follows the intervals not closed when it began (and every later one), so a
    tick must not fall into a minute that had closed before it."""
    now = int(time.time() * 1000)
    base = max(now - 1_500, now // MINUTE * MINUTE)  # up to 1.2 s ahead: within the skew
    return [
        ("exchange1", 100.0, base),
        ("exchange2", 101.0, base + 300),
        ("exchange1", 99.0, base + 700),
        ("exchange3", 102.5, base + 1_100),
        ("exchange2", 98.0, base + 1_200),
    ]


def without_names(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("symbol", "exchange", "interval")}


async def test_websocket_v1_frames_and_candles_that_agree_with_rest(
    marketflow: Factory, feeds: list[ScriptedFeed]
) -> None:
    mf = marketflow(live(feeds))
    for f in feeds:
        f.wait_client()
    url = f"ws://127.0.0.1:{mf.port}/ws/prices?symbols=BTCUSDT&candles=15s"
    view: dict[tuple[str, str, int], dict[str, Any]] = {}

    def keep(candles: list[dict[str, Any]]) -> None:
        for c in candles:
            view[(c["exchange"], c["interval"], c["t"])] = c

    with trio.fail_after(60):
        async with open_websocket_url(url) as ws:
            frames = Frames(ws)
            snapshot = await frames.next()
            assert snapshot["type"] == "snapshot" and snapshot["candles"] == []
            await frames.send({"op": "ping", "id": 1})
            assert await frames.next_of("pong") == {"type": "pong", "id": 1}
            await frames.send({"op": "subscribe", "id": "c", "candles": ["1m"]})
            assert await frames.next_of("ack") == {
                "type": "ack",
                "id": "c",
                "subscription": {
                    "symbols": ["BTCUSDT"],
                    "exchanges": ["exchange1", "exchange2", "exchange3"],
                    "candles": ["15s", "1m"],
                },
            }
            keep((await frames.next_of("snapshot"))["candles"])
            await frames.send({"op": "subscribe", "id": 5, "candles": ["7m"]})
            error = await frames.next_of("error")
            assert error["id"] == 5 and "7m" in error["error"]

            # Ticks arrive; the candle frames carry what changed until the view holds them all.
            ticks = recent_ticks()
            send(feeds, ticks)

            def counted() -> int:
                return sum(
                    c["count"] for (ex, iv, _), c in view.items() if (ex, iv) == ("all", "1m")
                )

            while counted() < len(ticks):
                frame = await frames.next()
                if frame["type"] == "candles":
                    keep(frame["data"])
            assert counted() == len(ticks)

            # A quiet second: a heartbeat with the wall-clock time (a closing may come first:
            # the 15 s interval of the ticks can end within the second).
            seen = len(frames.seen)
            heartbeat = await frames.next_of("heartbeat", seconds=5)
            for frame in frames.seen[seen:]:
                if frame["type"] == "candles":
                    keep(frame["data"])
            assert abs(heartbeat["time"] - time.time() * 1000) < 2_000
            for (exchange, interval, t), candle in view.items():
                sources = (
                    ["exchange1", "exchange2", "exchange3"] if exchange == "all" else [exchange]
                )
                rest = {c["t"]: c for c in check_rest(mf, ticks, interval, sources)}
                assert without_names(candle) == {**rest[t], "closed": candle["closed"]}

            # The 15 s interval closes (end + grace): its candles come once more, closed.
            fifteen = max(t for (_, iv, t) in view if iv == "15s")
            wait = (fifteen + 15_000 + GRACE) / 1000 - time.time() + 5
            while not all(
                c["closed"] for (_, iv, t), c in view.items() if iv == "15s" and t == fifteen
            ):
                frame = await frames.next(seconds=max(wait, 5))
                if frame["type"] == "candles":
                    keep(frame["data"])
            rest = {
                c["t"]: c
                for c in check_rest(mf, ticks, "15s", ["exchange1", "exchange2", "exchange3"])
            }
            assert without_names(view[("all", "15s", fifteen)]) == rest[fifteen]
            assert rest[fifteen]["closed"] is True
            await ws.aclose()
    kinds = {f["type"] for f in frames.seen}
    assert {"snapshot", "pong", "ack", "error", "candles", "heartbeat"} <= kinds


async def test_an_api_process_streams_the_candles_it_answers(
    marketflow: Factory, feeds: list[ScriptedFeed], dbname: str
) -> None:
    """Role api: the candle frames it streams, followed from its mirror of Redis, equal its own
    REST candles and the ingesting process's, the open day's share only PostgreSQL holds
    included."""
    ingest = marketflow(live(feeds, role="ingest"))
    for f in feeds:
        f.wait_client()
    wait_for(lambda: ingest.get("/health/ready").status_code == 200, 15, "ingest ready")
    now = int(time.time() * 1000)
    old = (now - 20 * MINUTE) // MINUTE * MINUTE  # before what memory holds (300 s)
    writer = PostgresAggregateStore(PostgresConfig(dbname=dbname), migrate=False)
    try:  # an earlier run's minute (epoch 0: not fenced)
        writer.upsert([MinuteRow("exchange1", "BTCUSDT", old, 4, 400.0, 97.0, 103.0, 98.0, 102.0)])
    finally:
        writer.close()
    api = marketflow(live(feeds, role="api"))
    wait_for(lambda: api.get("/health/ready").status_code == 200, 15, "api ready")
    view: dict[tuple[str, str, int], dict[str, Any]] = {}

    def keep(candles: list[dict[str, Any]]) -> None:
        for c in candles:
            view[(c["exchange"], c["interval"], c["t"])] = c

    def rest(mf: Marketflow, exchange: str, interval: str) -> dict[int, dict[str, Any]]:
        where = "" if exchange == "all" else f"{exchange}/"
        response = mf.get(f"/prices/candles/{where}BTCUSDT?interval={interval}")
        assert response.status_code == 200, response.text
        return {c["t"]: c for c in response.json()["candles"]}

    url = f"ws://127.0.0.1:{api.port}/ws/prices?symbols=BTCUSDT&candles=15s,1m,1d"
    with trio.fail_after(60):
        async with open_websocket_url(url) as ws:
            frames = Frames(ws)
            keep((await frames.next_of("snapshot"))["candles"])
            ticks = recent_ticks()
            send(feeds, ticks)

            def counted() -> int:
                return sum(
                    c["count"] for (ex, iv, _), c in view.items() if (ex, iv) == ("all", "1m")
                )

            while counted() < len(ticks):
                frame = await frames.next()
                if frame["type"] == "candles":
                    keep(frame["data"])
            seen = len(frames.seen)
            await frames.next_of("heartbeat")  # a quiet moment: nothing left to send
            for frame in frames.seen[seen:]:  # closings may have come first
                if frame["type"] == "candles":
                    keep(frame["data"])
            for (exchange, interval, t), candle in view.items():
                mine, ingests = rest(api, exchange, interval), rest(ingest, exchange, interval)
                assert without_names(candle) == {**mine[t], "closed": candle["closed"]}
                assert {**ingests[t], "closed": candle["closed"]} == without_names(candle)
            day = align(ticks[0][2], INTERVALS["1d"])
            if old >= day:  # the stored minute is in the open day: the book read it
                assert view[("exchange1", "1d", day)]["count"] == 4 + 2
                assert view[("all", "1d", day)]["count"] == 4 + len(ticks)
            await ws.aclose()
