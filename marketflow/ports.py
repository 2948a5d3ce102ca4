"""The ports the core talks through. Adapters in `store/` satisfy them structurally.

Store methods are *blocking*: the core calls them through `trio.to_thread.run_sync`, one call
carrying a whole flush or batch, so the per-tick path never waits on a thread hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs

from marketflow.models import Bucket, Key, LatestPrice, MinuteRow, RangeStats


@attrs.frozen
class FlushPlan:
    """Everything one Redis flush writes: the changed latest prices and changed seconds."""

    latest: list[LatestPrice]
    buckets: dict[Key, list[tuple[int, Bucket]]]
    # Keys whose windows should be trimmed and have their TTL refreshed.
    touched: list[Key]
    now_s: int


class PriceStore(Protocol):
    """Latest prices and per-second windows (Redis, contract: Redis)."""

    def write(self, plan: FlushPlan) -> None: ...

    def read_windows(
        self, keys: Sequence[Key], since_s: int
    ) -> dict[Key, list[tuple[int, Bucket]]]: ...

    def read_latest(self, keys: Sequence[Key]) -> dict[Key, LatestPrice]: ...

    def ping(self) -> float:
        """Round-trip time in ms; raises on failure."""
        ...

    def close(self) -> None: ...


class AggregateStore(Protocol):
    """Per-minute aggregates (PostgreSQL, contract: PostgreSQL)."""

    def migrate(self) -> None:
        """Create the database if missing and apply pending migrations under an advisory lock."""
        ...

    def upsert(self, rows: Sequence[MinuteRow]) -> None:
        """Write rows idempotently (insert or overwrite on the unique key) in one transaction."""
        ...

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        """Rows with from_ms <= minute < to_ms, oldest first."""
        ...

    def range_stats(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> RangeStats | None:
        """Count, sum and extremes over minutes in [from_ms, to_ms); None bounds are open."""
        ...

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
        """Candles of `interval_ms` (whole minutes; aligned to UTC, weeks from Monday) over the
        minutes in [from_ms, to_ms) (None: open), each as (start ms, bucket with the first and
        last tick times), oldest first: the first `limit` of them, or the last when
        `newest_first`. An interval without rows has no candle."""
        ...

    def ping(self) -> float:
        """Round-trip time in ms; raises on failure."""
        ...

    def close(self) -> None: ...


class Journal(Protocol):
    """Durable queue of row batches not yet committed to PostgreSQL (contract: PostgreSQL)."""

    def append(self, rows: Sequence[MinuteRow]) -> None:
        """Append one batch and fsync before returning."""
        ...

    def batches(self) -> Iterable[list[MinuteRow]]:
        """Every journaled batch, oldest first."""
        ...

    def truncate(self) -> None: ...

    def __len__(self) -> int:
        """Number of rows waiting."""
        ...
