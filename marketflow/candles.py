"""Candles (contract: candles): intervals, UTC alignment, the request's parameters and range, and
candles built from the parts that hold their ticks.

A candle part is a bucket (`models.Bucket`: count, sum, min, max, first, last and the first and
last tick's ms timestamps) for one interval start `t`. Parts come from held seconds, held minutes
(a resumed row plus its seconds) and stored minutes or hours; merging parts of one key is
`merge_bucket` (they never overlap in time), merging keys is `merge_across` (ties by source name).

Everything above `candle_answer` is pure; `candle_answer` is the request's one async entry point
and reads the read port (`ports.MarketView`) exactly as statistics do (`queries.minute_sources`):
per key, minutes from its first held minute on from memory, older ones from the stored minutes
(`view.stored`), never both; while the view is in fallback (an api process without Redis), stored
minutes alone, marked `"fallback":"postgres"`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs

from marketflow.models import (
    COUNT,
    FIRST,
    FIRST_TS,
    LAST,
    LAST_TS,
    MAX,
    MIN,
    SUM,
    Bucket,
    Key,
    StoreCandles,
    StoreRange,
    merge_bucket,
)
from marketflow.ports import MarketView
from marketflow.queries import QueryError, echo, minute_sources, rfc3339
from marketflow.state import KeyState, seconds_in

SECOND_MS: Final = 1000
MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000
WEEK_MS: Final = 7 * DAY_MS
# 1970-01-01 was a Thursday: weeks start on Monday 1970-01-05 00:00 UTC and every 7 days on.
WEEK_OFFSET_MS: Final = 4 * DAY_MS

INTERVALS: Final[dict[str, int]] = {
    "1s": SECOND_MS,
    "5s": 5 * SECOND_MS,
    "15s": 15 * SECOND_MS,
    "30s": 30 * SECOND_MS,
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": HOUR_MS,
    "2h": 2 * HOUR_MS,
    "4h": 4 * HOUR_MS,
    "6h": 6 * HOUR_MS,
    "12h": 12 * HOUR_MS,
    "1d": DAY_MS,
    "1w": WEEK_MS,
}
INTERVAL_NAMES: Final = {ms: name for name, ms in INTERVALS.items()}
DEFAULT_INTERVAL: Final = "1m"
DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 1000
# Times a request may name: 0001-01-01 .. 9999-12-31 UTC.
MIN_TIME_MS: Final = -62_135_596_800_000
MAX_TIME_MS: Final = 253_402_300_799_999

Parts = dict[int, Bucket]  # interval start (ms) -> the bucket of its ticks


# --- intervals and alignment -------------------------------------------------------------------


def offset_of(interval_ms: int) -> int:
    """Where the grid of `interval_ms` starts: weeks on a Monday, everything else at the epoch
    (every other interval divides a day, so days start at 00:00 UTC)."""
    return WEEK_OFFSET_MS if interval_ms == WEEK_MS else 0


def align(ms: int, interval_ms: int) -> int:
    """The start of the interval holding `ms`."""
    offset = offset_of(interval_ms)
    return ms - (ms - offset) % interval_ms


def align_up(ms: int, interval_ms: int) -> int:
    """The first interval start at or after `ms`."""
    start = align(ms, interval_ms)
    return start if start == ms else start + interval_ms


# --- the request -------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+\- ])(\d{2}):(\d{2}))",
    re.ASCII,
)
_DIGITS = re.compile(r"\d{1,16}", re.ASCII)


def parse_time(text: str, field: str) -> int:
    """`start`/`end`: Unix epoch ms (an ASCII integer) or RFC 3339, to the ms (finer is cut).

    A `+` offset decoded as a space by the query string (an unencoded `+`) is taken as `+`.
    """
    if _DIGITS.fullmatch(text):
        ms = int(text)
    elif (m := _RFC3339.fullmatch(text)) is not None:
        year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
        if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 1, month)[1]):
            raise QueryError(400, f"{field} {echo(text)}: no such date")
        if year == 0 or hour > 23 or minute > 59 or second > 59:
            raise QueryError(400, f"{field} {echo(text)}: no such time")
        ms = calendar.timegm((year, month, day, hour, minute, second)) * 1000
        ms += int((m[7] or "0")[:3].ljust(3, "0"))
        if m[8] is not None:
            off_h, off_m = int(m[9]), int(m[10])
            if off_h > 23 or off_m > 59:
                raise QueryError(400, f"{field} {echo(text)}: bad UTC offset")
            offset = (off_h * 60 + off_m) * MINUTE_MS
            ms -= -offset if m[8] == "-" else offset
    else:
        raise QueryError(
            400,
            f"{field} {echo(text)}: expected Unix epoch milliseconds (1795646511826) or "
            "RFC 3339 (2026-11-25T22:41:51.826Z)",
        )
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise QueryError(400, f"{field} {echo(text)}: outside years 1-9999")
    return ms


@attrs.frozen
class CandleQuery:
    """Validated `interval`, `start`, `end` (ms; None: not given) and `limit`."""

    interval: str = DEFAULT_INTERVAL
    start: int | None = None
    end: int | None = None
    limit: int = DEFAULT_LIMIT

    @property
    def interval_ms(self) -> int:
        return INTERVALS[self.interval]


def _one(values: Sequence[str], field: str) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise QueryError(400, f"{field}: give it at most once")
    if not values[0]:
        raise QueryError(400, f"{field}: empty; leave it out for the default")
    return values[0]


def parse_candle_query(values: Callable[[str], Sequence[str]]) -> CandleQuery:
    """The query string of a candle request; `values(name)` is every value given for `name`."""
    interval = _one(values("interval"), "interval") or DEFAULT_INTERVAL
    if interval not in INTERVALS:
        raise QueryError(400, f"interval {echo(interval)}: expected one of {', '.join(INTERVALS)}")
    raw_start, raw_end = _one(values("start"), "start"), _one(values("end"), "end")
    start = None if raw_start is None else parse_time(raw_start, "start")
    end = None if raw_end is None else parse_time(raw_end, "end")
    if start is not None and end is not None and start >= end:
        raise QueryError(400, "start must be before end")
    limit = DEFAULT_LIMIT
    raw_limit = _one(values("limit"), "limit")
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 6:
            raise QueryError(400, f"limit {echo(raw_limit)}: expected 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise QueryError(400, f"limit {limit}: expected 1 to {MAX_LIMIT}")
    return CandleQuery(interval, start, end, limit)


@attrs.frozen
class CandleSpan:
    """Which candles a request may return: starts in [t_from, t_to) (both aligned; t_from None:
    no lower bound), the first `limit` of them, or the last ones when `newest_first`."""

    interval_ms: int
    t_from: int | None
    t_to: int
    limit: int
    newest_first: bool

    @property
    def empty(self) -> bool:
        return self.t_from is not None and self.t_from >= self.t_to


def plan_span(query: CandleQuery, now_ms: int, window_seconds: int) -> CandleSpan:
    """The candles `query` asks for at wall time `now_ms`.

    Candles have start <= t < end; no candle starts after now. With `start` (alone or with
    `end`) the first `limit` from it, else the last `limit` before `end` (or now). Sub-minute
    intervals exist for whole intervals inside the last `window_seconds`: a range reaching further
    back is trimmed to the window; one that ends before the window is 400.
    """
    iv = query.interval_ms
    end = now_ms + 1 if query.end is None else min(query.end, now_ms + 1)
    t_to = align_up(end, iv)
    t_from = None if query.start is None else align_up(query.start, iv)
    if iv < MINUTE_MS:
        window_from = align_up((now_ms // 1000 - window_seconds + 1) * 1000, iv)
        if t_to <= window_from:
            raise QueryError(
                400,
                f"interval {query.interval}: candles shorter than a minute cover only the last "
                f"{window_seconds} s (window_seconds), from {rfc3339(window_from)}; this range "
                "ends before that",
            )
        t_from = window_from if t_from is None else max(t_from, window_from)
    return CandleSpan(iv, t_from, t_to, query.limit, query.start is None)


# --- building candles --------------------------------------------------------------------------


def merge_across(into: Bucket, other: Bucket) -> None:
    """Fold another source's part into `into`; parts are merged in source-name order, so on equal
    tick times the open and the close stay with the source whose name sorts first."""
    into[COUNT] += other[COUNT]
    into[SUM] += other[SUM]
    if other[MIN] < into[MIN]:
        into[MIN] = other[MIN]
    if other[MAX] > into[MAX]:
        into[MAX] = other[MAX]
    if other[FIRST_TS] < into[FIRST_TS]:
        into[FIRST] = other[FIRST]
        into[FIRST_TS] = other[FIRST_TS]
    if other[LAST_TS] > into[LAST_TS]:
        into[LAST] = other[LAST]
        into[LAST_TS] = other[LAST_TS]


def add_part(parts: Parts, t: int, bucket: Bucket) -> None:
    """Merge one key's `bucket` into its candle at `t` (copied on first use: buckets are live)."""
    got = parts.get(t)
    if got is None:
        parts[t] = list(bucket)
    else:
        merge_bucket(got, bucket)


def group(items: Iterable[tuple[int, Bucket]], interval_ms: int) -> Parts:
    """Buckets of one key (ms start, bucket) in time order, grouped into candles."""
    parts: Parts = {}
    offset = offset_of(interval_ms)
    for ms, bucket in items:
        add_part(parts, ms - (ms - offset) % interval_ms, bucket)
    return parts


def held_seconds(st: KeyState, t_from: int, t_to: int, interval_ms: int) -> Parts:
    """Candles of `st`'s held seconds for starts in [t_from, t_to) (sub-minute intervals)."""
    seconds = sorted(seconds_in(st.buckets, t_from // 1000, t_to // 1000 - 1))
    return group(((sec * 1000, b) for sec, b in seconds), interval_ms)


def held_minutes(st: KeyState, first_minute: int, last_minute: int, interval_ms: int) -> Parts:
    """Candles of `st`'s held minutes first_minute..last_minute (a resumed row plus its seconds)."""
    return group(
        (
            (m * MINUTE_MS, b)
            for m in st.held_minutes()
            if first_minute <= m <= last_minute and (b := st.minute_bucket(m)) is not None
        ),
        interval_ms,
    )


def take(parts: Parts, limit: int, newest_first: bool) -> list[tuple[int, Bucket]]:
    """The first (or last) `limit` candles, oldest first."""
    starts = sorted(parts)
    starts = starts[-limit:] if newest_first else starts[:limit]
    return [(t, parts[t]) for t in starts]


def across(per_source: Mapping[str, Parts]) -> Parts:
    """Candles of several sources merged: sums and extremes, the earliest open and the latest
    close by tick time, ties to the source whose name sorts first."""
    out: Parts = {}
    for source in sorted(per_source):
        for t, bucket in per_source[source].items():
            got = out.get(t)
            if got is None:
                out[t] = list(bucket)
            else:
                merge_across(got, bucket)
    return out


def candle_json(
    t: int, b: Bucket, *, interval_ms: int, now_ms: int, grace_ms: int
) -> dict[str, Any]:
    """One candle as the API answers it; `closed` once the interval's end + grace has passed."""
    return {
        "t": t,
        "open": b[FIRST],
        "high": b[MAX],
        "low": b[MIN],
        "close": b[LAST],
        "average": b[SUM] / b[COUNT],
        "count": int(b[COUNT]),
        "closed": now_ms >= t + interval_ms + grace_ms,
    }


def exact_seconds_from(st: KeyState) -> int:
    """The first ms from which `st`'s held seconds hold every tick: seconds before the horizon
    are gone, and a minute resumed from its stored row keeps that row's ticks (up to its close
    time) in no second."""
    start = st.horizon_s * 1000
    for base in st.minute_base.values():
        start = max(start, int(base[LAST_TS]) + 1)
    return start


# --- the request's entry point -----------------------------------------------------------------


async def candle_answer(
    view: MarketView,
    *,
    symbol: str,
    sources: Sequence[str],
    exchange_label: str,
    interval: str,
    start: int | None,
    end: int | None,
    limit: int,
    now: float,
    window_seconds: int,
    grace_ms: int,
) -> dict[str, Any]:
    """`GET /prices/candles/...` for validated names and query (`parse_candle_query`)."""
    now_ms = int(now * 1000)
    query = CandleQuery(interval, start, end, limit)
    iv = query.interval_ms
    keys = [(s, symbol) for s in sources]
    span = plan_span(query, now_ms, window_seconds)
    if view.fallback and iv < MINUTE_MS:
        raise QueryError(
            503,
            f"interval {interval}: candles shorter than a minute come from memory only, and "
            "Redis is unreachable (answers come from PostgreSQL alone); try 1m or longer",
        )
    if view.fallback:
        per_source = await stored_candles(view, keys, span)
    else:
        per_source = await key_candles(view, keys, span)
    parts = per_source[sources[0]] if len(per_source) == 1 else across(per_source)
    closed_from = now_ms - iv - grace_ms  # a candle starting by then is closed
    body: dict[str, Any] = {
        "symbol": symbol,
        "exchange": exchange_label,
        "interval": interval,
        # candle_json inlined: a thousand calls cost more than the dicts themselves
        "candles": [
            {
                "t": t,
                "open": b[FIRST],
                "high": b[MAX],
                "low": b[MIN],
                "close": b[LAST],
                "average": b[SUM] / b[COUNT],
                "count": int(b[COUNT]),
                "closed": t <= closed_from,
            }
            for t, b in take(parts, span.limit, span.newest_first)
        ],
    }
    if view.fallback:
        body["fallback"] = "postgres"
    return body


async def key_candles(view: MarketView, keys: Sequence[Key], span: CandleSpan) -> dict[str, Parts]:
    """Each key's candles in `span` (at most `span.limit` each, which is enough: the first
    `limit` candles across keys are among each key's first `limit`), by source."""
    state = view.state
    iv = span.interval_ms
    out: dict[str, Parts] = {key[0]: {} for key in keys}
    if span.empty:
        return out
    if iv < MINUTE_MS:
        t_from = span.t_from
        assert t_from is not None  # plan_span bounds sub-minute ranges by the window
        for key in keys:
            st = state.keys.get(key)
            if st is not None:
                t_from = max(t_from, align_up(exact_seconds_from(st), iv))
        for key in keys:
            st = state.keys.get(key)
            if st is not None and t_from < span.t_to:
                out[key[0]] = held_seconds(st, t_from, span.t_to, iv)
        return out
    lo = None if span.t_from is None else span.t_from // MINUTE_MS
    hi = span.t_to // MINUTE_MS - 1
    reads: list[StoreCandles] = []
    for key in keys:
        held_from, store_range = minute_sources(state, key, lo, hi)
        st = state.keys.get(key)
        if held_from is not None and st is not None:
            first = held_from if lo is None else max(held_from, lo)
            out[key[0]] = held_minutes(st, first, hi, iv)
        if store_range is not None:
            reads.append(StoreCandles(store_range, iv, span.limit, span.newest_first))
    if reads:
        stored = await view.stored.candles(reads)
        for read, found in zip(reads, stored, strict=True):
            # `found` may be shared with concurrent requests: never mutated.
            merged: Parts = dict(found)
            for t, bucket in out[read.range.source].items():
                got = merged.get(t)
                if got is None:
                    merged[t] = bucket
                else:  # the interval where stored minutes end and held ones begin
                    merged[t] = combined = list(got)
                    merge_bucket(combined, bucket)
            out[read.range.source] = merged
    return out


async def stored_candles(
    view: MarketView, keys: Sequence[Key], span: CandleSpan
) -> dict[str, Parts]:
    """Each key's candles in `span` from stored minutes alone (the fallback)."""
    if span.empty:
        return {key[0]: {} for key in keys}
    reads = [
        StoreCandles(
            StoreRange(key[0], key[1], span.t_from, span.t_to),
            span.interval_ms,
            span.limit,
            span.newest_first,
        )
        for key in keys
    ]
    found = await view.stored.candles(reads)
    return {read.range.source: dict(parts) for read, parts in zip(reads, found, strict=True)}
