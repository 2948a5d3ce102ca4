"""Feed faults (contract: feed protocol): flapping connections, bursts, skewed clocks, a line that
never ends."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from tests.e2e.test_aggregates import assert_rows_match, expected, rows
from tests.faults.conftest import (
    Rig,
    assert_healthy_process,
    peak_mb,
    stop,
    wait_accepted,
)
from tests.procs import RawFeed, RssSampler, ScriptedFeed, rss_mb, wait_for

NORMAL = 50  # lines/s per connection, like the reference simulators


def source(mf: Any, name: str) -> dict[str, Any]:
    return dict(mf.health()["sources"][name])


def test_feed_flapping_every_two_seconds_delivers_every_line_exactly_once(
    rig: Rig, figures: dict[str, Any]
) -> None:
    flaps = 7
    flapper = rig.counting_feeds(1, 100, flap_s=2.0)[0]
    steady = rig.counting_feeds(2, 100)
    mf = rig.start(rig.config([flapper, *steady]))
    flapper.wait_client()
    # While exchange1 flaps, the other two must never pause or reconnect. The age of their last
    # message is computed by the server when it answers, so a slow poll cannot fake a pause.
    worst_gap = 0.0

    def watch() -> bool:
        nonlocal worst_gap
        health = mf.health()
        for name in ("exchange2", "exchange3"):
            src = health["sources"][name]
            assert src["status"] == "connected" and src["reconnects"] == 0, (name, src)
            if src["last_message_age_ms"] is not None:
                worst_gap = max(worst_gap, src["last_message_age_ms"] / 1000)
        return len(flapper.closed_at) >= flaps

    wait_for(watch, flaps * 2 * 3 + 10, f"{flaps} flaps", interval=0.1)
    flapper.flap_s = None  # the current connection stays open from now on
    flapper.pause()
    closes = len(flapper.closed_at)
    for feed in steady:
        feed.pause()
    sent = flapper.total + sum(f.total for f in steady)
    wait_for(lambda: source(mf, "exchange1")["reconnects"] == closes, 10, "every drop counted")
    wait_accepted(mf, lambda: sent)
    src = source(mf, "exchange1")
    assert src["messages"] == flapper.total
    assert src["rejected"] == 0
    assert worst_gap < 1.0, f"another source paused {worst_gap:.2f}s"
    gaps = [
        flapper.accepted_at[i + 1] - closed
        for i, closed in enumerate(flapper.closed_at)
        if i + 1 < len(flapper.accepted_at)
    ]
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = rig.pg_ticks()
    assert total == sent
    assert stored["exchange1"] == flapper.total  # every line exactly once
    assert sum(stored.values()) + late == total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario=f"Feed closing every 2 s ({closes} drops), two steady feeds beside it",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=sum(stored.values()),
        late=late,
        ticks_lost=sent - sum(stored.values()) - late,
        rows_doubled=0,
        reconnects=closes,
        recovery_s=round(max(gaps), 2),
        recovery_mean_s=round(statistics.mean(gaps), 2),
        recovery_note="drop -> reconnected (backoff 1 s +-20 %, reset by the first line)",
        other_sources_max_gap_s=round(worst_gap, 2),
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def test_burst_of_ten_and_a_hundred_times_the_normal_rate_loses_nothing(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, NORMAL)
    mf = rig.start(rig.config(feeds))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    worst_health_s = 0.0
    deepest = 0

    def run_phase(rate: float, seconds: float) -> None:
        nonlocal worst_health_s, deepest
        for feed in feeds:
            feed.rate = rate
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # the phase's length is the scenario, not a condition
            started = time.monotonic()
            response = mf.get("/health")
            worst_health_s = max(worst_health_s, time.monotonic() - started)
            body = response.json()
            assert response.status_code == 200, body
            deepest = max(deepest, body["pipeline"]["queue_depth"])
            time.sleep(0.1)

    run_phase(NORMAL, 2)
    run_phase(10 * NORMAL, 5)
    run_phase(100 * NORMAL, 3)
    run_phase(NORMAL, 2)
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent
    assert stored + late == total
    assert rig.pg_duplicate_rows() == 0
    figures.update(
        scenario="Burst: 10x then 100x the reference rate on three feeds (up to 15,000 lines/s)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=late,
        ticks_lost=sent - stored - late,
        rows_doubled=0,
        recovery_s=None,
        recovery_note=f"no degradation: /health 200 throughout, slowest {worst_health_s:.3f} s",
        max_queue_depth=deepest,
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def test_clock_skewed_ticks_are_refused_and_ticks_within_skew_land_in_their_minute(
    rig: Rig, figures: dict[str, Any]
) -> None:
    skew_s = 120  # behind the wall clock
    # Ahead of it: a tick from the future must not win "newest" for minutes. Not the default
    # (5 s), so the +8 s tick below shows the configured limit is the one applied.
    future_s = 10
    scripted = rig.own(ScriptedFeed())
    steady = rig.counting_feeds(2, NORMAL)
    mf = rig.start(
        rig.config(
            [scripted, *steady],
            {"max_clock_skew_s": skew_s, "max_future_skew_ms": future_s * 1000},
        )
    )
    scripted.wait_client()
    now = int(time.time() * 1000)
    within = [
        ("BTCUSDT", 100.0, now - 100_000),
        ("BTCUSDT", 101.0, now - 61_000),
        ("ETHUSDT", 3000.0, now - 30_000),
        ("ETHUSDT", 3001.0, now + 3_000),
        ("SOLUSDT", 200.0, now + 8_000),
    ]
    beyond = [
        ("BTCUSDT", 1.0, now - (skew_s + 30) * 1000),
        ("BTCUSDT", 2.0, now + (skew_s + 30) * 1000),
        ("SOLUSDT", 2.5, now + 30_000),  # within the past limit, beyond the future one
        ("SOLUSDT", 2.6, now + 119_000),
        ("ETHUSDT", 3.0, now - 3_600_000),
        ("ETHUSDT", 4.0, now + 86_400_000),
        ("SOLUSDT", 5.0, 0),
        ("SOLUSDT", 6.0, -1),
        ("TONUSDT", 7.0, 2**53),
        ("TONUSDT", 8.0, 2**63 - 1),
        ("TONUSDT", 9.0, -(2**63)),
        ("DOGEUSDT", 10.0, 2**64),  # beyond 64 bits: still a timestamp, still refused
        ("DOGEUSDT", 11.0, now // 1000),  # seconds instead of milliseconds
    ]
    scripted.send(beyond + within)

    def counted() -> bool:
        src = source(mf, "exchange1")
        return src["rejected_by_reason"].get("bad_timestamp") == len(beyond) and src[
            "messages"
        ] == len(within)

    wait_for(counted, 10, "skewed ticks counted, the others accepted")
    src = source(mf, "exchange1")
    assert src["rejected"] == len(beyond) and src["status"] == "connected"
    for feed in steady:
        feed.pause()
    sent = len(within) + sum(f.total for f in steady)
    wait_accepted(mf, lambda: sent)
    late = mf.health()["pipeline"]["late"]
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)  # writes the open (and the future) minute too
    assert total == sent and late == 0
    assert_rows_match(rows(rig.dbname), expected(within))
    stored = sum(rig.pg_ticks().values())
    assert stored == total
    figures.update(
        scenario=f"Clock-skewed ticks (-{skew_s} s / +{future_s} s allowed): {len(beyond)} beyond, "
        f"{len(within)} within",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=late,
        ticks_lost=0,
        rows_doubled=0,
        bad_timestamp=len(beyond),
        recovery_s=None,
        recovery_note="n/a: refused per line, connection kept",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def line(symbol: str, price: float) -> bytes:
    stamp = int(time.time() * 1000)
    return json.dumps({"symbol": symbol, "price": price, "timestamp": stamp}).encode() + b"\n"


def test_a_hundred_megabytes_without_a_newline_keep_memory_bounded(
    rig: Rig, figures: dict[str, Any]
) -> None:
    raw = rig.own(RawFeed())
    steady = rig.counting_feeds(2, NORMAL)
    mf = rig.start(rig.config([raw, *steady]))
    raw.wait_client()
    raw.send_raw(b"".join(line("BTCUSDT", 100.0 + i) for i in range(5)))
    wait_for(lambda: source(mf, "exchange1")["messages"] == 5, 10, "first good lines")
    baseline = rss_mb(mf.proc.pid)
    sampler = RssSampler(mf.proc.pid)
    chunk = b"x" * (1 << 20)
    started = time.monotonic()
    for _ in range(100):
        raw.send_raw(chunk)
    raw.send_raw(b"\n" + b"".join(line("ETHUSDT", 3000.0 + i) for i in range(5)))
    raw.send_raw(b"y" * 70_000 + b"\n" + b"".join(line("SOLUSDT", 200.0 + i) for i in range(5)))

    def counted() -> bool:
        src = source(mf, "exchange1")
        return src["messages"] == 15 and src["rejected_by_reason"].get("too_long") == 2

    wait_for(counted, 30, "both overlong lines counted once, the good lines read")
    seconds = time.monotonic() - started
    peak_during = sampler.stop()
    src = source(mf, "exchange1")
    assert src["rejected"] == 2 and src["reconnects"] == 0 and src["status"] == "connected"
    assert peak_during - baseline < 50, (baseline, peak_during)
    assert_healthy_process(mf)
    for feed in steady:
        feed.pause()
    sent = 15 + sum(f.total for f in steady)
    wait_accepted(mf, lambda: sent)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = rig.pg_ticks()
    assert total == sent
    assert stored["exchange1"] == 15  # the lines after the overlong ones are stored
    assert sum(stored.values()) == total
    figures.update(
        scenario="100 MB without a newline, then a 70 KB line, between good lines",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=sum(stored.values()),
        late=0,
        ticks_lost=sent - sum(stored.values()),
        rows_doubled=0,
        too_long=2,
        recovery_s=round(seconds, 2),
        recovery_note="100 MB discarded and the next good line read (no reconnect)",
        rss_before_mb=round(baseline, 1),
        rss_peak_during_mb=round(peak_during, 1),
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


def test_hostile_lines_are_counted_and_never_stop_the_reader(
    rig: Rig, figures: dict[str, Any]
) -> None:
    raw = rig.own(RawFeed())
    steady = rig.counting_feeds(2, NORMAL)
    mf = rig.start(rig.config([raw, *steady]))
    raw.wait_client()
    now = int(time.time() * 1000)
    good = b"".join(line("BTCUSDT", 100.0 + i) for i in range(2))
    one = b'{"symbol":"ETHUSDT","price":3000.5,"timestamp":%d}' % now
    hostile = {
        # Before the fix: OverflowError out of the parser ended the reader and the process.
        "bad_price": b'{"symbol":"BTCUSDT","price":1%s,"timestamp":%d}\n' % (b"0" * 400, now),
        # Before the fix: json.loads(bytes) guessed UTF-16 and accepted it.
        "malformed": one.decode().encode("utf-16-le")
        + b"\n"
        # Before the fix: two objects on one line were two ticks on the fast path.
        + one
        + b" "
        + one
        + b"\n"
        + b"[" * 50_000
        + b"\n",
        "unknown_symbol": b'{"symbol":"btcu\xc5\xbfdt","price":1.0,"timestamp":%d}\n' % now,
    }
    raw.send_raw(good + b"".join(hostile.values()) + good)
    want = {"bad_price": 1, "malformed": 3, "unknown_symbol": 1}

    def counted() -> bool:
        src = source(mf, "exchange1")
        return src["rejected_by_reason"] == {**src["rejected_by_reason"], **want} and (
            src["messages"] == 4
        )

    wait_for(counted, 10, f"hostile lines counted as {want}")
    src = source(mf, "exchange1")
    assert src["rejected"] == sum(want.values())
    assert src["status"] == "connected" and src["reconnects"] == 0
    for feed in steady:
        feed.pause()
    sent = 4 + sum(f.total for f in steady)
    wait_accepted(mf, lambda: sent)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = rig.pg_ticks()
    assert total == sent and stored["exchange1"] == 4 and sum(stored.values()) == total
    figures.update(
        scenario="Hostile feed lines (400-digit price, UTF-16, two objects on a line, "
        "50k nesting, homoglyph symbol)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=sum(stored.values()),
        late=0,
        ticks_lost=sent - sum(stored.values()),
        rows_doubled=0,
        recovery_s=None,
        recovery_note="n/a: refused per line, connection kept",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
