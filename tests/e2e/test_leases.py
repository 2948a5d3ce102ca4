"""One source, one ingester (contract: roles): Hypercorn workers, hot standby, fencing and file
locks, with real processes, real feeds that count what they send, Redis and PostgreSQL."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import Factory
from tests.procs import (
    CountingFeed,
    Marketflow,
    TcpProxy,
    free_port,
    hypercorn_command,
    live_config,
    wait_for,
)

TTL_MS = 3000


@pytest.fixture
def counting() -> Iterator[list[CountingFeed]]:
    made = [CountingFeed(rate=100) for _ in range(2)]
    yield made
    for f in made:
        f.close()


def live(feeds: list[CountingFeed], role: str, **app: Any) -> dict[str, Any]:
    return live_config(feeds, role=role, lease_ttl_ms=TTL_MS, **app)


def tick_sum(dbname: str) -> int:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        (total,) = conn.execute("SELECT coalesce(sum(tick_count), 0) FROM aggregates").fetchone()
        (dupes,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM aggregates"
            " GROUP BY exchange, pair_name, timestamp HAVING count(*) > 1) d"
        ).fetchone()
    assert dupes == 0
    return int(total)


def connected(mf: Marketflow, source: str) -> bool:
    return bool(mf.health()["sources"][source]["status"] == "connected")


def test_hypercorn_workers_ingest_each_feed_once(
    marketflow: Factory, counting: list[CountingFeed], dbname: str, tmp_path: Path
) -> None:
    """`hypercorn --workers 2` with marketflow.hypercorn_config: each feed gets one connection,
    and PostgreSQL counts exactly the ticks sent on those connections."""
    port = free_port()
    config = live(counting, "all")
    config["http"] = {"port": port}
    mf = marketflow(
        config,
        command=hypercorn_command(2),
        wait_ready=False,
    )
    wait_for(lambda: all(f.connections >= 1 for f in counting), 20, "both feeds connected")
    wait_for(lambda: mf.get("/health").json().get("status") == "ok", 20, "healthy")
    # The other worker found both sources held and serves them from Redis.
    wait_for(lambda: mf.output.count("serving it from redis") >= 2, 20, "the other worker")
    wait_for(lambda: mf.get("/health").json().get("status") == "ok", 10, "healthy again")
    wait_for(lambda: sum(f.total for f in counting) > 400, 10, "ticks flowing")
    assert [f.connections for f in counting] == [1, 1]
    for feed in counting:
        feed.pause()
    sent = sum(f.total for f in counting)
    mf.signal(signal.SIGTERM)  # the master stops the workers; the ingesting one flushes
    assert mf.wait(30) == 0, mf.output[-3000:]
    assert tick_sum(dbname) == sent
    assert mf.output.count("marketflow ready") == 2


def test_the_standby_takes_over_a_killed_holder(
    marketflow: Factory, counting: list[CountingFeed], dbname: str, tmp_path: Path
) -> None:
    """Two ingest processes: SIGKILL of the holder -> the standby connects to every feed within
    lease_ttl_ms + a renewal period; rows stay exact (nothing doubled; missing at most what
    arrived during the gap and the last flush interval)."""
    first = marketflow(live(counting, "ingest", data_dir=str(tmp_path / "a")))
    wait_for(lambda: all(f.connections == 1 for f in counting), 15, "holder connected")
    standby = marketflow(live(counting, "ingest", data_dir=str(tmp_path / "b")))
    wait_for(lambda: standby.health()["status"] == "standby", 10, "standby")
    assert standby.get("/health").status_code == 200
    wait_for(lambda: sum(f.total for f in counting) > 300, 10, "ticks flowing")
    before = sum(f.total for f in counting)
    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait(10)
    wait_for(lambda: all(f.connections == 2 for f in counting), 15, "standby connected")
    takeover = time.monotonic() - killed_at
    assert takeover <= (TTL_MS + TTL_MS / 3) / 1000 + 1.5, takeover  # + its restore and connect
    wait_for(lambda: connected(standby, "exchange1"), 5, "standby ingesting")
    wait_for(lambda: sum(f.sent_since(1) for f in counting) > 300, 10, "ticks to the standby")
    for feed in counting:
        feed.pause()
    sent = sum(f.total for f in counting)
    during_gap = sum(f.sent_since(1) for f in counting)  # the second connections: after
    standby.signal(signal.SIGTERM)
    assert standby.wait(20) == 0
    stored = tick_sum(dbname)
    assert stored <= sent
    # What the first holder had flushed to Redis is resumed; lost: its last flush interval.
    assert stored >= during_gap + before - 2 * 100 * 2 * 0.2, (stored, before, during_gap, sent)


def test_a_holder_cut_off_from_redis_stops_and_its_late_rows_are_refused(
    marketflow: Factory, counting: list[CountingFeed], dbname: str, tmp_path: Path, prefix: str
) -> None:
    """An ingest holder behind a Redis proxy that is cut: it stops its sources once it could not
    renew for lease_ttl_ms; the standby takes over with a newer epoch; rows the cut-off holder
    writes later (its final flush) are refused by PostgreSQL, counted and logged.

    The whole run must fit in one minute: if the cut-off holder's minute closed before the
    standby registered its epoch, that row is written (rightly: the standby resumes from it) and
    the final flush has nothing left to be refused. It takes ~15 s; start early in a minute."""
    wait_for(lambda: time.time() % 60 < 20, 45, "the first 20 s of a minute")
    proxy = TcpProxy(6379)
    try:
        cut_off = marketflow(
            {
                **live(counting, "ingest", data_dir=str(tmp_path / "a")),
                "redis": {"port": proxy.port, "key_prefix": prefix},
            }
        )
        wait_for(lambda: all(f.connections == 1 for f in counting), 15, "holder connected")
        standby = marketflow(live(counting, "ingest", data_dir=str(tmp_path / "b")))
        wait_for(lambda: standby.health()["status"] == "standby", 10, "standby")
        proxy.cut()
        wait_for(
            lambda: not any(connected(cut_off, s) for s in ("exchange1", "exchange2")),
            TTL_MS / 1000 + 5,
            "the cut-off holder stopped its sources",
        )
        wait_for(lambda: connected(standby, "exchange1"), 15, "the standby took over")
        wait_for(lambda: standby.health()["pipeline"]["updates_total"] > 200, 10, "standby in")
        cut_off.signal(signal.SIGTERM)  # its final flush writes its open minutes: refused
        assert cut_off.wait(20) == 0
        assert "rows refused by postgres" in cut_off.output, cut_off.output[-3000:]
        standby.signal(signal.SIGTERM)
        assert standby.wait(20) == 0
        tick_sum(dbname)  # no duplicates
    finally:
        proxy.close()


def test_redis_down_at_start_two_processes_on_one_machine_one_ingests(
    marketflow: Factory, counting: list[CountingFeed], tmp_path: Path
) -> None:
    """Without Redis no lease can be taken: role all ingests anyway (epoch 0, guard off), and
    the file lock per source keeps a second process on the same machine (same data_dir) off."""
    dead = {"port": free_port()}
    data = str(tmp_path / "shared")
    first = marketflow({**live(counting, "all", data_dir=data), "redis": dead})
    wait_for(lambda: all(f.connections == 1 for f in counting), 15, "first connected")
    second = marketflow({**live(counting, "all", data_dir=data), "redis": dead})
    wait_for(
        lambda: second.output.count("held by another process on this machine") >= 2,
        10,
        "the second process found both sources locked",
    )
    wait_for(lambda: sum(f.total for f in counting) > 400, 10, "ticks flowing")
    assert [f.connections for f in counting] == [1, 1]
    assert "guard off" in first.output
    assert "held by another process on this machine" in second.output
