"""Starts that wait and stops in the middle of writes: every accepted tick is counted in exactly
one row, exactly once, with its minute's first and last tick times (contract: PostgreSQL)."""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg

from marketflow.store.postgres import MIGRATION_LOCK_KEY
from tests.e2e.test_aggregates import MINUTE, expected
from tests.faults.conftest import Rig, peak_mb, stop, wait_accepted
from tests.procs import Marketflow, ScriptedFeed, wait_for

OLD_RESTORE_DEADLINE_S = 5  # restore used to run under this deadline, migrations included
APP = {"max_clock_skew_s": 600, "grace_ms": 500}
Tick = tuple[str, float, int]


def minute_rows(rig: Rig, exchange: str = "exchange1") -> dict[tuple[str, int], tuple[Any, ...]]:
    """(symbol, minute ms) -> (count, avg, min, max, open, close, open ms, close ms), read
    directly (not through the proxy); the times exactly, as PostgreSQL holds them."""
    with rig.pg() as conn:
        found = conn.execute(
            "SELECT pair_name, (extract(epoch FROM timestamp) * 1000)::bigint, tick_count,"
            " average_price, min_price, max_price, open_price, close_price,"
            " (extract(epoch FROM open_time) * 1000)::bigint,"
            " (extract(epoch FROM close_time) * 1000)::bigint"
            " FROM aggregates WHERE exchange = %s ORDER BY 1, 2",
            (exchange,),
        ).fetchall()
    return {(r[0], r[1]): tuple(r[2:]) for r in found}


def expected_with_times(ticks: list[Tick]) -> dict[tuple[str, int], tuple[Any, ...]]:
    """`expected` plus each minute's first and last tick timestamp."""
    out = {}
    for key, values in expected(ticks).items():
        stamps = [ts for symbol, _, ts in ticks if (symbol, ts // MINUTE * MINUTE) == key]
        out[key] = (*values, min(stamps), max(stamps))
    return out


def assert_minutes(got: dict[Any, tuple[Any, ...]], want: dict[Any, tuple[Any, ...]]) -> None:
    assert set(got) == set(want)
    for key, (count, avg, *exact) in want.items():
        g = got[key]
        assert g[0] == count, (key, g, want[key])
        assert abs(g[1] - avg) <= 1e-12 * abs(avg), (key, g, want[key])
        assert list(g[2:]) == exact, (key, g, want[key])


def test_restart_inside_a_minute_while_migrations_wait_resumes_its_stored_row(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards the restore cut short: it ran under a 5 s deadline that migrations could use up,
    and then the open minute's stored row was overwritten by a row of the ticks after the
    restart alone. Here the second start finds the migration lock held for longer than that:
    it answers `starting` (503, the whole body), /health/ready 503, and no source connects,
    until PostgreSQL answers; then it resumes the minute from its row (Redis was emptied, so
    the row is the minute's only record). The row after the restart counts the ticks from
    before and after it, and its open/close times are the first and last tick's, to the ms."""
    scripted = rig.own(ScriptedFeed())
    config = rig.config([scripted], APP)
    first = rig.start(config)
    scripted.wait_client()
    # A minute with at least 10 s of it behind the wall clock: every tick below is in the past.
    m = (int(time.time() * 1000) - 10_000) // MINUTE * MINUTE
    before: list[Tick] = [
        ("BTCUSDT", 100.0, m + 1_001),  # the minute's first tick: its open comes from the row
        ("BTCUSDT", 101.5, m + 3_003),
        ("BTCUSDT", 99.25, m + 5_005),
        ("ETHUSDT", 3000.0, m + 4_004),
        ("ETHUSDT", 3001.0, m + 6_006),  # the last tick: its close comes from the row
    ]
    after: list[Tick] = [
        ("BTCUSDT", 102.0, m + 2_002),
        ("BTCUSDT", 98.75, m + 9_009),  # the last tick: the close moves past the row's
        ("ETHUSDT", 2999.5, m + 507),  # the first tick: the open moves before the row's
        ("ETHUSDT", 3002.5, m + 3_333),
    ]
    scripted.send(before)
    wait_accepted(first, lambda: len(before))
    stop(first)
    assert_minutes(minute_rows(rig), expected_with_times(before))
    rig.restart_redis()  # empty: the stored row is the minute's only record
    scripted.close_clients()
    lock = psycopg.connect(host="127.0.0.1", user="postgres", dbname=rig.dbname, autocommit=True)
    try:
        lock.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        second = rig.start(config, wait_ready=False)

        def starting() -> dict[str, Any] | None:
            response = second.get("/health")
            body: dict[str, Any] = response.json()
            return body if response.status_code == 503 and body["status"] == "starting" else None

        body = wait_for(starting, 20, "/health says starting while the migration waits")
        waiting_since = time.monotonic()
        assert {"role", "instance", "mode", "version", "postgres", "redis", "sources"} <= set(body)
        assert body["role"] == "all" and body["instance"]
        assert body["pipeline"]["updates_total"] == 0

        def waited_past_the_old_deadline() -> bool:
            response = second.get("/health")
            assert response.status_code == 503, response.text
            assert response.json()["status"] == "starting"
            assert second.get("/health/ready").status_code == 503
            assert not scripted.clients, "a source started before the restore completed"
            return time.monotonic() - waiting_since > OLD_RESTORE_DEADLINE_S + 2

        wait_for(waited_past_the_old_deadline, 30, "seven seconds of waiting", interval=0.25)
        held_s = time.monotonic() - waiting_since
        lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    finally:
        lock.close()
    released_at = time.monotonic()
    second.wait_ready()
    recovery = time.monotonic() - released_at
    assert second.get("/health/ready").status_code == 200
    scripted.wait_client()
    scripted.send(after)
    wait_accepted(second, lambda: len(after))
    peak = peak_mb(second)
    total, shutdown_s = stop(second)
    assert total == len(after)
    want = expected_with_times(before + after)
    got = minute_rows(rig)
    assert_minutes(got, want)
    sent = len(before) + len(after)
    stored = sum(row[0] for row in got.values())
    assert stored == sent and rig.pg_duplicate_rows() == 0
    figures.update(
        scenario="Restart inside a minute while the migration lock is held "
        f"{held_s:.0f} s (> the old 5 s restore deadline), Redis emptied in between",
        ticks_sent=sent,
        ticks_accepted=sent,
        ticks_stored=stored,
        late=0,
        ticks_lost=sent - stored,
        rows_doubled=0,
        starting_s=round(held_s, 1),
        recovery_s=round(recovery, 2),
        recovery_note="lock released -> minute resumed from its row, /health 200; "
        "open/close times exact to the ms",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


SYMBOLS = [
    "BTCUSDT",
    "DOGEUSDT",
    "TONUSDT",
    "SOLUSDT",
    "ETHUSDT",
    "XRPUSDT",
    "ADAUSDT",
    "BNBUSDT",
    "LTCUSDT",
    "AVAXUSDT",
]
BATCH = 5
PG_DELAY_S = 0.03  # per chunk each way through the proxy: a batch upsert takes ~0.2 s


def ticks_of(minute: int, offsets: list[int], price: float) -> list[Tick]:
    return [(s, price + i + o / 1e5, minute + o) for i, s in enumerate(SYMBOLS) for o in offsets]


def rows_in_postgres(rig: Rig) -> int:
    with rig.pg() as conn:
        try:
            row = conn.execute("SELECT count(*) FROM aggregates").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    assert row is not None
    return int(row[0])


def sigterm_mid_write(mf: Marketflow, written: Any, what: str) -> float:
    """SIGTERM once `written()` says a step is half written; returns the shutdown's seconds."""
    wait_for(written, 20, what, interval=0.02)
    _, seconds = stop(mf, timeout=30)
    return seconds


def test_sigterm_while_a_step_of_many_rows_is_written_then_restart_counts_every_tick_once(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards the shutdown loss: the final flush ran while the aggregator's loop still wrote a
    step of more than `db_batch_size` rows, whose dirty flags were already cleared, and the
    loop was then cancelled between two batches: the batches after it were lost. Three sources
    x ten symbols, `db_batch_size` 5 and a slowed PostgreSQL: the SIGTERM comes while a step of
    60 closed minutes is half written; after a restart, late ticks rewrite 30 of them and a
    second SIGTERM comes half way through that step too. sum(tick_count) = ticks sent."""
    feeds = [rig.own(ScriptedFeed()) for _ in range(3)]
    app = {**APP, "symbols": SYMBOLS, "db_batch_size": BATCH, "shutdown_timeout_s": 30}
    config = rig.config(feeds, app)
    mf = rig.start(config)
    for feed in feeds:
        feed.wait_client()
    rig.proxy.delay_s = PG_DELAY_S
    now = int(time.time() * 1000)
    m = now // MINUTE * MINUTE
    sent: dict[str, list[Tick]] = {f"exchange{i + 1}": [] for i in range(3)}
    for i, feed in enumerate(feeds):
        ticks = ticks_of(m - 2 * MINUTE, [1_000, 20_000, 59_000], 10.0 * (i + 1))
        ticks += ticks_of(m - MINUTE, [2_000, 30_000, 58_000], 10.0 * (i + 1))
        ticks += [(s, p, min(ts, now)) for s, p, ts in ticks_of(m, [0, 1], 10.0 * (i + 1))]
        sent[f"exchange{i + 1}"] += ticks
        feed.send(ticks)
    closed_rows = 3 * len(SYMBOLS) * 2
    first_s = sigterm_mid_write(
        mf,
        lambda: BATCH <= rows_in_postgres(rig) < closed_rows - BATCH,
        "the step of closed minutes half written",
    )
    assert sum(rig.pg_ticks().values()) == sum(len(t) for t in sent.values())
    for feed in feeds:
        feed.close_clients()
    second = rig.start(config)
    for feed in feeds:
        feed.wait_client()
    late_for = m - MINUTE  # held since the restore: folded in, its rows rewritten
    now = int(time.time() * 1000)
    second_sent = 0
    for i, feed in enumerate(feeds):
        ticks = ticks_of(late_for, [45_000], 10.0 * (i + 1))
        ticks += [(s, p, min(ts, now)) for s, p, ts in ticks_of(m, [2, 3], 10.0 * (i + 1))]
        sent[f"exchange{i + 1}"] += ticks
        second_sent += len(ticks)
        feed.send(ticks)
    total_sent = sum(len(t) for t in sent.values())
    wait_accepted(second, lambda: second_sent)

    def rewriting() -> bool:
        with rig.pg() as conn:
            row = conn.execute(
                "SELECT count(*) FROM aggregates WHERE tick_count = 4 AND timestamp ="
                " to_timestamp(%s / 1000.0)",
                (late_for,),
            ).fetchone()
        assert row is not None
        return 0 < int(row[0]) < 3 * len(SYMBOLS)

    peak = peak_mb(second)
    second_s = sigterm_mid_write(second, rewriting, "the step of late rewrites half written")
    stored = rig.pg_ticks()
    assert stored == {name: len(ticks) for name, ticks in sent.items()}
    assert rig.pg_duplicate_rows() == 0
    for name, ticks in sent.items():
        assert_minutes(minute_rows(rig, name), expected_with_times(ticks))
    figures.update(
        scenario="SIGTERM while a step of 60 rows (db_batch_size 5, PostgreSQL slowed) is half "
        "written, restart, SIGTERM again half way through 30 rewrites",
        ticks_sent=total_sent,
        ticks_accepted=total_sent,
        ticks_stored=sum(stored.values()),
        late=0,
        ticks_lost=total_sent - sum(stored.values()),
        rows_doubled=0,
        recovery_s=None,
        recovery_note=f"exit 0 both times ({first_s:.1f} s, {second_s:.1f} s with every "
        "batch ~0.2 s); 30 keys x 3 minutes exact",
        peak_rss_mb=peak,
        shutdown_s=round(max(first_s, second_s), 2),
    )


def test_sigterm_while_the_restore_waits_on_postgres_exits_0_in_time(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """A stop during the start-up wait is a stop like any other: exit 0 within
    `shutdown_timeout_s`, nothing written, nothing lost. The restore's migration was a thread
    call the stop had to wait for, and a migration waiting on the lock waits up to its 60 s
    statement timeout: SIGTERM took as long. Then a start with PostgreSQL free restores as
    usual."""
    scripted = rig.own(ScriptedFeed())
    config = rig.config([scripted], {**APP, "shutdown_timeout_s": 5})
    first = rig.start(config)
    scripted.wait_client()
    m = (int(time.time() * 1000) - 10_000) // MINUTE * MINUTE
    ticks: list[Tick] = [("SOLUSDT", 200.0, m + 1_500), ("SOLUSDT", 201.0, m + 7_000)]
    scripted.send(ticks)
    wait_accepted(first, lambda: len(ticks))
    stop(first)
    scripted.close_clients()
    lock = psycopg.connect(host="127.0.0.1", user="postgres", dbname=rig.dbname, autocommit=True)
    try:
        lock.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        waiting = rig.start(config, wait_ready=False)
        wait_for(
            lambda: waiting.health()["status"] == "starting", 20, "starting while migrations wait"
        )
        signalled = time.monotonic()
        waiting.signal(signal.SIGTERM)
        assert waiting.wait(15) == 0, waiting.output
        seconds = time.monotonic() - signalled
        assert seconds <= 5, f"exit took {seconds:.1f}s"
        assert "stopped before the restore completed" in waiting.output
        assert "Traceback" not in waiting.output, waiting.output
        assert not scripted.clients
    finally:
        lock.close()
    again = rig.start(config)
    scripted.wait_client()
    more: list[Tick] = [("SOLUSDT", 199.5, m + 9_000)]
    scripted.send(more)
    wait_accepted(again, lambda: len(more))
    peak = peak_mb(again)
    stop(again)
    assert_minutes(minute_rows(rig), expected_with_times(ticks + more))
    figures.update(
        scenario="SIGTERM while the start waits on PostgreSQL (migration lock held)",
        ticks_sent=len(ticks) + len(more),
        ticks_accepted=len(ticks) + len(more),
        ticks_stored=len(ticks) + len(more),
        late=0,
        ticks_lost=0,
        rows_doubled=0,
        recovery_s=None,
        recovery_note=f"exit 0 after {seconds:.2f} s (shutdown_timeout_s 5); the next start "
        "resumes the minute",
        peak_rss_mb=peak,
        shutdown_s=round(seconds, 2),
    )
