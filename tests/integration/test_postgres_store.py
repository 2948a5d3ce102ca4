"""PostgresAggregateStore on a real PostgreSQL: schema, migrations, upserts, statistics, plans."""

from __future__ import annotations

import logging
import random
import re
import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import attrs
import psycopg
import pytest

from marketflow.config import PostgresConfig
from marketflow.models import Extreme, MinuteRow, RangeStats
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.postgres import (
    RANGE_STATS_SQL,
    ROWS_SQL,
    UPSERT_SQL,
    PostgresAggregateStore,
    PostgresStoreError,
    load_migrations,
    range_params,
    upsert_params,
)

M = 60_000
H = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, an hour start


def row(
    minute: int,
    count: int = 1,
    total: float = 100.0,
    low: float = 100.0,
    high: float = 100.0,
    exchange: str = "ex1",
    symbol: str = "BTCUSDT",
    open_: float | None = None,
    close: float | None = None,
) -> MinuteRow:
    open_ = low if open_ is None else open_
    close = high if close is None else close
    return MinuteRow(exchange, symbol, minute, count, total, low, high, open_, close)


def connect(config: PostgresConfig) -> psycopg.Connection[tuple[object, ...]]:
    """A plain connection to the test database, to check things behind the store's back."""
    return psycopg.connect(
        host=config.host, port=config.port, user=config.user, dbname=config.dbname,
        autocommit=True, connect_timeout=2,
    )  # fmt: skip


@pytest.fixture
def store(pg_config: PostgresConfig) -> Iterator[PostgresAggregateStore]:
    with PostgresAggregateStore(pg_config) as store:
        store.migrate()
        yield store


# -- migrations ------------------------------------------------------------------------------


def test_migrate_creates_schema_and_records_each_migration(pg_config: PostgresConfig) -> None:
    with PostgresAggregateStore(pg_config) as store:
        store.migrate()
    with connect(pg_config) as conn:
        columns = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = 'aggregates'"
            ).fetchall()
        )
        indexes = [d for (d,) in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'aggregates'"
        )]  # fmt: skip
        records = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert columns == {
        "pair_name": "text",
        "exchange": "text",
        "timestamp": "timestamp with time zone",
        "average_price": "double precision",
        "min_price": "double precision",
        "max_price": "double precision",
        "tick_count": "bigint",
        "open_price": "double precision",
        "close_price": "double precision",
        "open_time": "timestamp with time zone",
        "close_time": "timestamp with time zone",
        "epoch": "bigint",
    }
    assert any(
        "CREATE UNIQUE INDEX" in d and '(exchange, pair_name, "timestamp")' in d for d in indexes
    )
    assert any('(pair_name, "timestamp" DESC)' in d for d in indexes)
    assert records[:2] == [(1, "aggregates"), (2, "aggregates_hourly")]
    assert records == [(m.version, m.name) for m in load_migrations()]


def test_rows_written_before_0003_read_their_minute_bounds_as_tick_times(
    pg_config: PostgresConfig,
) -> None:
    """A database at migration 0002 with rows, migrated to 0003: the old rows read as the
    minute's start and end, and each hour of the rollup gets its open and close."""
    old = [m for m in load_migrations() if m.version <= 2]
    with connect(pg_config) as conn, conn.transaction():
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in old:
            conn.execute(migration.script)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        for minute, open_, close in ((T0, 10.0, 11.0), (T0 + M, 12.0, 13.0)):
            conn.execute(
                'INSERT INTO aggregates (pair_name, exchange, "timestamp", average_price,'
                " min_price, max_price, tick_count, open_price, close_price)"
                " VALUES ('BTCUSDT', 'ex1', timestamptz 'epoch' + %s * interval '1 millisecond',"
                " 11.5, 10.0, 13.0, 2, %s, %s)",
                (minute, open_, close),
            )
    with PostgresAggregateStore(pg_config) as store:
        store.migrate()
        found = store.rows("ex1", "BTCUSDT", T0, T0 + H)
    assert [(r.open_ms, r.close_ms) for r in found] == [
        (T0, T0 + 59_999),
        (T0 + M, T0 + M + 59_999),
    ]
    with connect(pg_config) as conn:
        hour = conn.execute(
            "SELECT open_price, (extract(epoch FROM open_time) * 1000)::bigint, close_price,"
            " (extract(epoch FROM close_time) * 1000)::bigint FROM aggregates_hourly"
        ).fetchall()
    assert hour == [(10.0, T0, 13.0, T0 + M + 59_999)]


def test_migrate_twice_is_a_no_op(pg_config: PostgresConfig) -> None:
    with PostgresAggregateStore(pg_config) as store:
        store.migrate()
        with connect(pg_config) as conn:
            before = conn.execute("SELECT * FROM schema_migrations ORDER BY 1").fetchall()
        store.migrate()
    with PostgresAggregateStore(pg_config) as other:
        other.migrate()
    with connect(pg_config) as conn:
        after = conn.execute("SELECT * FROM schema_migrations ORDER BY 1").fetchall()
    assert after == before
    assert len(after) == len(load_migrations())


def test_instances_starting_together_create_the_database_and_migrate_once(
    pg_missing_config: PostgresConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.postgres")
    stores = [PostgresAggregateStore(pg_missing_config) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            for future in [pool.submit(s.migrate) for s in stores]:
                future.result(timeout=30)
    finally:
        for s in stores:
            s.close()
    with connect(pg_missing_config) as conn:
        records = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert records == [(m.version, m.name) for m in load_migrations()]
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("created database")] == [
        f"created database {pg_missing_config.dbname} on 127.0.0.1:5432"
    ]
    assert sorted(m for m in messages if m.startswith("applied migration")) == [
        f"applied migration {m.version:04d}_{m.name}" for m in load_migrations()
    ]


def test_first_call_creates_the_database_and_migrates(pg_missing_config: PostgresConfig) -> None:
    with PostgresAggregateStore(pg_missing_config) as store:
        store.upsert([row(T0)])
        assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == [row(T0)]


# -- upserts and reads -----------------------------------------------------------------------


def test_upsert_then_rows_round_trip(store: PostgresAggregateStore) -> None:
    # Counts are powers of two, so average * count gives back the exact total.
    wanted = [
        attrs.evolve(
            row(T0 + i * M, 2**i, 100.1 * 2**i + i, 99.5 - i, 101.25 + i, open_=100.3, close=100.7),
            open_ms=T0 + i * M + 7,
            close_ms=T0 + i * M + 59_998,
        )
        for i in range(5)
    ]
    others = [row(T0, exchange="ex2"), row(T0, symbol="ETHUSDT"), row(T0 + 5 * M)]
    store.upsert(wanted + others)
    assert store.rows("ex1", "BTCUSDT", T0, T0 + 5 * M) == wanted
    assert store.rows("ex1", "BTCUSDT", T0 + M, T0 + 3 * M) == wanted[1:3]
    assert store.rows("ex2", "BTCUSDT", T0, T0 + H) == [row(T0, exchange="ex2")]
    assert store.rows("ex3", "BTCUSDT", T0, T0 + H) == []


def test_rows_under_an_older_epoch_are_refused_and_counted(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    """Fencing: once a source's rows came with epoch 7, rows of an older epoch (a cut-off
    former holder, or its journal replayed later) are refused; epoch 0 (no lease) is not fenced;
    other sources are not affected."""
    new_holder = [attrs.evolve(row(T0, 5, 500.0), epoch=7)]
    assert store.upsert(new_holder) == 0
    stale = [attrs.evolve(row(T0, 2, 200.0), epoch=6), attrs.evolve(row(T0 + M, 1), epoch=6)]
    assert store.upsert(stale) == 2
    assert [r.count for r in store.rows("ex1", "BTCUSDT", T0, T0 + H)] == [5]
    other_source = [attrs.evolve(row(T0, 3, 300.0, exchange="ex2"), epoch=1)]
    assert store.upsert(other_source) == 0
    assert store.upsert([attrs.evolve(row(T0 + 2 * M, 4, 400.0), epoch=0)]) == 0
    assert store.upsert([attrs.evolve(row(T0 + 3 * M, 1), epoch=8)]) == 0  # a newer one
    assert store.upsert([attrs.evolve(row(T0 + 4 * M, 1), epoch=7)]) == 1  # now 7 is old
    found = {r.minute: r.count for r in store.rows("ex1", "BTCUSDT", T0, T0 + H)}
    assert found == {T0: 5, T0 + 2 * M: 4, T0 + 3 * M: 1}
    with connect(pg_config) as conn:
        epochs = dict(conn.execute("SELECT exchange, epoch FROM source_epochs").fetchall())
    assert epochs == {"ex1": 8, "ex2": 1}


def test_upsert_overwrites_a_minute_with_its_latest_totals(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    store.upsert([row(T0, 2, 200.0, 99.0, 101.0), row(T0 + M, 1, 100.0)])
    latest = row(T0, 4, 402.0, 98.0, 103.0, close=102.0)
    store.upsert([latest])
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == [latest]
    stats = store.range_stats("ex1", "BTCUSDT", None, None)
    assert stats is not None
    assert (stats.count, stats.total) == (5, 502.0)
    assert stats.high == Extreme(103.0, T0, "ex1")
    # Duplicates within one batch: the last one wins.
    store.upsert([row(T0, 1, 50.0, 50.0, 50.0), row(T0, 2, 120.0, 60.0, 60.0)])
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == [row(T0, 2, 120.0, 60.0, 60.0)]
    with connect(pg_config) as conn:
        (count,) = conn.execute("SELECT count(*) FROM aggregates WHERE exchange = 'ex1'").fetchone()
        assert count == 2
        # Replaying identical values writes nothing: the row version (xmin) stays the same.
        (xmin,) = conn.execute("SELECT xmin::text FROM aggregates WHERE tick_count = 2").fetchone()
        store.upsert([row(T0, 2, 120.0, 60.0, 60.0)])
        (again,) = conn.execute("SELECT xmin::text FROM aggregates WHERE tick_count = 2").fetchone()
        assert again == xmin


def test_upsert_rejects_a_row_that_is_not_a_minute(store: PostgresAggregateStore) -> None:
    with pytest.raises(ValueError):
        store.upsert([row(T0 + 1)])
    with pytest.raises(ValueError):
        store.upsert([row(T0, count=0)])
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == []


# -- statistics ------------------------------------------------------------------------------


def test_range_stats_by_hand(store: PostgresAggregateStore) -> None:
    store.upsert(
        [
            row(T0, 2, 200.0, 99.0, 101.0),
            row(T0 + M, 3, 306.0, 100.0, 105.0),
            row(T0 + 2 * M, 1, 95.0, 95.0, 105.0),  # ties the high of T0+M: the earlier wins
            row(T0 + 5 * M, 4, 400.0, 95.0, 104.0),  # ties the low of T0+2M: the earlier wins
            # Other series, never counted.
            row(T0 + M, 9, 9000.0, 1.0, 1000.0, exchange="ex2"),
            row(T0 + M, 9, 9000.0, 0.5, 5000.0, symbol="ETHUSDT"),
        ]
    )
    stats = store.range_stats("ex1", "BTCUSDT", T0, T0 + H)
    assert stats == RangeStats(
        count=10,
        total=1001.0,  # tick-weighted: 100.1 on average, not the mean of minute averages
        high=Extreme(105.0, T0 + M, "ex1"),
        low=Extreme(95.0, T0 + 2 * M, "ex1"),
        first_ms=T0,
        last_ms=T0 + 5 * M,
    )
    assert store.range_stats("ex1", "BTCUSDT", None, None) == stats


def test_range_bounds_are_inclusive_then_exclusive(store: PostgresAggregateStore) -> None:
    store.upsert([row(T0, 1, 10.0, 10.0, 10.0), row(T0 + M, 2, 40.0, 20.0, 20.0)])
    store.upsert([row(T0 + 2 * M, 4, 120.0, 30.0, 30.0)])

    def count(from_ms: int | None, to_ms: int | None) -> int | None:
        stats = store.range_stats("ex1", "BTCUSDT", from_ms, to_ms)
        return None if stats is None else stats.count

    assert count(T0 + M, T0 + 2 * M) == 2
    assert count(T0 + M, T0 + 2 * M + 1) == 6
    assert count(T0 + 1, None) == 6
    assert count(None, T0 + M) == 1
    assert count(T0 + 2 * M, None) == 4
    assert count(T0 + 3 * M, None) is None
    assert count(None, T0) is None
    assert count(T0 + 2 * M, T0) is None
    assert [r.minute for r in store.rows("ex1", "BTCUSDT", T0 + M, T0 + 2 * M)] == [T0 + M]


def _assert_same_stats(actual: RangeStats | None, expected: RangeStats | None) -> None:
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.count == expected.count
    assert actual.total == pytest.approx(expected.total, rel=1e-12)
    assert (actual.high, actual.low) == (expected.high, expected.low)
    assert (actual.first_ms, actual.last_ms) == (expected.first_ms, expected.last_ms)


def test_range_stats_over_hours_match_a_brute_force(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    """The hourly rollup answers like the minutes do, after inserts, overwrites and deletes."""
    rng = random.Random(7)
    prices = [99.0, 99.5, 100.0, 100.5, 101.0]  # few values: many ties on the extremes

    def random_row(minute: int, exchange: str = "ex1") -> MinuteRow:
        low, high = sorted(rng.sample(prices, 2))
        count = rng.randint(1, 50)
        return row(minute, count, count * (low + high) / 2, low, high, exchange=exchange)

    minutes = [T0 + i * M for i in range(6 * 60) if rng.random() < 0.7]
    first = [random_row(m) for m in minutes]
    noise = [random_row(m, "ex2") for m in minutes[::3]]
    reference = MemoryAggregateStore()
    for batch in (first[:100], first[100:] + noise):
        store.upsert(batch)
        reference.upsert(batch)
    overwrites = [random_row(m) for m in rng.sample(minutes, 40)]
    store.upsert(overwrites)
    reference.upsert(overwrites)
    deleted = rng.sample(minutes, 20) + [m for m in minutes if T0 + 2 * H <= m < T0 + 3 * H]
    with connect(pg_config) as conn:
        conn.execute(
            "DELETE FROM aggregates WHERE exchange = 'ex1'"
            ' AND (extract(epoch FROM "timestamp") * 1000)::bigint = ANY(%s)',
            (deleted,),
        )
    for minute in deleted:
        reference.data.pop(("ex1", "BTCUSDT", minute), None)

    bounds: list[tuple[int | None, int | None]] = [(None, None), (T0, T0 + 6 * H)]
    bounds += [(None, T0 + 4 * H + 7 * M), (T0 + 59 * M, None), (T0 + H, T0 + 2 * H)]
    bounds += [(T0 + 2 * H, T0 + 3 * H), (T0 + 2 * H - M, T0 + 3 * H + M)]
    for _ in range(30):
        a, b = sorted(rng.randrange(T0 - H, T0 + 7 * H) for _ in range(2))
        bounds.append((a, b))
    for from_ms, to_ms in bounds:
        expected = reference.range_stats("ex1", "BTCUSDT", from_ms, to_ms)
        _assert_same_stats(store.range_stats("ex1", "BTCUSDT", from_ms, to_ms), expected)
    whole = reference.range_stats("ex1", "BTCUSDT", None, None)
    assert whole is not None and whole.count > 1000  # the data really spans the hours

    with connect(pg_config) as conn:
        conn.execute("TRUNCATE aggregates")
        (hours,) = conn.execute("SELECT count(*) FROM aggregates_hourly").fetchone()
    assert hours == 0
    assert store.range_stats("ex1", "BTCUSDT", None, None) is None


ROLLUP_DIFF_SQL = """
WITH expected AS (
    SELECT exchange, pair_name, date_trunc('hour', "timestamp", 'UTC') AS hour,
           sum(tick_count) AS tick_count, sum(average_price * tick_count) AS price_sum,
           min(min_price) AS min_price,
           (array_agg("timestamp" ORDER BY min_price, "timestamp"))[1] AS min_at,
           max(max_price) AS max_price,
           (array_agg("timestamp" ORDER BY max_price DESC, "timestamp"))[1] AS max_at,
           min("timestamp") AS first_minute, max("timestamp") AS last_minute,
           (array_agg(open_price ORDER BY open_time, "timestamp"))[1] AS open_price,
           min(open_time) AS open_time,
           (array_agg(close_price ORDER BY close_time DESC, "timestamp" DESC))[1] AS close_price,
           max(close_time) AS close_time
      FROM aggregates GROUP BY 1, 2, 3
), actual AS (
    SELECT exchange, pair_name, hour, tick_count, price_sum, min_price, min_at, max_price, max_at,
           first_minute, last_minute, open_price, open_time, close_price, close_time
      FROM aggregates_hourly
)
SELECT (SELECT count(*) FROM (SELECT * FROM expected EXCEPT SELECT * FROM actual) AS missing),
       (SELECT count(*) FROM (SELECT * FROM actual EXCEPT SELECT * FROM expected) AS extra),
       (SELECT count(*) FROM actual)
"""


def test_concurrent_writers_keep_the_rollup_exact(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    """Writers sharing hours (new minutes merge, overwrites recompute) leave no stale hour."""

    def writer(lane: int) -> None:
        rng = random.Random(lane)
        mine = [T0 + i * M for i in range(3 * 60) if i % 4 == lane]  # same hours, own minutes

        def timed(r: MinuteRow) -> MinuteRow:
            """Random open/close prices at random times inside the minute."""
            a, b = sorted(rng.randrange(60_000) for _ in range(2))
            return attrs.evolve(
                r,
                open=rng.choice([r.low, r.high]),
                close=rng.choice([r.low, r.high]),
                open_ms=r.minute + a,
                close_ms=r.minute + b,
            )

        with PostgresAggregateStore(pg_config) as own:
            for start in range(0, len(mine), 5):
                minutes = mine[start : start + 5]
                own.upsert(
                    [
                        timed(row(m, lane + 1, 100.0 * (lane + 1), 90.0 + lane, 110.0))
                        for m in minutes
                    ]
                )
                again = rng.sample(mine[: start + 5], 3)  # overwrite some: integer sums stay exact
                count = rng.randint(1, 9)
                own.upsert(
                    [
                        timed(row(m, count, 100.0 * count, rng.choice([80.0, 95.0]), 120.0))
                        for m in again
                    ]
                )

    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(writer, lane) for lane in range(4)]:
            future.result(timeout=60)
    with connect(pg_config) as conn:
        missing, extra, hours = conn.execute(ROLLUP_DIFF_SQL).fetchone()
        (minutes,) = conn.execute("SELECT count(*) FROM aggregates").fetchone()
    assert (missing, extra, hours, minutes) == (0, 0, 3, 180)


# -- query plans -----------------------------------------------------------------------------

SEQ_SCAN = re.compile(r"Seq Scan on aggregates(_hourly)?\b")


def test_every_query_uses_an_index(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    series = [(f"ex{e}", f"SYM{s}") for e in range(5) for s in range(10)]
    for exchange, symbol in series:
        store.upsert([row(T0 + i * M, exchange=exchange, symbol=symbol) for i in range(6 * 60)])
    with connect(pg_config) as conn:
        conn.execute("VACUUM ANALYZE aggregates")
        conn.execute("VACUUM ANALYZE aggregates_hourly")

        def plan(query: str, params: object) -> str:
            lines = conn.execute("EXPLAIN " + query, params).fetchall()  # type: ignore[call-overload]
            return "\n".join(line for (line,) in lines)

        plans = {
            "rows": plan(
                ROWS_SQL,
                {"exchange": "ex2", "symbol": "SYM3", "from_ms": T0, "to_ms": T0 + 6 * H},
            ),
            "range_stats": plan(
                RANGE_STATS_SQL, range_params("ex2", "SYM3", T0 + 17 * M, T0 + 5 * H + 3 * M)
            ),
            "range_stats_all": plan(RANGE_STATS_SQL, range_params("ex2", "SYM3", None, None)),
            "upsert": plan(UPSERT_SQL, upsert_params([row(T0, exchange="ex2", symbol="SYM3")])),
        }
    for name, text in plans.items():
        assert not SEQ_SCAN.search(text), f"{name}:\n{text}"
    for name in ("rows", "range_stats", "range_stats_all"):
        assert "Index" in plans[name], plans[name]
    assert "aggregates_hourly_pkey" in plans["range_stats"]
    assert "aggregates_exchange_pair_minute_key" in plans["range_stats"]
    assert "Conflict Arbiter Indexes: aggregates_exchange_pair_minute_key" in plans["upsert"]

    # psycopg prepares a statement after a few runs; PostgreSQL may then use a generic plan,
    # made without the parameter values. Force one and see what ran (auto_explain).
    with connect(pg_config) as conn:
        ran: list[str] = []
        conn.add_notice_handler(lambda diag: ran.append(diag.message_primary or ""))
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_level = notice"):
            conn.execute(f"SET auto_explain.{setting}")
        params = {"exchange": "ex2", "symbol": "SYM3", "from_ms": T0, "to_ms": T0 + H}
        conn.execute(ROWS_SQL, params, prepare=True)
        conn.execute(RANGE_STATS_SQL, range_params("ex2", "SYM3", T0 + 17 * M, None), prepare=True)
    generic = "\n".join(ran)
    assert generic.count("Query Text:") == 2
    assert "(exchange = $1)" in generic  # really generic: planned without the values
    assert "Index" in generic
    assert not SEQ_SCAN.search(generic), generic


def test_rollup_triggers_use_indexes(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    """The statements inside the triggers, as PostgreSQL ran them (auto_explain)."""
    with connect(pg_config) as conn:
        # 100 series x 500 hours, one minute each: 50,000 rows in both tables.
        conn.execute(
            'INSERT INTO aggregates (pair_name, exchange, "timestamp", average_price, min_price,'
            " max_price, tick_count, open_price, close_price)"
            " SELECT 'SYM' || s, 'ex' || e, timestamptz 'epoch' + %s * interval '1 millisecond'"
            "        + h * interval '1 hour', 100, 99, 101, 1, 100, 100"
            " FROM generate_series(0, 9) e, generate_series(0, 9) s, generate_series(0, 499) h",
            (T0,),
        )
        conn.execute("VACUUM ANALYZE aggregates")
        conn.execute("VACUUM ANALYZE aggregates_hourly")
        plans: list[str] = []
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
            conn.execute(f"SET auto_explain.{setting}")
        new = [row(T0 + i * M + M, exchange="ex1", symbol="SYM1") for i in range(5)]
        changed = [row(T0 + i * H, 2, 300.0, 99.0, 200.0, "ex1", "SYM1") for i in range(5)]
        for batch in (new, changed):
            conn.execute(UPSERT_SQL, upsert_params(batch))
        conn.execute(
            "DELETE FROM aggregates WHERE exchange = 'ex1' AND pair_name = 'SYM1'"
            " AND \"timestamp\" < timestamptz 'epoch' + %s * interval '1 millisecond'",
            (T0 + 2 * H,),
        )
        (hours,) = conn.execute(
            "SELECT count(*) FROM aggregates_hourly WHERE exchange = 'ex1' AND pair_name = 'SYM1'"
        ).fetchone()
    assert hours == 498
    text = "\n".join(plans)
    # The trigger statements were really captured: the merge, the lock, the delete, the rewrite.
    for statement in (
        "FROM new_minutes",
        "FOR UPDATE",
        "DELETE FROM aggregates_hourly",
        "WITH recomputed AS",
    ):
        assert statement in text
    assert "Index" in text
    assert not SEQ_SCAN.search(text), text


# -- failures --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_password_never_appears_in_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex} 'x=y"
    port = _free_port()
    config = PostgresConfig(host="127.0.0.1", port=port, password=secret, dbname="mf_nowhere")
    with PostgresAggregateStore(config, connect_timeout_s=2) as store:
        started = time.monotonic()
        with pytest.raises(PostgresStoreError) as caught:
            store.ping()
        assert time.monotonic() - started < 5
    error = caught.value
    text = "".join(traceback.format_exception(error)) + repr(error) + repr(config) + caplog.text
    assert str(port) in str(error)  # a real, useful message ...
    assert secret not in text  # ... without the password
    assert secret[3:15] not in text


def test_password_is_scrubbed_from_any_message() -> None:
    config = PostgresConfig(password="s3cr3t")
    store = PostgresAggregateStore(config)
    error = store._sanitized(psycopg.OperationalError("bad: password=s3cr3t host=x, s3cr3t again"))
    assert "s3cr3t" not in str(error)
    assert str(error) == "OperationalError: bad: password=*** host=x, *** again"


def test_reconnects_after_the_connection_is_lost(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    store.upsert([row(T0)])
    with connect(pg_config) as conn:
        (killed,) = conn.execute(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'marketflow'",
            (pg_config.dbname,),
        ).fetchone()
    assert killed == 1
    # The broken connection is noticed and the call retried once on a fresh one.
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == [row(T0)]
    assert store.ping() > 0


def test_a_database_dropped_under_the_store_is_created_and_migrated_again(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    store.upsert([row(T0)])
    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as c:
        c.execute(f'DROP DATABASE "{pg_config.dbname}" WITH (FORCE)')
    assert store.ping() > 0  # the retry reconnects: the database is created and migrated again
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == []
    store.upsert([row(T0, 2, 200.0)])
    assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == [row(T0, 2, 200.0)]


def test_a_user_who_may_not_create_or_connect_gets_the_real_reason(
    pg_missing_config: PostgresConfig,
) -> None:
    role = f"mf_role_{uuid.uuid4().hex[:12]}"
    config = attrs.evolve(pg_missing_config, user=role)
    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as c:
        c.execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
        try:
            with PostgresAggregateStore(config) as store:
                with pytest.raises(PostgresStoreError) as missing:
                    store.migrate()
                c.execute(f'CREATE DATABASE "{config.dbname}"')
                c.execute(f'REVOKE CONNECT ON DATABASE "{config.dbname}" FROM PUBLIC')
                with pytest.raises(PostgresStoreError) as refused:
                    store.migrate()
        finally:
            c.execute(f'DROP ROLE "{role}"')
    assert "permission denied to create database" in str(missing.value)
    assert missing.value.sqlstate == "42501"
    assert f'permission denied for database "{config.dbname}"' in str(refused.value)


def test_a_blocked_statement_is_bounded_by_the_statement_timeout(pg_config: PostgresConfig) -> None:
    with PostgresAggregateStore(pg_config, statement_timeout_ms=200) as store:
        store.migrate()
        with connect(pg_config) as blocker, blocker.transaction():
            blocker.execute("LOCK TABLE aggregates IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(PostgresStoreError) as caught:
                store.rows("ex1", "BTCUSDT", T0, T0 + M)
            elapsed = time.monotonic() - started
        assert caught.value.sqlstate == "57014"  # query_canceled
        assert 0.15 < elapsed < 3
        assert store.rows("ex1", "BTCUSDT", T0, T0 + M) == []
