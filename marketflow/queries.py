"""The read side of the API (contract: HTTP API): name and period checks, latest prices and
statistics.

Pure where it can be: names, periods and ranges are plain functions of their input, and the
answers are built from the read port (`ports.MarketView`): the market state — ingested by this
process or mirrored from Redis, the same class either way — plus, for minutes it no longer holds,
one read of the stored minutes (one thread hop per request, whatever the number of sources).

Which store answers what:
- a period P <= `window_seconds`: the 1-second buckets held in memory, seconds now-P+1 .. now;
- a longer period, or all history: whole minutes. Per key, every minute from the key's first
  held minute on comes from memory (its buckets plus any resumed row), every older minute from
  PostgreSQL, so a minute is never counted from both. When memory's horizon already covers the
  range, PostgreSQL is not asked at all, so such answers survive a PostgreSQL outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

import attrs

from marketflow.config import SOURCE_NAME_RE, SYMBOL_RE, Config, parse_period
from marketflow.models import Key, RangeStats, StoreRange
from marketflow.ports import MarketView
from marketflow.state import MarketState, combine_stats

log = logging.getLogger("marketflow.queries")

Stat = Literal["highest", "lowest", "average"]
STATS: Final[tuple[Stat, ...]] = ("highest", "lowest", "average")
_ECHO_CHARS = 40  # how much of a refused name an error message repeats


class QueryError(Exception):
    """A request the API refuses: `status` is the HTTP status, `message` the JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def echo(text: str) -> str:
    """A refused input, shortened and quoted, safe to put in an error message or a log line.

    Bounded after quoting too: repr() writes a control or astral character as up to ten
    characters, so 40 of them could make a 400-character message (found by the fuzz suite)."""
    shown = repr(text[:_ECHO_CHARS] + "…") if len(text) > _ECHO_CHARS else repr(text)
    if len(shown) > 2 * _ECHO_CHARS:
        shown = shown[: 2 * _ECHO_CHARS] + "…"
    return shown


# --- names and periods -------------------------------------------------------------------------


@attrs.frozen
class Period:
    """A validated `period` parameter; `seconds is None` means all retained history."""

    text: str
    seconds: int | None


ALL_HISTORY: Final = Period("all", None)


class Catalog:
    """What a request may name, built once from the config: every check is a set lookup."""

    def __init__(self, config: Config) -> None:
        self.symbols = frozenset(config.app.symbols)
        self.sources = frozenset(config.all_sources)
        self.window_seconds = config.app.window_seconds
        self.max_period_s = config.max_period_s
        self.max_period_text = config.app.max_period

    def symbol(self, raw: str) -> str:
        """`raw` normalised to upper case; 400 if malformed, 404 if not configured."""
        if raw in self.symbols:
            return raw
        if not SYMBOL_RE.fullmatch(raw):
            raise QueryError(400, f"bad symbol {echo(raw)}: expected 2-20 letters or digits")
        symbol = raw.upper()
        if symbol not in self.symbols:
            raise QueryError(404, f"unknown symbol {symbol}")
        return symbol

    def source(self, raw: str) -> str:
        """A configured source name (either mode); 400 if malformed, 404 if not configured."""
        if raw in self.sources:
            return raw
        if not SOURCE_NAME_RE.fullmatch(raw):
            raise QueryError(400, f"bad exchange {echo(raw)}: expected 1-32 of A-Z a-z 0-9 _ -")
        raise QueryError(404, f"unknown exchange {raw}")

    def period(self, values: Sequence[str]) -> Period:
        """The `period` query parameter, given as every value the query string carried."""
        if not values:
            return ALL_HISTORY
        if len(values) > 1:
            raise QueryError(400, "period: give it at most once")
        text = values[0]
        if not text:
            raise QueryError(400, "period: empty; use e.g. 30s, 5m, 1h30m or 7d, or leave it out")
        # PERIOD_RE's \d would also take non-ASCII digits; a period is plain ASCII.
        seconds = parse_period(text) if text.isascii() else None
        if seconds is None:
            raise QueryError(
                400,
                f"period {echo(text)}: expected whole numbers with units s, m, h or d, "
                "each unit at most once (30s, 5m, 1h30m, 7d)",
            )
        if seconds <= 0:
            raise QueryError(400, f"period {echo(text)}: must be greater than zero")
        if seconds > self.max_period_s:
            raise QueryError(
                400, f"period {echo(text)}: longer than the maximum ({self.max_period_text})"
            )
        return Period(text, seconds)


# --- time --------------------------------------------------------------------------------------


def rfc3339(ms: int) -> str:
    """`1795646511826` -> `2026-11-25T...:51.826Z` (UTC, millisecond precision)."""
    seconds, millis = divmod(ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


@attrs.frozen
class Plan:
    """The buckets a statistic reads. Seconds and minutes are inclusive bounds."""

    resolution: Literal["1s", "1m"]
    now_ms: int
    from_s: int = 0  # 1s resolution
    to_s: int = 0
    from_minute: int | None = None  # 1m resolution; None: all retained history
    to_minute: int = 0


def plan_range(now: float, period: Period, window_seconds: int) -> Plan:
    """Choose the resolution and the bucket range for `period` ending at wall time `now`."""
    now_ms = int(now * 1000)
    now_s = now_ms // 1000
    p = period.seconds
    if p is not None and p <= window_seconds:
        return Plan("1s", now_ms, from_s=now_s - p + 1, to_s=now_s)
    from_minute = None if p is None else (now_s - p) // 60
    return Plan("1m", now_ms, from_minute=from_minute, to_minute=now_s // 60)


# --- latest prices -----------------------------------------------------------------------------


def latest_entry(
    state: MarketState, source: str, symbol: str, since_ms: int = -1
) -> dict[str, Any] | None:
    """A key's latest price, if it has one stamped at or after `since_ms` (older is stale)."""
    st = state.keys.get((source, symbol))
    if st is None or st.latest_ts < 0 or st.latest_ts < since_ms:
        return None
    ts = st.latest_ts
    return {
        "symbol": symbol,
        "exchange": source,
        "price": st.latest_price,
        "timestamp": ts,
        "time": rfc3339(ts),
    }


def latest_for_source(
    state: MarketState, source: str, symbol: str, since_ms: int = -1
) -> dict[str, Any]:
    """`GET /prices/latest/{exchange}/{symbol}` for validated names. A price stamped before
    `since_ms` (now minus `redis_ttl_seconds`) is no longer current: 404, in every role."""
    entry = latest_entry(state, source, symbol, since_ms)
    if entry is None:
        raise QueryError(404, f"no current price for {symbol} on {source}")
    return entry


def latest_across(
    state: MarketState, sources: Iterable[str], symbol: str, since_ms: int = -1
) -> dict[str, Any]:
    """`GET /prices/latest/{symbol}`: the freshest (newest timestamp; ties: the first source in
    configured order) of `sources` with a current price, plus each such source's own latest
    under `sources`."""
    entries = [
        e for source in sources if (e := latest_entry(state, source, symbol, since_ms)) is not None
    ]
    return _freshest(entries, symbol)


def _freshest(entries: list[dict[str, Any]], symbol: str) -> dict[str, Any]:
    if not entries:
        raise QueryError(404, f"no current price for {symbol} on the current mode's exchanges")
    best = entries[0]
    for entry in entries[1:]:
        if entry["timestamp"] > best["timestamp"]:
            best = entry
    return {**best, "sources": entries}


async def latest_fallback(
    view: MarketView, sources: Sequence[str], symbol: str, *, across: bool
) -> dict[str, Any]:
    """Latest prices while Redis is unreachable (role api): each source's newest stored minute,
    its close at its close_time, marked `"fallback":"postgres"`."""
    rows = await view.stored.latest_rows([(source, symbol) for source in sources])
    entries = [
        {
            "symbol": symbol,
            "exchange": source,
            "price": row.close,
            "timestamp": row.close_ms,
            "time": rfc3339(row.close_ms),
        }
        for source in sources
        if (row := rows.get((source, symbol))) is not None
    ]
    if not across:
        if not entries:
            raise QueryError(404, f"no stored price for {symbol} on {sources[0]}")
        return {**entries[0], "fallback": "postgres"}
    return {**_freshest(entries, symbol), "fallback": "postgres"}


# --- statistics --------------------------------------------------------------------------------


def minute_sources(
    state: MarketState, key: Key, lo: int | None, hi: int
) -> tuple[int | None, StoreRange | None]:
    """Where `key`'s minutes lo..hi (inclusive; lo None: all history) come from: memory from the
    returned minute on (None: memory holds none of them), and every older one from the returned
    store range (None: memory covers the whole range), so a minute is never read from both."""
    first = state.held_from_minute(key)
    st = state.keys.get(key)
    held_from = first if first is not None and first <= hi else None
    boundary = hi + 1 if first is None else min(first, hi + 1)
    # A horizon of 0 means this key never pruned nor restored: what lies before its first
    # held minute (an earlier run) is unknown, so PostgreSQL is asked.
    covered = lo is not None and st is not None and st.horizon_s > 0 and st.horizon_s // 60 <= lo
    if covered or (lo is not None and lo >= boundary):
        return held_from, None
    return held_from, StoreRange(
        key[0], key[1], None if lo is None else lo * 60_000, boundary * 60_000
    )


def split_minutes(
    state: MarketState, keys: Sequence[Key], plan: Plan
) -> tuple[list[RangeStats | None], list[StoreRange]]:
    """Memory's stats per key over the minutes it holds, and the older ranges only the
    aggregate store can answer (empty when memory's horizon covers the whole range)."""
    assert plan.resolution == "1m"
    lo = plan.from_minute
    hi = plan.to_minute
    held: list[RangeStats | None] = []
    ranges: list[StoreRange] = []
    for key in keys:
        held_from, store_range = minute_sources(state, key, lo, hi)
        if held_from is not None:
            held.append(
                state.minute_stats(key, held_from if lo is None else max(held_from, lo), hi)
            )
        if store_range is not None:
            ranges.append(store_range)
    return held, ranges


def seconds_stats(
    state: MarketState, keys: Sequence[Key], plan: Plan
) -> tuple[int, RangeStats | None]:
    """Stats over the held seconds of `plan`, and the first second they fully cover.

    In steady state memory holds at least the last `window_seconds`; right after a restart a
    key's horizon may be later than the requested start, and the answer then starts there
    (for every key alike, so `from` stays the range actually covered).
    """
    assert plan.resolution == "1s"
    from_s = plan.from_s
    for key in keys:
        st = state.keys.get(key)
        if st is not None and st.horizon_s > from_s:
            from_s = st.horizon_s
    return from_s, state.second_stats(keys, from_s, plan.to_s)


async def statistic(
    view: MarketView,
    *,
    stat: Stat,
    symbol: str,
    sources: Sequence[str],
    exchange_label: str,
    period: Period,
    now: float,
    window_seconds: int,
) -> dict[str, Any]:
    """Answer one statistic over `sources` (already validated names) per the contract's HTTP API."""
    keys = [(source, symbol) for source in sources]
    if view.fallback:
        return await _statistic_from_rows(
            view, keys, stat=stat, symbol=symbol, label=exchange_label, period=period, now=now
        )
    plan = plan_range(now, period, window_seconds)
    if plan.resolution == "1s":
        from_s, stats = seconds_stats(view.state, keys, plan)
        from_ms = from_s * 1000
    else:
        held, ranges = split_minutes(view.state, keys, plan)
        stored = await view.stored.range_stats(ranges) if ranges else []
        stats = combine_stats([*stored, *held])
        if plan.from_minute is not None:
            from_ms = plan.from_minute * 60_000
        else:
            from_ms = stats.first_ms if stats is not None else 0
    if stats is None or stats.count <= 0:
        where = "the current mode's exchanges" if exchange_label == "all" else exchange_label
        span = "retained history" if period.seconds is None else f"the last {period.text}"
        raise QueryError(404, f"no data for {symbol} on {where} in {span}")
    return stat_answer(
        stats,
        stat=stat,
        symbol=symbol,
        exchange_label=exchange_label,
        period=period,
        from_ms=from_ms,
        to_ms=plan.now_ms,
        resolution=plan.resolution,
    )


async def _statistic_from_rows(
    view: MarketView,
    keys: Sequence[Key],
    *,
    stat: Stat,
    symbol: str,
    label: str,
    period: Period,
    now: float,
) -> dict[str, Any]:
    """A statistic while Redis is unreachable (role api): whole minutes from PostgreSQL alone,
    from the minute holding now-P to the current one, marked `"fallback":"postgres"`."""
    plan = plan_range(now, period, 0)  # a window of 0: always minutes
    lo = plan.from_minute
    to_ms = (plan.to_minute + 1) * 60_000
    ranges = [StoreRange(k[0], k[1], None if lo is None else lo * 60_000, to_ms) for k in keys]
    stats = combine_stats(await view.stored.range_stats(ranges))
    if stats is None or stats.count <= 0:
        span = "stored history" if period.seconds is None else f"the last {period.text}"
        raise QueryError(404, f"no stored data for {symbol} on {label} in {span}")
    answer = stat_answer(
        stats,
        stat=stat,
        symbol=symbol,
        exchange_label=label,
        period=period,
        from_ms=stats.first_ms if lo is None else lo * 60_000,
        to_ms=plan.now_ms,
        resolution="1m",
    )
    return {**answer, "fallback": "postgres"}


def stat_answer(
    stats: RangeStats,
    *,
    stat: Stat,
    symbol: str,
    exchange_label: str,
    period: Period,
    from_ms: int,
    to_ms: int,
    resolution: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "symbol": symbol,
        "exchange": exchange_label,
        "stat": stat,
        "period": period.text,
        "from": rfc3339(from_ms),
        "to": rfc3339(to_ms),
        "price": 0.0,
        "count": stats.count,
        "resolution": resolution,
    }
    if stat == "average":
        body["price"] = stats.total / stats.count
        return body
    extreme = stats.high if stat == "highest" else stats.low
    assert extreme is not None  # a range with ticks has both extremes
    body["price"] = extreme.price
    body["at"] = extreme.at
    body["at_exchange"] = extreme.exchange
    return body
