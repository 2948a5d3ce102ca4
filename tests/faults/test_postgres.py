"""PostgreSQL goes away behind a test-owned proxy: the journal keeps every row (contract:
PostgreSQL)."""

from __future__ import annotations

import time
from typing import Any

from tests.e2e.test_aggregates import (
    MINUTE,
    assert_rows_match,
    expected,
    minute_now,
    rows,
    ticks_for,
)
from tests.faults.conftest import Rig, assert_healthy_process, peak_mb, stop, wait_accepted
from tests.procs import ScriptedFeed, wait_for

RATE = 100
APP = {"max_clock_skew_s": 600, "grace_ms": 500}


def pending(mf: Any) -> int:
    return int(mf.health()["pipeline"]["pending_rows"])


def test_postgres_cut_across_two_minute_boundaries_then_restored(
    rig: Rig, figures: dict[str, Any]
) -> None:
    scripted = rig.own(ScriptedFeed())
    feeds = rig.counting_feeds(2, RATE)
    mf = rig.start(rig.config([scripted, *feeds], APP))
    scripted.wait_client()
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    rig.proxy.cut()
    cut_at = time.monotonic()
    wait_for(lambda: mf.health()["postgres"]["status"] == "down", 5, "outage seen within 2 s")
    m = minute_now()
    ticks: list[Any] = []
    for i, symbol in enumerate(("BTCUSDT", "ETHUSDT")):
        for back in (3, 2, 1):  # three closed minutes: the outage spans two minute boundaries
            ticks += ticks_for(m - back * MINUTE, symbol, [100.0 + i + back, 99.5 + i, 101.25])
    scripted.send(ticks)
    want = expected(ticks)
    wait_for(lambda: pending(mf) >= len(want), 10, "closed minutes journaled")
    assert "exchange1" not in rig.pg_ticks()
    rig.proxy.restore()
    restored_at = time.monotonic()
    wait_for(lambda: len(rows(rig.dbname)) == len(want), 20, "journal replayed")
    wait_for(lambda: pending(mf) == 0, 10, "nothing pending")
    wait_for(lambda: mf.health()["status"] == "ok", 5, "healthy again")
    recovery = time.monotonic() - restored_at
    assert_rows_match(rows(rig.dbname), want)
    for feed in feeds:
        feed.pause()
    sent = len(ticks) + sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent
    assert stored + late == total
    assert rig.pg_duplicate_rows() == 0
    assert_rows_match(rows(rig.dbname), want)
    figures.update(
        scenario="PostgreSQL cut (proxy) across two minute boundaries, then restored",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=late,
        ticks_lost=sent - stored - late,
        rows_doubled=0,
        outage_s=round(restored_at - cut_at, 2),
        recovery_s=round(recovery, 2),
        recovery_note="restore -> journal replayed, pending_rows 0, /health 200",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def test_postgres_restarted_while_connections_are_held(rig: Rig, figures: dict[str, Any]) -> None:
    scripted = rig.own(ScriptedFeed())
    feeds = rig.counting_feeds(2, RATE)
    mf = rig.start(rig.config([scripted, *feeds], APP))
    scripted.wait_client()
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    m = minute_now()
    first = ticks_for(m - 3 * MINUTE, "SOLUSDT", [200.0, 201.5, 199.0])
    scripted.send(first)
    wait_for(lambda: len(rows(rig.dbname)) == 1, 10, "first row written")
    before = rig.proxy.accepted
    # A restart: every open connection dies at once, the server answers again right away.
    rig.proxy.cut()
    rig.proxy.restore()
    restarted_at = time.monotonic()
    second = ticks_for(m - 2 * MINUTE, "SOLUSDT", [202.0, 198.5])
    scripted.send(second)
    want = expected(first + second)
    wait_for(lambda: len(rows(rig.dbname)) == len(want), 15, "writes resume after the restart")
    recovery = time.monotonic() - restarted_at
    wait_for(lambda: pending(mf) == 0, 10, "nothing pending")
    wait_for(lambda: mf.health()["postgres"]["status"] == "ok", 5, "postgres ok")
    assert rig.proxy.accepted > before, "marketflow opened new connections"
    assert_rows_match(rows(rig.dbname), want)
    # Restart again, then stop at once: the shutdown's final write meets a dead connection.
    third = ticks_for(m - MINUTE, "SOLUSDT", [203.0])
    scripted.send(third)
    want = expected(first + second + third)
    wait_for(lambda: len(rows(rig.dbname)) == len(want), 15, "third row")
    for feed in feeds:
        feed.pause()
    sent = len(first) + len(second) + len(third) + sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    rig.proxy.cut()
    rig.proxy.restore()
    assert_healthy_process(mf)
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    assert total == sent
    stored = sum(rig.pg_ticks().values())
    assert stored + late == total
    assert rig.pg_duplicate_rows() == 0
    assert_rows_match(rows(rig.dbname), want)
    figures.update(
        scenario="PostgreSQL restarted (every held connection dropped, server back at once)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=late,
        ticks_lost=sent - stored - late,
        rows_doubled=0,
        recovery_s=round(recovery, 2),
        recovery_note="restart -> next closed minute committed",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
