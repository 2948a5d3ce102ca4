"""Several ingest processes splitting the sources, api processes answering for the union
(contract: roles and scale-out), with real processes, feeds that count what they send, Redis
and PostgreSQL.

Two ingest processes configured with the *same* sources (one ingests, the other is a hot
standby for all of them) are covered by tests/e2e/test_leases.py; here the sources are split,
disjoint or partly overlapping.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import Factory
from tests.procs import CountingFeed, Marketflow, wait_for

RATE = 50.0  # lines/s per feed: 10 per symbol
NAMES = [f"exchange{i}" for i in range(1, 7)]


@pytest.fixture
def counting() -> Iterator[list[CountingFeed]]:
    made = [CountingFeed(rate=RATE) for _ in NAMES]
    yield made
    for f in made:
        f.close()


def config(
    feeds: list[CountingFeed], indices: range | list[int], role: str, data_dir: Path
) -> dict[str, Any]:
    return {
        "exchanges": [
            {"name": NAMES[i], "host": "127.0.0.1", "port": feeds[i].port} for i in indices
        ],
        "app": {"mode": "live", "role": role, "grace_ms": 200, "data_dir": str(data_dir)},
    }


def btc_sent(feed: CountingFeed) -> int:
    """BTCUSDT lines the feed sent: every fifth line of each connection, from its first."""
    return sum((n + 4) // 5 for n in feed.per_connection())


def drained(mf: Marketflow, feeds: list[CountingFeed]) -> None:
    """Pause `feeds` and wait until `mf` has folded every line they sent."""
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_for(
        lambda: mf.health()["pipeline"]["updates_total"] == sent,
        15,
        f"{sent} ticks folded by {mf.url}",
    )


def stored(dbname: str) -> dict[str, int]:
    """sum(tick_count) per exchange; no (exchange, symbol, minute) written twice."""
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        rows = conn.execute(
            "SELECT exchange, sum(tick_count) FROM aggregates GROUP BY exchange"
        ).fetchall()
        (dupes,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM aggregates"
            " GROUP BY exchange, pair_name, timestamp HAVING count(*) > 1) d"
        ).fetchone() or (0,)
    assert dupes == 0
    return {str(exchange): int(total) for exchange, total in rows}


def latest_sources(api: Marketflow) -> dict[str, int]:
    """The cross-source latest answer's sources: name -> timestamp."""
    response = api.get("/prices/latest/BTCUSDT")
    if response.status_code != 200:
        return {}
    return {s["exchange"]: s["timestamp"] for s in response.json()["sources"]}


def exact_answers(api: Marketflow, feeds: list[CountingFeed]) -> bool:
    """The api's BTCUSDT counts, across sources and per source, equal what the feeds sent."""
    expected = [btc_sent(f) for f in feeds]
    for path in ("/prices/average/BTCUSDT?period=5m", "/prices/average/BTCUSDT?period=1h"):
        body = api.get(path).json()
        if body.get("count") != sum(expected) or body.get("exchange") != "all":
            return False
    candles = api.get("/prices/candles/BTCUSDT?interval=1m").json()["candles"]
    if sum(c["count"] for c in candles) != sum(expected):
        return False
    for name, want in zip(NAMES, expected, strict=True):
        if api.get(f"/prices/average/{name}/BTCUSDT?period=5m").json().get("count") != want:
            return False
    return True


def test_two_ingest_processes_split_six_feeds_and_api_processes_see_all(
    marketflow: Factory, counting: list[CountingFeed], dbname: str, tmp_path: Path
) -> None:
    first = marketflow(config(counting, range(0, 3), "ingest", tmp_path / "a"))
    second = marketflow(config(counting, range(3, 6), "ingest", tmp_path / "b"))
    wait_for(lambda: all(f.connections == 1 for f in counting), 15, "every feed connected")
    apis = [marketflow(config(counting, range(6), "api", tmp_path / f"api{i}")) for i in (1, 2)]
    for ingest in (first, second):
        wait_for(lambda i=ingest: i.health()["status"] == "ok", 10, "ingest healthy")
    for api in apis:
        wait_for(lambda a=api: set(latest_sources(a)) == set(NAMES), 15, "all six in latest")
        health = wait_for(lambda a=api: (h := a.health())["status"] == "ok" and h, 10, "api ok")
        assert health["ingest"]["instances"] == sorted(
            [first.health()["instance"], second.health()["instance"]]
        )
        assert set(health["sources"]) == set(NAMES)
        highest = api.get("/prices/highest/BTCUSDT?period=5m").json()
        assert highest["exchange"] == "all" and highest["at_exchange"] in NAMES

    # Paused: every answer of both api processes counts exactly what the six feeds sent.
    drained(first, counting[:3])
    drained(second, counting[3:])
    for api in apis:
        wait_for(lambda a=api: exact_answers(a, counting), 15, "exact cross-source answers")
    for feed in counting:
        feed.resume()

    # SIGTERM of the first ingest (its feeds paused, so everything sent was read): the second
    # ingest's sources keep updating, the api processes keep answering.
    drained(first, counting[:3])
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0, first.output[-3000:]
    before = [latest_sources(api) for api in apis]
    for api, seen in zip(apis, before, strict=True):
        wait_for(
            lambda a=api, s=seen: all(latest_sources(a)[n] > s[n] for n in NAMES[3:]),
            10,
            "the second ingest's latest prices advance",
        )
        now = latest_sources(api)
        assert all(now[n] == seen[n] for n in NAMES[:3])  # the first's: as it left them
        wait_for(
            lambda a=api: a.health()["ingest"]["instances"] == [second.health()["instance"]],
            15,
            "the api sees one ingesting instance",
        )
        assert api.get("/prices/average/BTCUSDT?period=5m").status_code == 200
        assert api.get("/health/ready").status_code == 200
    assert second.health()["status"] == "ok"
    assert [f.connections for f in counting[3:]] == [1, 1, 1]  # never interrupted

    drained(second, counting[3:])
    for api in apis:
        wait_for(lambda a=api: exact_answers(a, counting), 15, "exact answers after the stop")
    second.signal(signal.SIGTERM)
    assert second.wait(20) == 0, second.output[-3000:]
    assert [f.connections for f in counting] == [1] * 6
    assert stored(dbname) == {name: f.total for name, f in zip(NAMES, counting, strict=True)}


def test_an_overlapping_source_is_ingested_by_one_process_the_other_stands_by(
    marketflow: Factory, counting: list[CountingFeed], dbname: str, tmp_path: Path
) -> None:
    """Ingest A has exchange1+exchange2, B exchange2+exchange3: exchange2 gets one connection
    (A's); B's health shows it `standby` and B itself `ok`. When A stops, B takes it over and
    every tick of it is stored once."""
    feeds = counting[:3]
    a = marketflow(config(feeds, [0, 1], "ingest", tmp_path / "a"))
    wait_for(lambda: feeds[0].connections == feeds[1].connections == 1, 15, "A connected")
    b = marketflow(config(feeds, [1, 2], "ingest", tmp_path / "b"))
    wait_for(lambda: feeds[2].connections == 1, 15, "B connected to exchange3")
    health = wait_for(
        lambda: (h := b.health())["sources"]["exchange2"]["status"] == "standby" and h,
        10,
        "B stands by for exchange2",
    )
    assert health["status"] == "ok" and b.get("/health").status_code == 200
    assert health["sources"]["exchange3"]["status"] == "connected"
    assert a.health()["sources"]["exchange2"]["status"] == "connected"
    assert "source held by another instance; standing by" in b.output
    # B decided (standby) and ticks flowed since: still one connection to exchange2.
    flowing = feeds[1].total
    wait_for(lambda: feeds[1].total > flowing + 100, 10, "ticks flowing on exchange2")
    assert feeds[1].connections == 1

    drained(a, feeds[:2])
    to_a = feeds[1].total  # all read by A
    a.signal(signal.SIGTERM)
    assert a.wait(20) == 0, a.output[-3000:]
    wait_for(lambda: feeds[1].connections == 2, 15, "B took exchange2 over")
    feeds[1].resume()  # (lines still written to A's closed connection reach nobody)
    wait_for(
        lambda: b.health()["sources"]["exchange2"]["status"] == "connected", 10, "B ingests it"
    )
    wait_for(lambda: feeds[1].sent_since(1) > 100, 10, "ticks to B on exchange2")
    for feed in feeds[1:]:
        feed.pause()
    sent_to_b = feeds[1].sent_since(1) + feeds[2].total
    wait_for(lambda: b.health()["pipeline"]["updates_total"] == sent_to_b, 15, "B drained")
    b.signal(signal.SIGTERM)
    assert b.wait(20) == 0, b.output[-3000:]
    assert stored(dbname) == {
        "exchange1": feeds[0].total,
        "exchange2": to_a + feeds[1].sent_since(1),
        "exchange3": feeds[2].total,
    }
