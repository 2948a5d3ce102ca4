"""Several aggregate stores behind one `AggregateStore`: each call takes a free one.

The API's reads go through this (`minute_reader.MinuteReader`), so a request's PostgreSQL read
runs beside another's (on another connection, in another thread) instead of queueing behind it;
thread hops are still bounded by the reader's `trio.CapacityLimiter`, sized to the number of
stores.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

from marketflow.models import Bucket, MinuteRow, RangeStats
from marketflow.ports import AggregateStore


class StorePool:
    """Owns `stores` (one connection each); blocking and thread-safe like them."""

    def __init__(self, stores: Sequence[AggregateStore]) -> None:
        if not stores:
            raise ValueError("a pool needs at least one store")
        self._stores = list(stores)
        self._free: queue.SimpleQueue[AggregateStore] = queue.SimpleQueue()
        for store in self._stores:
            self._free.put(store)

    def _with[T](self, call: Callable[[AggregateStore], T]) -> T:
        store = self._free.get()
        try:
            return call(store)
        finally:
            self._free.put(store)

    def migrate(self) -> None:
        self._with(lambda store: store.migrate())

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        return self._with(lambda store: store.upsert(rows))

    def register_epoch(self, exchange: str, epoch: int) -> int:
        return self._with(lambda store: store.register_epoch(exchange, epoch))

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        return self._with(lambda store: store.rows(exchange, symbol, from_ms, to_ms))

    def latest_row(self, exchange: str, symbol: str) -> MinuteRow | None:
        return self._with(lambda store: store.latest_row(exchange, symbol))

    def range_stats(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> RangeStats | None:
        return self._with(lambda store: store.range_stats(exchange, symbol, from_ms, to_ms))

    def candles(
        self,
        exchange: str,
        symbol: str,
        interval_ms: int,
        from_ms: int | None,
        to_ms: int,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[int, Bucket]]:
        return self._with(
            lambda store: store.candles(
                exchange, symbol, interval_ms, from_ms, to_ms, limit, newest_first
            )
        )

    def ping(self) -> float:
        return self._with(lambda store: store.ping())

    def close(self) -> None:
        for store in self._stores:
            store.close()
