"""Stored minutes for the read path: a range that needs a minute not yet committed is refused."""

from __future__ import annotations

import pytest

from marketflow.health import StoreHealth
from marketflow.minute_reader import MinuteReader
from marketflow.models import Key, MinuteRow, StoreRange
from marketflow.queries import QueryError
from marketflow.store.memory import MemoryAggregateStore

M = 1_795_646_400_000  # a minute start, ms
KEY = ("ex", "BTCUSDT")


def stored(*minutes: int) -> MemoryAggregateStore:
    store = MemoryAggregateStore()
    store.upsert([MinuteRow("ex", "BTCUSDT", m, 2, 20.0, 9.0, 11.0, 9.0, 11.0) for m in minutes])
    store.upsert([MinuteRow("ex", "ETHUSDT", M, 1, 5.0, 5.0, 5.0, 5.0, 5.0)])
    return store


async def test_a_range_reaching_an_unwritten_minute_is_503_though_postgres_answers() -> None:
    """Guards silent omissions: a minute accepted but not yet in PostgreSQL (journaled while it
    was down, and pruned from memory) used to be missing from a 200. PostgreSQL answering is
    not enough: a range reaching the oldest unwritten minute of its key is a 503 naming it,
    and once that minute is committed the same question answers with it."""
    health = StoreHealth("postgres")
    health.ok(1.0)
    unwritten: dict[Key, int] = {KEY: M}
    reader = MinuteReader(stored(M - 60_000), health, unwritten_from=unwritten.get)
    [before] = await reader.range_stats([StoreRange(*KEY, M - 120_000, M)])
    assert before is not None and before.count == 2  # ends before the unwritten minute
    [other] = await reader.range_stats([StoreRange("ex", "ETHUSDT", M - 120_000, M + 60_000)])
    assert other is not None and other.count == 1  # another key: nothing unwritten
    with pytest.raises(QueryError) as refused:
        await reader.range_stats([StoreRange(*KEY, M - 120_000, M + 60_000)])
    assert refused.value.status == 503
    assert "not yet committed" in refused.value.message
    assert "2026-11-25T22:40:00.000Z" in refused.value.message  # names the minute
    reader.store.upsert([MinuteRow("ex", "BTCUSDT", M, 3, 30.0, 9.0, 11.0, 9.0, 11.0)])
    unwritten.clear()  # the replay committed it
    [after] = await reader.range_stats([StoreRange(*KEY, M - 120_000, M + 60_000)])
    assert after is not None and after.count == 5


async def test_postgres_down_is_503_whatever_is_unwritten() -> None:
    health = StoreHealth("postgres")
    health.write_failed(ConnectionError("connection refused"))
    reader = MinuteReader(stored(M - 60_000), health)
    with pytest.raises(QueryError) as refused:
        await reader.range_stats([StoreRange(*KEY, M - 120_000, M)])
    assert refused.value.status == 503
