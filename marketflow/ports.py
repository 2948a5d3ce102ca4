"""The ports the core talks through. Adapters in `store/` satisfy them structurally.

Store methods are *blocking*: the core calls them through `trio.to_thread.run_sync`, one call
carrying a whole flush or batch, so the per-tick path never waits on a thread hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from marketflow.models import Bucket, Key, LatestPrice, MinuteRow, Mode, RangeStats, StoreRange

if TYPE_CHECKING:
    import trio

    from marketflow.broadcast import PriceHub
    from marketflow.state import MarketState


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

    def read_from(self, offset: int) -> Iterable[tuple[int, list[MinuteRow]]]:
        """(offset after it, batch) for each batch from `offset` on, oldest first."""
        ...

    def truncate(self) -> None: ...

    def __len__(self) -> int:
        """Number of rows waiting."""
        ...


# --- the read side: what the API answers from -------------------------------------------------


class StoredMinutes(Protocol):
    """Minutes older than what the market state holds, read from the aggregate store.

    Async and shared by every request: one thread hop per request, identical concurrent reads
    share one query. Raises `queries.QueryError` (503) when the store cannot answer.
    """

    async def range_stats(self, ranges: Sequence[StoreRange]) -> list[RangeStats | None]: ...


class MarketView(Protocol):
    """The read port (the query context): the market state (ingested here, or mirrored), the
    stored minutes older than it, the current mode's sources and the wall clock."""

    @property
    def state(self) -> MarketState: ...

    @property
    def stored(self) -> StoredMinutes: ...

    def sources(self) -> list[str]:
        """The current mode's sources, in configured order."""
        ...

    def now(self) -> float:
        """Wall-clock time in seconds."""
        ...


class NodePort(Protocol):
    """What the HTTP and WebSocket layer asks of the running node, whatever its role."""

    @property
    def view(self) -> MarketView: ...

    @property
    def hub(self) -> PriceHub: ...

    @property
    def stopping(self) -> trio.Event: ...

    def is_ready(self) -> bool:
        """True once the node serves current data (restore done, tasks running)."""
        ...

    def health(self) -> dict[str, Any]:
        """The /health body."""
        ...

    def mode(self) -> Mode: ...

    async def switch_mode(self, mode: Mode) -> dict[str, Any]:
        """Switch the data mode; the body `POST /mode/*` answers."""
        ...

    def metrics(self) -> bytes:
        """Prometheus text exposition."""
        ...
