"""Domain types shared by every layer.

The per-tick path works on plain tuples and lists (an attrs instance per tick costs more than
the whole fold); attrs types describe what crosses module boundaries less often.
"""

from __future__ import annotations

from enum import StrEnum

import attrs

# A parsed, validated update: (symbol, price, timestamp in ms).
Tick = tuple[str, float, int]
# What readers send down the fan-in channel: one source's ticks, in arrival order, and when
# they were read (trio.current_time(), for the ingest latency histogram).
TickBatch = tuple[str, list[Tick], float]
# A key is (source, symbol).
Key = tuple[str, str]

# A per-second bucket is a mutable list, indexed by these positions.
COUNT, SUM, MIN, MAX, FIRST, LAST, FIRST_TS, LAST_TS = range(8)
Bucket = list[float]


class Reject(StrEnum):
    """Why a feed line was refused (contract: feed protocol); the value is the metric label."""

    TOO_LONG = "too_long"
    MALFORMED = "malformed"
    UNKNOWN_SYMBOL = "unknown_symbol"
    BAD_PRICE = "bad_price"
    BAD_TIMESTAMP = "bad_timestamp"


class Mode(StrEnum):
    LIVE = "live"
    TEST = "test"


class SourceStatus(StrEnum):
    CONNECTED = "connected"
    CONNECTING = "connecting"
    DISCONNECTED = "disconnected"


def merge_bucket(into: Bucket, other: Bucket) -> None:
    """Fold a whole bucket into another; `other` counts as arriving later."""
    into[COUNT] += other[COUNT]
    into[SUM] += other[SUM]
    into[MIN] = min(into[MIN], other[MIN])
    into[MAX] = max(into[MAX], other[MAX])
    if other[FIRST_TS] < into[FIRST_TS]:
        into[FIRST] = other[FIRST]
        into[FIRST_TS] = other[FIRST_TS]
    if other[LAST_TS] >= into[LAST_TS]:
        into[LAST] = other[LAST]
        into[LAST_TS] = other[LAST_TS]


def encode_bucket(second: int, bucket: Bucket) -> str:
    """The Redis window member: `second|count|sum|min|max|first|last|first_ms|last_ms`.

    repr() is the shortest decimal that reads back to the same double.
    """
    return (
        f"{second}|{int(bucket[COUNT])}|{bucket[SUM]!r}|{bucket[MIN]!r}|{bucket[MAX]!r}"
        f"|{bucket[FIRST]!r}|{bucket[LAST]!r}|{int(bucket[FIRST_TS])}|{int(bucket[LAST_TS])}"
    )


def decode_bucket(member: str) -> tuple[int, Bucket]:
    """Inverse of `encode_bucket`. The seven-field member written before the tick times were
    kept reads with the second's start and end as its first and last tick times."""
    fields = member.split("|")
    if len(fields) == 9:
        second_s, count, total, low, high, first, last, first_ms, last_ms = fields
        first_ts, last_ts = int(first_ms), int(last_ms)
        second = int(second_s)
    elif len(fields) == 7:
        second_s, count, total, low, high, first, last = fields
        second = int(second_s)
        first_ts, last_ts = second * 1000, second * 1000 + 999
    else:
        raise ValueError(f"not a window member: {member[:40]!r}")
    return second, [
        int(count),
        float(total),
        float(low),
        float(high),
        float(first),
        float(last),
        first_ts,
        last_ts,
    ]


@attrs.frozen
class LatestPrice:
    source: str
    symbol: str
    price: float
    ts: int


def _minute_end(row: MinuteRow) -> int:
    return row.minute + 59_999


@attrs.frozen
class MinuteRow:
    """One (source, symbol, minute) aggregate as stored; `minute` is the ms of its start.

    `open_ms`/`close_ms` are the timestamps of the minute's first and last tick (a row written
    before they were kept reads as the minute's start and end).
    """

    exchange: str
    symbol: str
    minute: int
    count: int
    total: float
    low: float
    high: float
    open: float
    close: float
    open_ms: int = attrs.field(
        default=attrs.Factory(lambda row: row.minute, takes_self=True), kw_only=True
    )
    close_ms: int = attrs.field(default=attrs.Factory(_minute_end, takes_self=True), kw_only=True)
    # The lease epoch of the writer (contract: roles): PostgreSQL refuses a row for a source under
    # an older epoch than the newest it has seen for it. 0: no lease (the guard is off).
    epoch: int = attrs.field(default=0, kw_only=True, eq=False)

    @property
    def average(self) -> float:
        return self.total / self.count

    @classmethod
    def from_bucket(cls, exchange: str, symbol: str, minute: int, b: Bucket) -> MinuteRow:
        return cls(
            exchange,
            symbol,
            minute,
            int(b[COUNT]),
            b[SUM],
            b[MIN],
            b[MAX],
            b[FIRST],
            b[LAST],
            open_ms=int(b[FIRST_TS]),
            close_ms=int(b[LAST_TS]),
        )

    def as_bucket(self) -> Bucket:
        """A row resumed from storage, as a bucket with its first and last tick times."""
        return [
            self.count,
            self.total,
            self.low,
            self.high,
            self.open,
            self.close,
            self.open_ms,
            self.close_ms,
        ]


@attrs.frozen
class Extreme:
    """Highest or lowest price over a range, and where it happened."""

    price: float
    at: int  # ms start of the bucket (second or minute) holding it
    exchange: str


@attrs.frozen
class RangeStats:
    """What a statistics answer needs from one store for one range."""

    count: int
    total: float
    high: Extreme | None
    low: Extreme | None
    first_ms: int  # start of the earliest bucket seen
    last_ms: int  # start of the latest bucket seen


@attrs.frozen
class StoreRange:
    """One stored-minutes range of one key: minutes [from_ms, to_ms); None: from the start."""

    source: str
    symbol: str
    from_ms: int | None
    to_ms: int


@attrs.frozen
class StoreCandles:
    """One stored-candles read: one key's minutes in `range` grouped into candles of
    `interval_ms`; the first `limit` of them, or the last `limit` when `newest_first`."""

    range: StoreRange
    interval_ms: int
    limit: int
    newest_first: bool


@attrs.define
class SourceStats:
    """Live counters of one source, read by /health and /metrics."""

    name: str
    status: SourceStatus = SourceStatus.DISCONNECTED
    messages: int = 0
    rejected_by_reason: dict[str, int] = attrs.Factory(lambda: {r.value: 0 for r in Reject})
    reconnects: int = 0
    last_message_at: float | None = None  # trio.current_time() of the last valid line
    active: bool = False  # part of the current mode

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())
