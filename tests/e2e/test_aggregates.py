"""Minute aggregates through the real process into the real PostgreSQL: exact and exactly once.

The feed is scripted (known prices, known timestamps). Minutes are aligned to tick timestamps, so
"crossing a minute boundary" means sending ticks of consecutive minutes; no test waits a minute.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import Factory
from tests.procs import Marketflow, ScriptedFeed, Simulator, TcpProxy, wait_for

MINUTE = 60_000


@pytest.fixture
def feed() -> Iterator[ScriptedFeed]:
    f = ScriptedFeed()
    yield f
    f.close()


@pytest.fixture
def quiet() -> Iterator[Simulator]:
    """Feeds for exchange2/3 so health is complete; they carry other data than exchange1's."""
    sim = Simulator(2, seed=5)
    yield sim
    sim.close()


def config(feed: ScriptedFeed, quiet: Simulator, pg_port: int = 5432) -> dict[str, Any]:
    return {
        "exchanges": [
            {"name": "exchange1", "host": "127.0.0.1", "port": feed.port},
            {"name": "exchange2", "host": "127.0.0.1", "port": quiet.ports[0]},
            {"name": "exchange3", "host": "127.0.0.1", "port": quiet.ports[1]},
        ],
        "postgres": {"port": pg_port},
        "app": {"mode": "live", "max_clock_skew_s": 600, "grace_ms": 500},
    }


def minute_now() -> int:
    return int(time.time() * 1000) // MINUTE * MINUTE


def rows(dbname: str, exchange: str = "exchange1") -> dict[tuple[str, int], tuple[Any, ...]]:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        found = conn.execute(
            "SELECT pair_name, (extract(epoch from timestamp) * 1000)::bigint, tick_count,"
            " average_price, min_price, max_price, open_price, close_price"
            " FROM aggregates WHERE exchange = %s ORDER BY 1, 2",
            (exchange,),
        ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in found}


def safe_rows(dbname: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    try:
        return rows(dbname)
    except psycopg.Error:
        return {}


def expected(ticks: list[tuple[str, float, int]]) -> dict[tuple[str, int], tuple[Any, ...]]:
    """Each minute's row computed by hand: count, avg, min, max, open, close (by timestamp)."""
    out: dict[tuple[str, int], list[tuple[int, int, float]]] = {}
    for arrival, (symbol, price, ts) in enumerate(ticks):
        out.setdefault((symbol, ts // MINUTE * MINUTE), []).append((ts, arrival, price))
    result = {}
    for key, items in out.items():
        prices = [p for _, _, p in items]
        first = min(items, key=lambda t: (t[0], t[1]))[2]
        last = max(items, key=lambda t: (t[0], t[1]))[2]
        result[key] = (
            len(prices),
            sum(prices) / len(prices),
            min(prices),
            max(prices),
            first,
            last,
        )
    return result


def assert_rows_match(got: dict[Any, tuple[Any, ...]], want: dict[Any, tuple[Any, ...]]) -> None:
    assert set(got) == set(want)
    for key, (count, avg, lo, hi, first, last) in want.items():
        g = got[key]
        assert g[0] == count, (key, g, want[key])
        assert g[1] == pytest.approx(avg, rel=1e-12)
        assert g[2:] == (lo, hi, first, last), (key, g, want[key])


def ticks_for(minute: int, symbol: str, prices: list[float], offset_ms: int = 0) -> list[Any]:
    """Ticks spread over `minute`, arriving out of timestamp order on purpose — never later than
    now: in the open minute, a tick from the future would be refused (max_future_skew_ms)."""
    n = len(prices)
    now = int(time.time() * 1000)
    stamps = [
        min(now, minute + offset_ms + (i * 7919) % max(1, 59_000 - offset_ms)) for i in range(n)
    ]
    return [(symbol, p, ts) for p, ts in zip(prices, stamps, strict=True)]


def folded(mf: Marketflow) -> int:
    return int(mf.health()["pipeline"]["updates_total"])


def test_rows_equal_values_computed_by_hand(
    marketflow: Factory, feed: ScriptedFeed, quiet: Simulator, dbname: str
) -> None:
    marketflow(config(feed, quiet))
    feed.wait_client()
    m1 = minute_now() - 2 * MINUTE
    ticks = ticks_for(m1, "BTCUSDT", [100.5, 99.25, 101.0, 100.0, 98.5, 102.25])
    ticks += ticks_for(m1 + MINUTE, "BTCUSDT", [0.1, 0.2, 0.3])
    ticks += ticks_for(m1, "ETHUSDT", [3050.0])
    ticks += [("BTCUSDT", 7.0, m1 + 5000), ("BTCUSDT", 8.0, m1 + 5000)]  # timestamp tie
    feed.send(ticks)
    want = expected(ticks)
    got = wait_for(lambda: len(r := rows(dbname)) == len(want) and r, 15, "rows written")
    assert_rows_match(got, want)


def test_late_tick_rewrites_the_minute_with_the_full_total(
    marketflow: Factory, feed: ScriptedFeed, quiet: Simulator, dbname: str
) -> None:
    mf = marketflow(config(feed, quiet))
    feed.wait_client()
    m1 = minute_now() - 2 * MINUTE
    first = ticks_for(m1, "SOLUSDT", [200.0, 201.0, 199.0])
    feed.send(first)
    wait_for(lambda: rows(dbname).get(("SOLUSDT", m1), (0,))[0] == 3, 15, "first write")
    late = [("SOLUSDT", 250.0, m1 + 59_999)]
    feed.send(late)
    want = expected(first + late)
    wait_for(lambda: rows(dbname).get(("SOLUSDT", m1), (0,))[0] == 4, 15, "rewritten row")
    assert_rows_match(rows(dbname), want)
    assert mf.health()["pipeline"]["late"] == 0


def restart(
    mf: Marketflow, marketflow: Factory, cfg: dict[str, Any], feed: ScriptedFeed, how: int
) -> Marketflow:
    mf.signal(how)
    code = mf.wait(15)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), mf.output
    feed.close_clients()
    new = marketflow(cfg)
    feed.wait_client()
    return new


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_mid_minute_continues_the_same_minute_exactly_once(
    marketflow: Factory, feed: ScriptedFeed, quiet: Simulator, dbname: str, prefix: str, how: int
) -> None:
    import redis

    cfg = config(feed, quiet)
    mf = marketflow(cfg)
    feed.wait_client()
    m = minute_now()  # the open minute
    before = ticks_for(m, "TONUSDT", [3.9, 3.8, 4.0, 3.95], offset_ms=0)
    feed.send(before)
    r = redis.Redis(decode_responses=True)
    window = f"{prefix}window:{{exchange1:TONUSDT}}"

    def in_redis() -> int:
        return sum(int(x.split("|")[1]) for x in r.zrange(window, 0, -1))

    # SIGKILL may lose only the last flush interval: kill after the flush landed.
    wait_for(lambda: in_redis() == len(before), 10, "ticks flushed to Redis")
    mf = restart(mf, marketflow, cfg, feed, how)
    after = ticks_for(m, "TONUSDT", [4.1, 3.7], offset_ms=1000)
    feed.send(after)
    wait_for(lambda: in_redis() == len(before) + len(after), 10, "new ticks folded and flushed")
    mf.signal(signal.SIGTERM)
    assert mf.wait(15) == 0
    assert_rows_match(rows(dbname), expected(before + after))
    r.close()


def test_two_instances_migrate_one_new_database_together(
    tmp_path: Path, marketflow: Factory, dbname: str
) -> None:
    procs = [marketflow({"http": {}}, wait_ready=False) for _ in range(2)]
    for p in procs:
        p.wait_ready()
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()]
    assert versions and len(versions) == len(set(versions))
    for p in procs:
        assert "Traceback" not in p.output


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    p = TcpProxy(5432)
    yield p
    p.close()


def test_postgres_cut_across_two_minute_boundaries_then_back(
    marketflow: Factory, feed: ScriptedFeed, quiet: Simulator, dbname: str, proxy: TcpProxy
) -> None:
    mf = marketflow(config(feed, quiet, proxy.port))
    feed.wait_client()
    wait_for(lambda: mf.health()["postgres"]["status"] == "ok", 10, "postgres up")
    proxy.cut()
    wait_for(lambda: mf.health()["postgres"]["status"] == "down", 5, "outage seen within 2 s")
    m = minute_now()
    ticks = ticks_for(m - 2 * MINUTE, "ETHUSDT", [3000.0, 3001.0])
    ticks += ticks_for(m - MINUTE, "ETHUSDT", [3002.0, 2999.5, 3003.0])
    feed.send(ticks)
    wait_for(lambda: mf.health()["pipeline"]["pending_rows"] >= 2, 10, "rows journaled")
    assert safe_rows(dbname) == {}
    proxy.restore()
    want = expected(ticks)
    wait_for(lambda: len(rows(dbname)) == len(want), 40, "journal replayed")
    assert_rows_match(rows(dbname), want)
    wait_for(lambda: mf.health()["pipeline"]["pending_rows"] == 0, 10, "nothing pending")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopped_while_postgres_down_then_started_with_it_up_loses_nothing(
    marketflow: Factory,
    feed: ScriptedFeed,
    quiet: Simulator,
    dbname: str,
    proxy: TcpProxy,
    how: int,
    tmp_path: Path,
) -> None:
    cfg = config(feed, quiet, proxy.port)
    mf = marketflow(cfg)
    feed.wait_client()
    wait_for(lambda: mf.health()["postgres"]["status"] == "ok", 10, "postgres up")
    proxy.cut()
    wait_for(lambda: mf.health()["postgres"]["status"] == "down", 5, "outage seen")
    m = minute_now()
    ticks = ticks_for(m - 2 * MINUTE, "DOGEUSDT", [0.3, 0.31])
    ticks += ticks_for(m - MINUTE, "DOGEUSDT", [0.29, 0.305, 0.3])
    feed.send(ticks)
    wait_for(lambda: mf.health()["pipeline"]["pending_rows"] >= 2, 10, "rows journaled")
    journal = tmp_path / "data" / "journal.ndjson"
    assert journal.exists() and journal.stat().st_size > 0
    mf.signal(how)
    mf.wait(15)
    proxy.restore()
    feed.close_clients()
    mf = marketflow(cfg)
    want = expected(ticks)
    wait_for(lambda: len(rows(dbname)) == len(want), 20, "journal replayed at start")
    assert_rows_match(rows(dbname), want)
    mf.signal(signal.SIGTERM)
    assert mf.wait(15) == 0
    assert_rows_match(rows(dbname), want)


def test_a_tick_older_than_every_held_minute_is_late_not_in_a_row(
    marketflow: Factory, feed: ScriptedFeed, quiet: Simulator, dbname: str
) -> None:
    mf = marketflow(config(feed, quiet))
    feed.wait_client()
    m = minute_now()
    old = [("BTCUSDT", 5.0, m - 7 * MINUTE)]  # within skew, older than the 300 s window held
    fresh = ticks_for(m - MINUTE, "BTCUSDT", [6.0, 7.0])
    feed.send(old + fresh)
    wait_for(lambda: mf.health()["pipeline"]["late"] == 1, 10, "late counted")
    want = expected(fresh)
    wait_for(lambda: len(rows(dbname)) == len(want), 15, "fresh minute written")
    assert_rows_match(rows(dbname), want)
    assert "counted as late" in mf.output
