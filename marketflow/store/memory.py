"""In-memory fakes of the store ports, for unit tests and for running without the real stores."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from marketflow.candles import group, take
from marketflow.models import Bucket, Extreme, MinuteRow, RangeStats


class MemoryAggregateStore:
    """Owns a dict of minute rows keyed by (exchange, symbol, minute): a fake `AggregateStore`.

    Same semantics as `PostgresAggregateStore`: an upsert overwrites the row on its key (the last
    of duplicates wins), ranges are [from_ms, to_ms) with None open, ties on an extreme go to the
    earliest minute. `batches` records every upsert call; set `fail_with` to make every call raise
    it, as an unreachable database would.
    """

    def __init__(self) -> None:
        self.data: dict[tuple[str, str, int], MinuteRow] = {}
        self.epochs: dict[str, int] = {}  # the newest lease epoch seen per source
        self.batches: list[list[MinuteRow]] = []
        self.fail_with: Exception | None = None
        self.migrated = False
        self.closed = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def migrate(self) -> None:
        self._check()
        self.migrated = True

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        """As PostgreSQL: rows of a source under an older epoch than its newest are refused."""
        self._check()
        refused = 0
        with self._lock:
            self.batches.append(list(rows))
            for row in rows:
                if row.epoch > 0:
                    self.epochs[row.exchange] = max(self.epochs.get(row.exchange, 0), row.epoch)
            for row in rows:
                if 0 < row.epoch < self.epochs.get(row.exchange, 0):
                    refused += 1
                    continue
                self.data[(row.exchange, row.symbol, row.minute)] = row
        return refused

    def register_epoch(self, exchange: str, epoch: int) -> int:
        self._check()
        with self._lock:
            self.epochs[exchange] = max(self.epochs.get(exchange, 0), epoch)
            return self.epochs[exchange]

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        self._check()
        return self._select(exchange, symbol, from_ms, to_ms)

    def latest_row(self, exchange: str, symbol: str) -> MinuteRow | None:
        self._check()
        found = self._select(exchange, symbol, None, None)
        return found[-1] if found else None

    def range_stats(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> RangeStats | None:
        self._check()
        found = self._select(exchange, symbol, from_ms, to_ms)
        if not found:
            return None
        high = min(found, key=lambda r: (-r.high, r.minute))
        low = min(found, key=lambda r: (r.low, r.minute))
        return RangeStats(
            count=sum(r.count for r in found),
            total=sum(r.total for r in found),
            high=Extreme(high.high, high.minute, exchange),
            low=Extreme(low.low, low.minute, exchange),
            first_ms=found[0].minute,
            last_ms=found[-1].minute,
        )

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
        self._check()
        found = self._select(exchange, symbol, from_ms, to_ms)
        parts = group(((r.minute, r.as_bucket()) for r in found), interval_ms)
        return take(parts, limit, newest_first)

    def ping(self) -> float:
        self._check()
        return 0.0

    def close(self) -> None:
        self.closed = True

    def _select(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> list[MinuteRow]:
        with self._lock:
            found = [
                row
                for (ex, sym, minute), row in self.data.items()
                if ex == exchange
                and sym == symbol
                and (from_ms is None or minute >= from_ms)
                and (to_ms is None or minute < to_ms)
            ]
        found.sort(key=lambda r: r.minute)
        return found
