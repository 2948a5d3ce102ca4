"""PostgreSQL goes away behind a test-owned proxy: the journal keeps every row (contract:
PostgreSQL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.e2e.test_aggregates import (
    MINUTE,
    assert_rows_match,
    expected,
    minute_now,
    rows,
    ticks_for,
)
from tests.faults.conftest import (
    Rig,
    assert_healthy_process,
    peak_mb,
    stop,
    updates_total,
    wait_accepted,
)
from tests.procs import PYTHON, ScriptedFeed, wait_for

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


# --- rows that can be written nowhere: pending_rows_max --------------------------------------

# The process may write no byte to any file (RLIMIT_FSIZE 0; Python ignores SIGXFSZ, so a write
# fails with EFBIG): a full disk for it alone. Everything it logs goes to a pipe.
FULL_DISK = (
    "import resource, runpy; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
    "runpy.run_module('marketflow', run_name='__main__', alter_sys=True)"
)
SYMBOLS5 = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")


def refused(mf: Any) -> int:
    return int(mf.health()["pipeline"]["refused"])


def test_postgres_down_and_a_full_disk_refuse_new_minutes_at_pending_rows_max(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards `pending_rows_max`, which bounded nothing. PostgreSQL is cut and the journal
    cannot be written (a full disk): closed minutes stay in memory, and once `pending_rows_max`
    of them are held, ticks that would open a new minute are refused — loudly (an ERROR line,
    `pipeline.refused`, `marketflow_refused_ticks_total`) — while held minutes still take
    theirs; the process never crashes. Once PostgreSQL takes writes again the held rows land
    and new minutes are accepted; every accepted tick is stored."""
    scripted = rig.own(ScriptedFeed())
    config = rig.config([scripted], {**APP, "pending_rows_max": 4})
    mf = rig.start(config, command=[PYTHON, "-c", FULL_DISK])
    scripted.wait_client()
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    rig.proxy.cut()
    wait_for(lambda: mf.health()["postgres"]["status"] == "down", 5, "outage seen")
    m = minute_now()
    held = [(s, 1.0 + i, m - MINUTE + 1000 * (i + 1)) for i, s in enumerate(SYMBOLS5)]
    scripted.send(held)  # five closed minutes: neither PostgreSQL nor the disk takes them
    wait_for(lambda: "pending_rows_max reached" in mf.output, 10, "the bound reached, logged")
    assert "journal append failed" in mf.output
    new_minutes = [("BTCUSDT", 2.0, m - 2 * MINUTE + 500), ("ETHUSDT", 3.0, m - 2 * MINUTE + 700)]
    same_minute = [("BTCUSDT", 1.5, m - MINUTE + 30_000)]
    scripted.send(new_minutes + same_minute)
    wait_for(lambda: refused(mf) == len(new_minutes), 10, "new minutes refused")
    wait_for(lambda: updates_total(mf) == len(held) + len(same_minute), 10, "held minute folded")
    health = mf.get("/health")
    assert health.status_code == 503 and health.json()["pipeline"]["pending_rows"] == 0
    metrics = mf.get("/metrics").text
    assert f"marketflow_refused_ticks_total {float(len(new_minutes))}" in metrics
    error_lines = [ln for ln in mf.lines if "pending_rows_max reached" in ln]
    assert len(error_lines) == 1 and "error" in error_lines[0].lower()
    assert_healthy_process(mf)
    peak = peak_mb(mf)
    rig.proxy.restore()
    restored_at = time.monotonic()
    wait_for(lambda: "new minutes accepted" in mf.output, 20, "rows written, bound lifted")
    recovery = time.monotonic() - restored_at
    scripted.send(new_minutes)  # the same ticks again: accepted now
    accepted = held + same_minute + new_minutes
    wait_for(lambda: updates_total(mf) == len(accepted), 10, "new minutes accepted")
    assert refused(mf) == len(new_minutes)
    total, shutdown_s = stop(mf)
    assert total == len(accepted)
    assert_rows_match(rows(rig.dbname), expected(accepted))
    stored = sum(rig.pg_ticks().values())
    assert stored == total and rig.pg_duplicate_rows() == 0
    sent = len(accepted) + len(new_minutes)
    figures.update(
        scenario="PostgreSQL cut and the disk full (journal refused), pending_rows_max = 4",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        refused=len(new_minutes),
        ticks_lost=total - stored,
        rows_doubled=0,
        recovery_s=round(recovery, 2),
        recovery_note=f"{len(new_minutes)} ticks opening new minutes refused (logged, counted); "
        "restore -> held rows written, new minutes accepted",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


# --- no answer silently omits a minute --------------------------------------------------------


def meta_horizon_ms(rig: Rig, key: str) -> int:
    with rig.redis_client() as r:
        return int(r.hget(f"meta:{{{key}}}", "horizon") or 0)


def test_journaled_minutes_pruned_from_memory_are_never_silently_missing_from_an_answer(
    rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards answers that missed minutes after an outage: a journaled minute left memory after
    `window_seconds` while PostgreSQL did not hold it yet, and for up to the replay's backoff a
    long period answered 200 without it. With `window_seconds` = 60 the minute is journaled
    (PostgreSQL cut) and pruned within two minutes; from then until after the replay, the same
    question, polled every 20 ms, is a 503 or a 200 that counts the minute's ticks — never a
    200 without them."""
    scripted = rig.own(ScriptedFeed())
    mf = rig.start(rig.config([scripted], {**APP, "window_seconds": 60}))
    scripted.wait_client()
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    rig.proxy.cut()
    wait_for(lambda: mf.health()["postgres"]["status"] == "down", 5, "outage seen")
    now = int(time.time() * 1000)
    m = now // MINUTE * MINUTE
    ticks = [("BTCUSDT", 100.0 + i, max(m, now - 1000 * i)) for i in range(5)]
    scripted.send(ticks)
    wait_for(lambda: updates_total(mf) == len(ticks), 10, "ticks folded")
    wait_for(lambda: pending(mf) >= 1, 90, "the closed minute journaled")
    wait_for(
        lambda: meta_horizon_ms(rig, "exchange1:BTCUSDT") > m, 150, "the minute pruned from memory"
    )
    path = "/prices/average/exchange1/BTCUSDT?period=10m"
    answer = mf.get(path)
    assert answer.status_code == 503, answer.text
    want_avg = sum(p for _, p, _ in ticks) / len(ticks)
    rig.proxy.restore()
    restored_at = time.monotonic()
    statuses: list[int] = []

    def complete() -> dict[str, Any] | None:
        response = mf.get(path)
        statuses.append(response.status_code)
        if response.status_code == 503:
            return None
        body: dict[str, Any] = response.json()
        omitted = f"an answer without the journaled minute: {response.status_code} {body}"
        assert response.status_code == 200, omitted  # a 404 "no data" omits it too
        assert body["count"] == len(ticks), omitted
        return body

    body = wait_for(complete, 30, "the answer with the replayed minute", interval=0.02)
    recovery = time.monotonic() - restored_at
    assert abs(body["price"] - want_avg) < 1e-9
    assert pending(mf) == 0
    for _ in range(20):  # and it stays complete
        complete()
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == stored == len(ticks) and rig.pg_duplicate_rows() == 0
    figures.update(
        scenario="Minute journaled (PostgreSQL cut) and pruned from memory (window_seconds 60), "
        "then PostgreSQL back; the same 10m question polled every 20 ms",
        ticks_sent=len(ticks),
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=len(ticks) - stored,
        rows_doubled=0,
        answers_503=statuses.count(503),
        answers_200_incomplete=0,
        recovery_s=round(recovery, 2),
        recovery_note=f"restore -> first complete 200 ({statuses.count(503)} answers 503 "
        "before it, none 200 without the minute)",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


# --- a PostgreSQL that answers but refuses writes ---------------------------------------------


@pytest.fixture
def writer_role() -> Iterator[str]:
    """A login role of this test's own, for marketflow to connect as (a superuser bypasses
    privileges). Requested before `rig`, so it is dropped after the rig dropped its database."""
    name = f"mfwriter_{uuid.uuid4().hex[:10]}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def admin(dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname, autocommit=True)


def terminate_backends(dbname: str) -> None:
    """Drop every session on `dbname` (as a failover or a restart would): they reconnect."""
    with admin() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )


def postgres_down_with(mf: Any, text: str) -> dict[str, Any] | None:
    health = mf.health()
    found = health["postgres"]
    if found["status"] == "down" and text in (found["error"] or "") and health["status"] != "ok":
        return dict(found)
    return None


def test_postgres_that_answers_select_1_but_refuses_upserts_is_down_at_once_and_recovers(
    writer_role: str, rig: Rig, figures: dict[str, Any]
) -> None:
    """Guards health that lied: PostgreSQL was `ok` whenever `SELECT 1` answered on the API
    reader's connection, though it refused every upsert. Twice: INSERT/UPDATE on `aggregates`
    revoked from the role marketflow connects as, then the database made read-only (as a
    failed-over replica would be, sessions dropped). Each time, with no write due yet, the
    probe's own connection shows postgres `down` with the reason within 2 s; a minute written
    meanwhile fails with the write's error and waits in the journal; once writes are allowed
    again postgres is `ok` by itself and the journal is replayed."""
    scripted = rig.own(ScriptedFeed())
    mf = rig.start(rig.config([scripted], APP, postgres={"user": writer_role}))
    scripted.wait_client()
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    role = sql.Identifier(writer_role)
    database = sql.Identifier(rig.dbname)
    m = minute_now()
    sent: list[Any] = []
    detected: list[float] = []
    recovered: list[float] = []
    phases = [
        (
            sql.SQL("REVOKE INSERT, UPDATE ON aggregates FROM {}").format(role),
            sql.SQL("GRANT INSERT, UPDATE ON aggregates TO {}").format(role),
            rig.dbname,
            False,  # in force on the open sessions at once
            "no INSERT/UPDATE privilege",
            "permission denied for table aggregates",
            ticks_for(m - 3 * MINUTE, "BTCUSDT", [100.0, 101.0, 99.0]),
        ),
        (
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database),
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(database),
            "postgres",
            True,  # for new sessions: drop the open ones, as a failover would
            "transactions are read-only",
            "read-only transaction",
            ticks_for(m - 2 * MINUTE, "ETHUSDT", [3000.0, 3002.5]),
        ),
    ]
    for refuse, allow, where, reconnect, reason, write_error, ticks in phases:
        with admin(where) as conn:
            changed = time.monotonic()
            conn.execute(refuse)
            if reconnect:
                terminate_backends(rig.dbname)
            wait_for(lambda r=reason: postgres_down_with(mf, r), 5, f"postgres down: {reason}")
            detected.append(time.monotonic() - changed)
            assert detected[-1] <= 2.0, f"seen after {detected[-1]:.2f}s"
            with psycopg.connect(
                host="127.0.0.1", user=writer_role, dbname=rig.dbname, autocommit=True
            ) as reader:
                assert reader.execute("SELECT 1").fetchone() == (1,)  # it answers all along
            scripted.send(ticks)
            sent += ticks
            wait_for(
                lambda w=write_error: postgres_down_with(mf, w), 5, f"write error: {write_error}"
            )
            wait_for(lambda: pending(mf) >= 1, 5, "the refused minute journaled")
            assert mf.get("/health").status_code == 503
            conn.execute(allow)
            if reconnect:
                terminate_backends(rig.dbname)
            allowed = time.monotonic()
            wait_for(
                lambda: mf.health()["postgres"]["status"] == "ok" and pending(mf) == 0,
                10,
                "postgres ok again, journal replayed",
            )
            recovered.append(time.monotonic() - allowed)
    wait_for(lambda: mf.health()["status"] == "ok", 5, "healthy again")
    assert_rows_match(rows(rig.dbname), expected(sent))
    assert_healthy_process(mf)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == len(sent) == stored and rig.pg_duplicate_rows() == 0
    figures.update(
        scenario="PostgreSQL answers SELECT 1 but refuses upserts: privilege revoked, then the "
        "database read-only",
        ticks_sent=len(sent),
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=len(sent) - stored,
        rows_doubled=0,
        down_after_s=round(max(detected), 2),
        recovery_s=round(max(recovered), 2),
        recovery_note=f"down with the reason after {max(detected):.2f} s (worst, no write due); "
        "writes allowed -> ok by itself, journal replayed",
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
