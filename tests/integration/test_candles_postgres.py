"""Candles from PostgreSQL: whole hours from the rollup, minutes at the edges, every interval,
limit and direction, equal to the candles the in-memory store groups from the minutes."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketflow.candles import INTERVALS, MINUTE_MS
from marketflow.config import PostgresConfig
from marketflow.models import MinuteRow
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.postgres import CANDLE_SQL, PostgresAggregateStore, candle_params

H = 3_600_000
W0 = 1_795_392_000_000  # Monday 2026-11-23 00:00:00 UTC
SEQ_SCAN = re.compile(r"Seq Scan")
MINUTE_INTERVALS = [name for name, ms in INTERVALS.items() if ms >= MINUTE_MS]


def connect(config: PostgresConfig) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=config.host, port=config.port, user=config.user, dbname=config.dbname,
        autocommit=True, connect_timeout=2,
    )  # fmt: skip


@pytest.fixture
def store(pg_config: PostgresConfig) -> Iterator[PostgresAggregateStore]:
    with PostgresAggregateStore(pg_config) as store:
        store.migrate()
        yield store


@st.composite
def minute_rows(draw: st.DrawFn, exchange: str = "ex1") -> MinuteRow:
    """A consistent minute row; prices in quarters, so every sum is exact in both stores."""
    hour = draw(st.integers(-80, 100))  # across days and the week boundary at W0
    minute = W0 + hour * H + draw(st.integers(0, 59)) * MINUTE_MS
    count = draw(st.integers(1, 40))
    quarters = sorted(draw(st.lists(st.integers(400, 440), min_size=4, max_size=4)))
    low, high = quarters[0] / 4, quarters[-1] / 4
    average = draw(st.sampled_from(quarters)) / 4
    open_, close = (draw(st.sampled_from(quarters)) / 4 for _ in range(2))
    first = draw(st.integers(0, 59_999))
    last = draw(st.integers(first, 59_999))
    return MinuteRow(
        exchange,
        "BTCUSDT",
        minute,
        count,
        average * count,
        low,
        high,
        open_,
        close,
        open_ms=minute + first,
        close_ms=minute + last,
    )


bounds = st.one_of(st.none(), st.integers(-90, 110).map(lambda h: W0 + h * H + (h % 7) * 60_000))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(minute_rows(), min_size=1, max_size=120),
    rewrites=st.lists(minute_rows(), max_size=20),
    noise=st.lists(minute_rows("ex2"), max_size=20),
    queries=st.lists(
        st.tuples(
            st.sampled_from(MINUTE_INTERVALS),
            bounds,
            bounds,
            st.one_of(st.integers(1, 30), st.just(1000)),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_candles_from_the_rollup_equal_candles_from_the_minutes(
    store: PostgresAggregateStore,
    pg_config: PostgresConfig,
    rows: list[MinuteRow],
    rewrites: list[MinuteRow],
    noise: list[MinuteRow],
    queries: list[tuple[str, int | None, int | None, int, bool]],
) -> None:
    """Minutes written, some written again (the rollup's update trigger), another series beside
    them: every hourly, daily and weekly candle the rollup gives equals the one grouped from the
    minutes, and so does every shorter one, whatever the range, limit and direction."""
    with connect(pg_config) as conn:
        conn.execute("TRUNCATE aggregates")
    reference = MemoryAggregateStore()
    for batch in (rows, noise, rewrites):
        if batch:
            store.upsert(batch)
            reference.upsert(batch)
    for interval, a, b, limit, newest_first in queries:
        iv = INTERVALS[interval]
        to_ms = b if b is not None else W0 + 200 * H
        from_ms = a if a is None or a < to_ms else None
        want = reference.candles("ex1", "BTCUSDT", iv, from_ms, to_ms, limit, newest_first)
        got = store.candles("ex1", "BTCUSDT", iv, from_ms, to_ms, limit, newest_first)
        assert got == want, (interval, from_ms, to_ms, limit, newest_first)


def test_an_hourly_and_a_daily_candle_by_hand(store: PostgresAggregateStore) -> None:
    """Two hours of one day and a minute of the next: the 1h candles come from the rollup, the
    1d ones group its hours; open and close follow the tick times, not the minute order."""
    day = W0 + 24 * H
    rows = [
        MinuteRow("ex1", "BTCUSDT", day + 5 * MINUTE_MS, 2, 20.0, 9.0, 11.0, 9.0, 11.0,
                  open_ms=day + 5 * MINUTE_MS + 10, close_ms=day + 5 * MINUTE_MS + 50),
        MinuteRow("ex1", "BTCUSDT", day + 3 * MINUTE_MS, 1, 12.0, 12.0, 12.0, 12.0, 12.0,
                  open_ms=day + 3 * MINUTE_MS + 59_000, close_ms=day + 3 * MINUTE_MS + 59_000),
        MinuteRow("ex1", "BTCUSDT", day + H + 59 * MINUTE_MS, 3, 24.0, 7.0, 9.0, 8.0, 7.0,
                  open_ms=day + H + 59 * MINUTE_MS, close_ms=day + H + 59 * MINUTE_MS + 59_999),
        MinuteRow("ex1", "BTCUSDT", day + 24 * H, 1, 5.0, 5.0, 5.0, 5.0, 5.0,
                  open_ms=day + 24 * H + 1, close_ms=day + 24 * H + 1),
    ]  # fmt: skip
    store.upsert(rows)
    hours = store.candles("ex1", "BTCUSDT", H, day, day + 48 * H, 10, False)
    assert hours == [
        (day, [3, 32.0, 9.0, 12.0, 12.0, 11.0, day + 3 * MINUTE_MS + 59_000,
               day + 5 * MINUTE_MS + 50]),
        (day + H, [3, 24.0, 7.0, 9.0, 8.0, 7.0, day + H + 59 * MINUTE_MS,
                   day + H + 59 * MINUTE_MS + 59_999]),
        (day + 24 * H, [1, 5.0, 5.0, 5.0, 5.0, 5.0, day + 24 * H + 1, day + 24 * H + 1]),
    ]  # fmt: skip
    days = store.candles("ex1", "BTCUSDT", 24 * H, None, day + 48 * H, 1, True)
    assert days == [
        (day + 24 * H, [1, 5.0, 5.0, 5.0, 5.0, 5.0, day + 24 * H + 1, day + 24 * H + 1])
    ]
    days = store.candles("ex1", "BTCUSDT", 24 * H, None, day + 48 * H, 2, True)
    assert days[0] == (
        day,
        [6, 56.0, 7.0, 12.0, 12.0, 7.0, day + 3 * MINUTE_MS + 59_000,
         day + H + 59 * MINUTE_MS + 59_999],
    )  # fmt: skip
    week = store.candles("ex1", "BTCUSDT", 7 * 24 * H, None, day + 48 * H, 5, False)
    assert [(t, b[0]) for t, b in week] == [(W0, 7)]


def test_candle_queries_read_indexes_only(
    store: PostgresAggregateStore, pg_config: PostgresConfig
) -> None:
    for exchange in ("ex1", "ex2", "ex3"):
        store.upsert(
            [
                MinuteRow(exchange, "BTCUSDT", W0 + i * MINUTE_MS, 1, 1.0, 1.0, 1.0, 1.0, 1.0)
                for i in range(0, 3 * 24 * 60, 7)
            ]
        )
    with connect(pg_config) as conn:
        conn.execute("VACUUM ANALYZE aggregates")
        conn.execute("VACUUM ANALYZE aggregates_hourly")
        intervals = {"minute": MINUTE_MS, "minutes": 5 * MINUTE_MS, "hour": H, "hours": 4 * H}
        for (kind, _), query in CANDLE_SQL.items():
            iv = intervals[kind]
            hourly = iv >= H
            for from_ms in (None, W0 + 17 * MINUTE_MS):
                params = candle_params("ex2", "BTCUSDT", iv, from_ms, W0 + 50 * H, 100)
                lines = conn.execute("EXPLAIN " + query, params).fetchall()  # type: ignore[call-overload]
                text = "\n".join(line for (line,) in lines)
                assert not SEQ_SCAN.search(text), text
                assert "Index" in text, text
                if hourly:
                    assert "aggregates_hourly_pkey" in text, text
