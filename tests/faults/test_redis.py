"""Redis dies and comes back empty, three times, while ticks flow (contract: Redis)."""

from __future__ import annotations

import time
from typing import Any

from tests.faults.conftest import (
    Rig,
    assert_healthy_process,
    feeds_connected,
    peak_mb,
    stop,
    updates_total,
    wait_accepted,
)
from tests.procs import wait_for

RATE = 200  # lines/s per feed: four times the reference feeds
RESTARTS = 3


def test_redis_killed_and_restarted_three_times_during_ingest(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, RATE)
    mf = rig.start(rig.config(feeds))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy with all feeds and stores")
    recoveries: list[float] = []
    for _ in range(RESTARTS):
        rig.kill_redis()
        wait_for(lambda: mf.health()["redis"]["status"] == "down", 5, "redis seen down")
        # Ingest goes on from memory while Redis is away: another second of ticks is folded.
        during = updates_total(mf)
        wait_for(lambda d=during: updates_total(mf) >= d + 3 * RATE, 5, "ingest while down")
        assert feeds_connected(mf)
        before = updates_total(mf)
        restarted = time.monotonic()
        rig.start_redis()
        # The whole retained state is written again, not only what changed since the outage.
        wait_for(
            lambda b=before: rig.redis_ticks() >= b and rig.redis_latest_keys() == 15,
            15,
            "every retained tick rewritten into the new redis",
        )
        wait_for(lambda: mf.health()["redis"]["status"] == "ok", 5, "redis seen up")
        recoveries.append(time.monotonic() - restarted)
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    wait_for(lambda: rig.redis_ticks() == sent, 5, "last flush in redis")
    assert_healthy_process(mf)
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent
    assert stored + late == total, mf.output[-3000:]
    assert rig.redis_ticks() == total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario=f"Redis killed (SIGKILL) and restarted empty {RESTARTS}x during ingest",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=late,
        ticks_lost=sent - stored - late,
        rows_doubled=0,
        recovery_s=round(max(recoveries), 2),
        recovery_note="redis restarted -> every retained tick rewritten (worst of 3)",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
