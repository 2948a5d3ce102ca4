"""The ports the core talks through. Adapters in `store/` satisfy them structurally.

Store methods are *blocking*: the core calls them through `trio.to_thread.run_sync`, one call
carrying a whole flush or batch, so the per-tick path never waits on a thread hop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from marketflow.live import KeyMeta
from marketflow.models import (
    Bucket,
    Key,
    LatestPrice,
    MinuteRow,
    Mode,
    RangeStats,
    StoreCandles,
    StoreRange,
)

if TYPE_CHECKING:
    import trio

    from marketflow.broadcast import PriceHub
    from marketflow.state import MarketState


@attrs.frozen
class FlushPlan:
    """Everything one Redis flush writes, in one pipelined round: the changed latest prices,
    changed seconds and key metas, and the `updates` message announcing them."""

    latest: list[LatestPrice]
    buckets: dict[Key, list[tuple[int, Bucket]]]
    # Keys whose windows should be trimmed and have their TTL refreshed.
    touched: list[Key]
    now_s: int
    meta: list[KeyMeta] = attrs.Factory(list)
    # These keys' windows are replaced whole (deleted first): after a restore or an outage.
    rewritten: list[Key] = attrs.Factory(list)
    rewrite: bool = False  # any key rewritten
    message: bytes | None = None  # published on the `updates` channel in the same round
    # Per touched key, the first second memory holds: the window is trimmed below it (and at
    # most to `window_seconds` when no horizon is known), never inside a held minute.
    horizons: dict[Key, int] = attrs.Factory(dict)


class PartialWrite(Exception):
    """A flush some Redis Cluster nodes refused: the keys on them (`covers`) were not written and
    must be rewritten once their node answers; the other nodes' keys were written when
    `written_any`. The message names the failed nodes."""

    def __init__(
        self,
        message: str,
        *,
        nodes: Sequence[str],
        covers: Callable[[Key], bool],
        written_any: bool,
    ) -> None:
        super().__init__(message)
        self.nodes = list(nodes)
        self.covers = covers
        self.written_any = written_any


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


class Subscription(Protocol):
    """Messages of the channels subscribed to, on a connection of their own (blocking)."""

    def drain(self, timeout_s: float) -> list[bytes]:
        """Wait up to `timeout_s` for a message, then take every one already there."""
        ...

    def close(self) -> None: ...


class LeaseStore(Protocol):
    """Leases per source in Redis (contract: roles); blocking, like every store port."""

    def acquire_lease(self, source: str, instance: str, ttl_ms: int) -> int | None:
        """The new epoch when the lease was free and is now ours; None when held."""
        ...

    def renew_lease(self, source: str, instance: str, ttl_ms: int) -> bool: ...

    def release_lease(self, source: str, instance: str) -> None: ...

    def lease_holder(self, source: str) -> str | None: ...


class LiveStore(LeaseStore, Protocol):
    """What processes share through Redis besides the prices (contract: Redis, roles): the
    mode, each ingesting instance's status, the `updates` and `control` channels, and a
    whole-state read for mirrors."""

    @property
    def updates_channel(self) -> str: ...

    @property
    def control_channel(self) -> str: ...

    def read_snapshot(
        self, keys: Sequence[Key]
    ) -> tuple[dict[Key, list[tuple[int, Bucket]]], dict[Key, LatestPrice], dict[Key, KeyMeta]]: ...

    def get_mode(self) -> str | None: ...

    def set_mode(self, mode: str, ttl_ms: int) -> None: ...

    def keep_mode(self, mode: str, ttl_ms: int) -> str: ...

    def write_status(self, instance: str, body: bytes, ttl_ms: int) -> None: ...

    def read_statuses(self) -> list[bytes]: ...

    def publish(self, channel: str, body: bytes) -> int: ...

    def subscribe(self, *channels: str) -> Subscription: ...

    def ping(self) -> float: ...

    def close(self) -> None: ...


class AggregateStore(Protocol):
    """Per-minute aggregates (PostgreSQL, contract: PostgreSQL)."""

    def migrate(self) -> None:
        """Create the database if missing and apply pending migrations under an advisory lock."""
        ...

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        """Write rows idempotently (insert or overwrite on the unique key) in one transaction;
        return how many were refused by fencing (a source's rows under an older epoch)."""
        ...

    def register_epoch(self, exchange: str, epoch: int) -> int:
        """Fence the source at `epoch` now (not at its first row); returns the newest epoch."""
        ...

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        """Rows with from_ms <= minute < to_ms, oldest first."""
        ...

    def range_stats(
        self, exchange: str, symbol: str, from_ms: int | None, to_ms: int | None
    ) -> RangeStats | None:
        """Count, sum and extremes over minutes in [from_ms, to_ms); None bounds are open."""
        ...

    def latest_row(self, exchange: str, symbol: str) -> MinuteRow | None:
        """The newest stored minute of one key."""
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

    async def candles(self, reads: Sequence[StoreCandles]) -> list[list[tuple[int, Bucket]]]:
        """Each read's candles (start ms, bucket), oldest first, in one thread hop. Answers are
        shared only while in flight (a thousand candles each: seldom asked twice); callers
        never mutate them."""
        ...

    async def latest_rows(self, keys: Sequence[Key]) -> dict[Key, MinuteRow]:
        """Each key's newest stored minute (the fallback's latest price)."""
        ...


class MarketView(Protocol):
    """The read port (the query context): the market state (ingested here, or mirrored), the
    stored minutes older than it, the current mode's sources and the wall clock."""

    @property
    def state(self) -> MarketState: ...

    @property
    def stored(self) -> StoredMinutes: ...

    @property
    def fallback(self) -> bool:
        """True while answers come from stored minutes alone (an api process without Redis)."""
        ...

    @property
    def fresh_ms(self) -> int:
        """How long a latest price stays current after its timestamp."""
        ...

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
