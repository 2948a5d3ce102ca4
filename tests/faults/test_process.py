"""The process itself stops under load: SIGTERM drains exactly, SIGKILL loses at most one flush."""

from __future__ import annotations

import signal
import time
from typing import Any

from tests.faults.conftest import Rig, peak_mb, stop, updates_total, wait_accepted
from tests.procs import wait_for

RATE = 2000  # lines/s per feed, 40x the reference feeds; 6,000 lines/s in all
FLUSH_MS = 100
BOUND_FLUSHES = 3


def test_sigterm_under_load_exits_0_in_time_with_every_accepted_tick_stored(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, RATE)
    mf = rig.start(rig.config(feeds, {"shutdown_timeout_s": 10}))
    wait_for(lambda: updates_total(mf) > 3 * RATE * 3, 15, "three seconds of load")
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf, timeout=10)  # the feeds keep sending throughout
    sent = sum(f.total for f in feeds)
    stored = sum(rig.pg_ticks().values())
    assert stored == total  # late is 0: every tick carries the current time
    assert rig.redis_ticks() == total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario=f"SIGTERM under load ({3 * RATE:,} lines/s)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=total - stored,
        rows_doubled=0,
        unread_at_stop=sent - total,
        recovery_s=None,
        recovery_note="exit 0; ticks still in the socket at the signal were never accepted",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def test_sigkill_under_load_then_restart_loses_at_most_one_flush_and_doubles_nothing(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, RATE)
    config = rig.config(feeds, {"flush_interval_ms": FLUSH_MS})
    mf = rig.start(config)
    wait_for(lambda: updates_total(mf) > 3 * RATE * 3, 15, "three seconds of load")
    accepted_before = updates_total(mf)
    peak_first = peak_mb(mf)
    mf.signal(signal.SIGKILL)
    assert mf.wait(10) == -signal.SIGKILL
    killed_at = time.monotonic()
    # Everything the first process can have accepted was sent to its connections.
    sent_first = sum(f.total for f in feeds)
    in_redis = rig.redis_ticks()
    lost = sent_first - in_redis  # an upper bound: lines still in the socket count as lost
    assert in_redis >= accepted_before - BOUND_FLUSHES * 3 * RATE * FLUSH_MS / 1000
    # The contract: at most the last flush interval's ticks. `lost` also counts lines still in the
    # socket, and a loaded CI box can delay a flush: BOUND_FLUSHES intervals' worth is asserted,
    # the measured figure goes to docs/reliability.md.
    bound = BOUND_FLUSHES * 3 * RATE * FLUSH_MS / 1000
    assert 0 <= lost <= bound, (lost, bound)
    first_connections = [f.connections for f in feeds]
    second = rig.start(config)
    for feed, n in zip(feeds, first_connections, strict=True):
        feed.wait_client(n + 1)
    recovered = time.monotonic() - killed_at
    wait_for(lambda: updates_total(second) > 3 * RATE, 10, "a second of load after restart")
    for feed in feeds:
        feed.pause()
    sent_second = sum(f.sent_since(n) for f, n in zip(feeds, first_connections, strict=True))
    wait_accepted(second, lambda: sent_second)
    late = second.health()["pipeline"]["late"]
    peak = max(peak_first, peak_mb(second))
    total, shutdown_s = stop(second)
    assert total == sent_second
    stored = sum(rig.pg_ticks().values())
    # The restart resumed exactly what Redis held: nothing doubled, nothing else lost.
    assert stored + late == in_redis + total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario=f"SIGKILL under load ({3 * RATE:,} lines/s), then restart",
        ticks_sent=sent_first + sent_second,
        ticks_accepted=None,
        ticks_stored=stored,
        late=late,
        ticks_lost=lost,
        ticks_lost_bound=int(bound),
        ticks_lost_ms=round(lost / (3 * RATE) * 1000),
        # Folded by the killed process (its last /health) yet not in Redis: a lower bound.
        ticks_lost_accepted_min=max(0, accepted_before - in_redis),
        rows_doubled=0,
        recovery_s=round(recovered, 2),
        recovery_note="SIGKILL -> new process started and every feed reconnected",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
