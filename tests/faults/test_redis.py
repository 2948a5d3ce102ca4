"""Redis dies and comes back empty, three times, while ticks flow (contract: Redis)."""

from __future__ import annotations

import re
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
from tests.procs import Marketflow, RedisServer, wait_for

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


def feed_lag_s(mf: Marketflow) -> dict[str, float]:
    """`marketflow_feed_lag_seconds` per source, from /metrics."""
    text = mf.get("/metrics").text
    found = re.findall(r'^marketflow_feed_lag_seconds\{source="([^"]+)"\} (\S+)$', text, re.M)
    return {source: float(value) for source, value in found}


def redis_down_with(mf: Marketflow, text: str) -> dict[str, Any] | None:
    health = mf.health()
    redis = health["redis"]
    if redis["status"] == "down" and text in (redis["error"] or "") and health["status"] != "ok":
        return dict(redis)
    return None


def stays_down(mf: Marketflow, text: str, seconds: float = 1.5) -> int:
    """Sample /health every 50 ms for `seconds` (longer than a probe cycle): every answer
    says redis is down with `text`. Returns the number of samples."""
    samples = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert redis_down_with(mf, text), mf.health()
        samples += 1
        time.sleep(0.05)
    return samples


def test_redis_that_answers_ping_but_refuses_writes_is_down_at_once_and_recovers_by_itself(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards health that lied: Redis was `ok` whenever it answered PING, though it refused
    every write (a failed flush said `down` only until the next PING). Twice, with ingest
    running: the private redis-server becomes a read-only replica of another (READONLY) while
    the feeds are quiet, so only the probe's own write can tell; then it runs out of memory
    (maxmemory 1 byte, noeviction: OOM) under load. Each time PING still answers, /health shows
    redis `down` with the write's error within 2 s and keeps saying so, and recovers by itself
    once writes work again, every retained tick rewritten."""
    feeds = rig.counting_feeds(3, 100)
    mf = rig.start(rig.config(feeds))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    # The feeds stamp their ticks with the current time; a source has a lag once it sent one.
    lag = wait_for(lambda: len(lag := feed_lag_s(mf)) == 3 and lag, 5, "every source's lag")
    assert set(lag) == {"exchange1", "exchange2", "exchange3"}, lag
    assert all(0 <= seconds < 5 for seconds in lag.values()), lag
    primary = rig.own(RedisServer())
    detected: list[float] = []
    recovered: list[float] = []
    with rig.redis_client() as r:
        for quiet, refuse, allow, error in (
            (
                True,
                lambda: r.replicaof("127.0.0.1", primary.port),
                lambda: r.replicaof("NO", "ONE"),
                "read only replica",
            ),
            (
                False,
                lambda: (
                    r.config_set("maxmemory-policy", "noeviction")
                    and r.config_set("maxmemory", "1")
                ),
                lambda: r.config_set("maxmemory", "0"),
                "command not allowed when used memory",
            ),
        ):
            if quiet:
                for feed in feeds:
                    feed.pause()
            changed = time.monotonic()
            refuse()
            found = wait_for(lambda e=error: redis_down_with(mf, e), 5, f"redis down: {error}")
            detected.append(time.monotonic() - changed)
            assert detected[-1] <= 2.0, f"seen after {detected[-1]:.2f}s: {found}"
            stays_down(mf, error)
            assert r.ping()  # it answered all along
            assert mf.get("/health").status_code == 503
            assert feeds_connected(mf)  # ingest goes on from memory
            allow()
            allowed = time.monotonic()
            wait_for(lambda: mf.health()["redis"]["status"] == "ok", 10, "redis ok again")
            recovered.append(time.monotonic() - allowed)
            wait_for(lambda: mf.health()["status"] == "ok", 5, "healthy again")
            for feed in feeds:
                feed.resume()  # after a quiet recovery too: nothing needed a tick to heal
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    # The replica's sync emptied it: the whole retained state was written again.
    wait_for(lambda: rig.redis_ticks() == sent, 10, "every retained tick in redis")
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent and stored == total and rig.redis_ticks() == total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario="Redis answers PING but refuses writes: read-only replica (feeds quiet), then "
        "out of memory (under load)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=sent - stored,
        rows_doubled=0,
        down_after_s=round(max(detected), 2),
        recovery_s=round(max(recovered), 2),
        recovery_note=f"down with the write's error after {detected[0]:.2f} s (quiet, probe) and "
        f"{detected[1]:.2f} s (flush); writes allowed -> ok, every retained tick rewritten",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
