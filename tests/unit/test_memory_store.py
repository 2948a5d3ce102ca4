"""MemoryAggregateStore keeps the semantics of the PostgreSQL store."""

from __future__ import annotations

import attrs
import pytest

from marketflow.models import Extreme, MinuteRow, RangeStats
from marketflow.store.memory import MemoryAggregateStore

M = 60_000
T0 = 1_767_225_600_000


def row(minute: int, count: int, total: float, low: float, high: float, exchange: str = "ex1",
        symbol: str = "BTCUSDT") -> MinuteRow:  # fmt: skip
    return MinuteRow(exchange, symbol, minute, count, total, low, high, low, high)


def test_upsert_overwrites_on_the_key_and_rows_are_ordered_in_range() -> None:
    store = MemoryAggregateStore()
    store.upsert([row(T0 + 2 * M, 1, 10.0, 10.0, 10.0), row(T0, 1, 5.0, 5.0, 5.0)])
    store.upsert([row(T0, 3, 30.0, 9.0, 11.0), row(T0, 2, 20.0, 9.0, 11.0)])  # last one wins
    assert store.rows("ex1", "BTCUSDT", T0, T0 + 3 * M) == [
        row(T0, 2, 20.0, 9.0, 11.0),
        row(T0 + 2 * M, 1, 10.0, 10.0, 10.0),
    ]
    assert store.rows("ex1", "BTCUSDT", T0 + M, T0 + 2 * M) == []
    assert len(store.batches) == 2


def test_range_stats_by_hand() -> None:
    store = MemoryAggregateStore()
    store.upsert(
        [
            row(T0, 2, 200.0, 99.0, 101.0),
            row(T0 + M, 3, 306.0, 100.0, 105.0),
            row(T0 + 2 * M, 1, 95.0, 95.0, 105.0),
            row(T0 + 5 * M, 4, 400.0, 95.0, 104.0),
            row(T0 + M, 9, 9000.0, 1.0, 1000.0, exchange="ex2"),
            row(T0 + M, 9, 9000.0, 0.5, 5000.0, symbol="ETHUSDT"),
        ]
    )
    assert store.range_stats("ex1", "BTCUSDT", None, None) == RangeStats(
        count=10,
        total=1001.0,
        high=Extreme(105.0, T0 + M, "ex1"),
        low=Extreme(95.0, T0 + 2 * M, "ex1"),
        first_ms=T0,
        last_ms=T0 + 5 * M,
    )
    stats = store.range_stats("ex1", "BTCUSDT", T0 + M, T0 + 2 * M)
    assert stats is not None and (stats.count, stats.first_ms, stats.last_ms) == (3, T0 + M, T0 + M)
    assert store.range_stats("ex1", "BTCUSDT", T0 + 6 * M, None) is None


def test_fail_with_makes_every_call_raise() -> None:
    store = MemoryAggregateStore()
    store.fail_with = ConnectionError("down")
    with pytest.raises(ConnectionError):
        store.upsert([row(T0, 1, 1.0, 1.0, 1.0)])
    with pytest.raises(ConnectionError):
        store.ping()
    store.fail_with = None
    assert store.data == {} and store.ping() == 0.0


def test_the_fake_fences_like_postgres() -> None:
    store = MemoryAggregateStore()
    assert store.upsert([attrs.evolve(row(T0, 1, 1.0, 1.0, 1.0), epoch=3)]) == 0
    assert store.upsert([attrs.evolve(row(T0, 9, 9.0, 1.0, 1.0), epoch=2)]) == 1
    assert store.upsert([attrs.evolve(row(T0 + M, 1, 1.0, 1.0, 1.0), epoch=0)]) == 0
    assert [r.count for r in store.rows("ex1", "BTCUSDT", T0, T0 + 2 * M)] == [1, 1]
