"""Roles with real processes on real Redis and PostgreSQL: one ingesting process and api
processes that answer from Redis, as users deploy them (contract: roles)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.e2e.conftest import Factory
from tests.procs import Marketflow, RedisServer, ScriptedFeed, live_config, wait_for

MINUTE = 60_000
PATHS = [
    "/prices/latest/BTCUSDT",
    "/prices/latest/exchange2/ETHUSDT",
    *[f"/prices/{s}/BTCUSDT?period=30s" for s in ("highest", "lowest", "average")],
    *[f"/prices/{s}/exchange1/BTCUSDT?period=1m" for s in ("highest", "average")],
    *[f"/prices/{s}/BTCUSDT?period=10m" for s in ("lowest", "average")],
    "/prices/average/ETHUSDT",
    "/prices/candles/BTCUSDT?interval=15s",
    "/prices/candles/exchange2/ETHUSDT?interval=1m",
    "/prices/candles/BTCUSDT?interval=1h",
]


@pytest.fixture
def feeds() -> Iterator[list[ScriptedFeed]]:
    made = [ScriptedFeed() for _ in range(2)]
    yield made
    for f in made:
        f.close()


def live(feeds: list[ScriptedFeed], role: str, **app: Any) -> dict[str, Any]:
    return live_config(feeds, role=role, **app)


def send_known(feeds: list[ScriptedFeed], base: float = 100.0) -> int:
    """Ticks on both feeds over the last two minutes (and so two minute rows); returns the
    count sent."""
    now = int(time.time() * 1000)
    sent = 0
    for i, feed in enumerate(feeds):
        ticks = [
            (symbol, base + i + k * 0.25, now - 90_000 + k * 7_000)
            for k in range(14)
            for symbol in ("BTCUSDT", "ETHUSDT")
        ]
        feed.send(ticks)
        sent += len(ticks)
    return sent


def answers(mf: Marketflow) -> list[Any]:
    out = []
    for path in PATHS:
        response = mf.get(path)
        body = response.json()
        # `to` is the answer's own now: equal data, different instants.
        if isinstance(body, dict):
            body.pop("to", None)
        out.append((response.status_code, body))
    return out


def settled(processes: list[Marketflow]) -> list[Any]:
    """Wait until every process gives the same answers (the api processes are a flush behind);
    return them."""

    def same() -> list[Any] | None:
        got = [answers(mf) for mf in processes]
        return got[0] if all(g == got[0] for g in got) and got[0][0][0] == 200 else None

    return list(wait_for(same, 15, "equal answers from every process", interval=0.2))


def test_one_ingest_and_two_api_processes_answer_alike(
    marketflow: Factory, feeds: list[ScriptedFeed]
) -> None:
    ingest = marketflow(live(feeds, "ingest"))
    for feed in feeds:
        feed.wait_client()
    api1 = marketflow(live(feeds, "api"))
    api2 = marketflow(live(feeds, "api"))
    send_known(feeds)
    wait_for(lambda: ingest.health()["pipeline"]["updates_total"] == 56, 10, "all ticks in")
    body = settled([ingest, api1, api2])
    assert all(status == 200 for status, _ in body), body
    health = api1.health()
    assert health["role"] == "api" and health["ingest"]["status"] == "ok"
    assert health["ingest"]["instances"] == [ingest.health()["instance"]]
    wait_for(lambda: api1.health()["pipeline"]["updates_total"] == 56, 5, "the ingest's status")
    assert api1.get("/health/ready").status_code == 200


def test_websocket_and_mode_switch_through_an_api_process(
    marketflow: Factory, feeds: list[ScriptedFeed]
) -> None:
    ingest = marketflow(live(feeds, "ingest"))
    api = marketflow(live(feeds, "api"))
    for feed in feeds:
        feed.wait_client()
    wait_for(lambda: api.get("/health/ready").status_code == 200, 10, "api ready")

    async def stream() -> list[dict[str, Any]]:
        frames = []
        url = f"ws://127.0.0.1:{api.port}/ws/prices?symbols=BTCUSDT"
        with trio.fail_after(15):
            async with open_websocket_url(url) as ws:
                frames.append(json.loads(await ws.get_message()))
                now = int(time.time() * 1000)
                feeds[0].send([("BTCUSDT", 123.5, now)])
                while True:
                    frame = json.loads(await ws.get_message())
                    frames.append(frame)
                    if frame["type"] == "prices" and any(
                        e["price"] == 123.5 for e in frame["data"]
                    ):
                        return frames

    frames = trio.run(stream)
    assert frames[0]["type"] == "snapshot" and frames[-1]["type"] == "prices"
    # The mode, asked of the api process, is switched by the ingesting one.
    response = api.client.post("/mode/test")
    assert response.status_code == 200, response.text
    assert response.json()["mode"] == "test" and response.json()["changed"] is True
    assert response.json()["sources"] == ["test-exchange1", "test-exchange2", "test-exchange3"]
    assert ingest.get("/mode").json()["mode"] == "test"
    wait_for(lambda: api.get("/mode").json()["mode"] == "test", 5, "api follows the mode")
    wait_for(
        lambda: ingest.health()["sources"]["test-exchange1"]["status"] == "connected",
        5,
        "test sources running",
    )


def stored_rows(dbname: str) -> int:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        (count,) = conn.execute("SELECT count(*) FROM aggregates").fetchone() or (0,)
    return int(count)


def test_ingest_killed_then_redis_stopped_the_api_keeps_answering(
    marketflow: Factory, feeds: list[ScriptedFeed], dbname: str
) -> None:
    """SIGKILL of the ingest: the api's health says 503 (ingest down) while reads of the last
    data go on. Redis stopped: answers come from PostgreSQL, marked `fallback`; Redis back:
    from the mirror again, without a restart."""
    server = RedisServer()
    try:
        redis_cfg = {"port": server.port}
        ingest = marketflow({**live(feeds, "ingest"), "redis": redis_cfg})
        for feed in feeds:
            feed.wait_client()
        api = marketflow({**live(feeds, "api"), "redis": redis_cfg})
        send_known(feeds)
        wait_for(lambda: api.get("/prices/latest/BTCUSDT").status_code == 200, 10, "mirrored")
        latest = api.get("/prices/latest/exchange1/BTCUSDT").json()
        # Rows for the minutes before the current one, for the fallback to read.
        wait_for(lambda: stored_rows(dbname) >= 4, 10, "closed minutes written")
        ingest.signal(signal.SIGKILL)
        ingest.wait(10)
        health = wait_for(
            lambda: (h := api.health())["ingest"]["status"] == "down" and h, 10, "ingest down"
        )
        assert api.get("/health").status_code == 503 and health["status"] == "degraded"
        assert api.get("/prices/latest/exchange1/BTCUSDT").json() == latest  # still current

        server.close()
        wait_for(lambda: api.health()["redis"]["status"] == "down", 10, "redis down seen")
        last: list[Any] = []

        def fallback_answer() -> Any:
            response = api.get("/prices/average/BTCUSDT?period=10m")
            last[:] = [response.status_code, response.text]
            return response.status_code == 200 and response.json()

        try:
            answer = wait_for(fallback_answer, 10, "fallback answer")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer {last}") from None
        assert answer["fallback"] == "postgres" and answer["resolution"] == "1m"
        latest_rows = api.get("/prices/latest/exchange1/BTCUSDT").json()
        assert latest_rows["fallback"] == "postgres" and latest_rows["price"] > 0
        candles = api.get("/prices/candles/BTCUSDT?interval=1m").json()
        assert candles["fallback"] == "postgres" and candles["candles"]  # the written minutes
        # The same written minutes as the statistic's (all within its 10 minutes).
        assert sum(c["count"] for c in candles["candles"]) == answer["count"]
        assert api.get("/prices/candles/BTCUSDT?interval=15s").status_code == 503
        assert api.get("/health/ready").status_code == 200  # PostgreSQL answers

        server = RedisServer(port=server.port)  # back, empty
        restarted = marketflow({**live(feeds, "ingest"), "redis": redis_cfg})
        send_known(feeds, base=200.0)
        wait_for(
            lambda: "fallback" not in api.get("/prices/latest/exchange1/BTCUSDT").json(),
            15,
            "the mirror answers again",
        )
        assert api.health()["redis"]["status"] == "ok"
        restarted.close()
    finally:
        server.close()


def test_a_restarted_ingest_leaves_api_answers_equal_to_its_own(
    marketflow: Factory, feeds: list[ScriptedFeed]
) -> None:
    """Role all ingests and answers; an api process mirrors it. After a SIGTERM and a restart
    mid-minute (the open minute resumed from its row), both still answer alike."""
    first = marketflow(live(feeds, "all"))
    for feed in feeds:
        feed.wait_client()
    api = marketflow(live(feeds, "api"))
    send_known(feeds)
    settled([first, api])
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    for feed in feeds:
        feed.close_clients()
    again = marketflow(live(feeds, "all"))
    for feed in feeds:
        feed.wait_client()
    now = int(time.time() * 1000)
    feeds[0].send([("BTCUSDT", 99.5, now), ("ETHUSDT", 3.5, now)])
    wait_for(lambda: again.health()["pipeline"]["updates_total"] == 2, 10, "new ticks in")
    body = settled([again, api])
    counts = [b.get("count") for _, b in body if isinstance(b, dict) and "count" in b]
    assert counts and max(counts) >= 28  # the ticks from before the restart are there
