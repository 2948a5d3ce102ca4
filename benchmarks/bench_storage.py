"""PostgreSQL storage: upsert time for one minute of many series, range_stats over a year.

    .venv/bin/python -m benchmarks.bench_storage [--host 127.0.0.1] [--port 5432] [--user postgres]

Uses a temporary database of its own (created through the store, dropped at the end).
(a) one minute for 10,000 (exchange, symbol) series through `upsert`, in batches of
    `db_batch_size` = 200 rows and bigger ones: new minutes, an overwrite of the last one with
    changed totals, and an identical replay.
(b) `range_stats` over one year of minutes (525,600 rows) of one series stored among three others
    (2,102,400 rows in all), after VACUUM ANALYZE: median of repeated runs, hour-aligned and not,
    next to the plain minute scan the hourly rollup replaces.
Figures and the machine are recorded in docs/storage.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from marketflow.config import PostgresConfig
from marketflow.models import MinuteRow
from marketflow.store.postgres import PostgresAggregateStore

M = 60_000
H = 3_600_000
YEAR_START = 1_735_689_600_000  # 2025-01-01T00:00:00Z
YEAR_MINUTES = 525_600
SERIES = [(f"exchange{e}", f"SYM{s:04d}") for e in range(10) for s in range(1000)]


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def minute_rows(minute: int, bump: float = 0.0) -> list[MinuteRow]:
    return [
        MinuteRow(
            ex, sym, minute, 50, 50 * (100.0 + i % 7) + bump, 99.0, 101.0 + bump, 100.0, 100.5
        )
        for i, (ex, sym) in enumerate(SERIES)
    ]


def upsert_in_batches(store: PostgresAggregateStore, rows: list[MinuteRow], size: int) -> float:
    return timed(lambda: [store.upsert(rows[i : i + size]) for i in range(0, len(rows), size)])


def bench_upserts(store: PostgresAggregateStore, config: PostgresConfig) -> None:
    print(f"(a) upsert one minute of {len(SERIES):,} series (target < 1 s at batch 200)")
    minute = YEAR_START
    store.upsert(minute_rows(minute - M))  # warm up: connection, prepared statements, caches
    for size in (200, 1000, 10_000):
        runs = []
        for _ in range(5):
            minute += M
            runs.append(upsert_in_batches(store, minute_rows(minute), size))
        print(f"    new minute,  batch {size:>6,}: median {statistics.median(runs) * 1000:7.1f} ms"
              f"  (runs: {', '.join(f'{r * 1000:.0f}' for r in runs)} ms)")  # fmt: skip
    changed = upsert_in_batches(store, minute_rows(minute, bump=1.0), 200)
    print(f"    overwrite the last minute with new totals, batch 200: {changed * 1000:7.1f} ms")
    replay = upsert_in_batches(store, minute_rows(minute, bump=1.0), 200)
    print(f"    identical replay of that minute,           batch 200: {replay * 1000:7.1f} ms")
    with _connect(config) as conn:  # what the hourly rollup costs the writes
        conn.execute("ALTER TABLE aggregates DISABLE TRIGGER USER")
        try:
            runs = []
            for _ in range(5):
                minute += M
                runs.append(upsert_in_batches(store, minute_rows(minute), 200))
            changed = upsert_in_batches(store, minute_rows(minute, bump=1.0), 200)
        finally:
            conn.execute("ALTER TABLE aggregates ENABLE TRIGGER USER")
    median = statistics.median(runs) * 1000
    print(f"    for comparison, rollup triggers disabled: new minute {median:.1f} ms,"
          f" overwrite {changed * 1000:.1f} ms (batch 200)")  # fmt: skip


LOAD_SQL = """
INSERT INTO aggregates (exchange, pair_name, "timestamp", tick_count, average_price, min_price,
                        max_price, open_price, close_price)
SELECT %(exchange)s, %(symbol)s,
       timestamptz 'epoch' + (%(start)s::bigint + i * 60000) * interval '1 ms',
       c, p, p - r, p + r, p - r / 2, p + r / 2
  FROM generate_series(0::bigint, %(minutes)s::bigint - 1) AS i,
       LATERAL (SELECT 1 + (random() * 599)::bigint AS c,
                       round((100 + 20 * sin(i / 5000.0) + random())::numeric, 2)::float8 AS p,
                       random() AS r) AS v
"""


def bench_range_stats(store: PostgresAggregateStore, config: PostgresConfig) -> None:
    target = ("exchange1", "BTCUSDT")
    others = [("exchange2", "BTCUSDT"), ("exchange1", "ETHUSDT"), ("exchange3", "SOLUSDT")]
    print(f"(b) range_stats over one year ({YEAR_MINUTES:,} minutes) of one series among "
          f"{len(others)} others (target < 50 ms)")  # fmt: skip
    with _connect(config) as conn:
        conn.execute("TRUNCATE aggregates")
        for exchange, symbol in [target, *others]:
            params = {"exchange": exchange, "symbol": symbol, "start": YEAR_START}
            took = timed(lambda p=params: conn.execute(LOAD_SQL, {**p, "minutes": YEAR_MINUTES}))
            print(f"    loaded {exchange}/{symbol} in {took:.1f} s (rollup kept by the triggers)")
        conn.execute("VACUUM ANALYZE aggregates")
        conn.execute("VACUUM ANALYZE aggregates_hourly")
        (expected,) = conn.execute(
            "SELECT sum(tick_count) FROM aggregates WHERE exchange = %s AND pair_name = %s",
            target,
        ).fetchone()
        year_end = YEAR_START + YEAR_MINUTES * M
        cases = {
            "whole year, hour-aligned": (YEAR_START, year_end),
            "year, ends not on the hour": (YEAR_START - 17 * M, year_end - 23 * M),
            "all history (no bounds)": (None, None),
        }
        for name, (from_ms, to_ms) in cases.items():
            stats = store.range_stats(*target, from_ms, to_ms)  # warm up
            assert stats is not None
            if name != "year, ends not on the hour":
                assert stats.count == expected, (stats.count, expected)
            runs = [timed(lambda f=from_ms, t=to_ms: store.range_stats(*target, f, t))
                    for _ in range(21)]  # fmt: skip
            print(f"    {name:<36} median {statistics.median(runs) * 1000:6.2f} ms"
                  f"  (min {min(runs) * 1000:.2f}, max {max(runs) * 1000:.2f})")  # fmt: skip
        baseline = """
            SELECT sum(tick_count), sum(average_price * tick_count), max(max_price),
                   min(min_price), min("timestamp"), max("timestamp")
              FROM aggregates WHERE exchange = %s AND pair_name = %s"""
        runs = [timed(lambda: conn.execute(baseline, target).fetchone()) for _ in range(5)]
        print(f"    for comparison, one aggregate over the 525,600 minutes themselves (no rollup, "
              f"no argmax): median {statistics.median(runs) * 1000:.1f} ms")  # fmt: skip


def _connect(
    config: PostgresConfig, dbname: str | None = None
) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=config.host, port=config.port, user=config.user, password=config.password or None,
        dbname=dbname or config.dbname, autocommit=True, connect_timeout=5,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    args = parser.parse_args()
    config = PostgresConfig(
        host=args.host,
        port=args.port,
        user=args.user,
        password=os.environ.get("PGPASSWORD", ""),
        dbname=f"mf_bench_{uuid.uuid4().hex[:12]}",
    )
    print(f"machine: {machine()}")
    try:
        # Generous statement timeout: (b) loads a year of minutes in one statement per series.
        with PostgresAggregateStore(config, statement_timeout_ms=600_000) as store:
            store.migrate()  # creates the temporary database
            with _connect(config) as conn:
                print(f"server: {conn.execute('SELECT version()').fetchone()[0]}")  # type: ignore[index]
            bench_upserts(store, config)
            bench_range_stats(store, config)
    finally:
        with _connect(config, "postgres") as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(config.dbname)
                )
            )


if __name__ == "__main__":
    main()
