"""The read side of the API (contract: HTTP API): name and period checks, latest prices and
statistics.

Pure where it can be: names, periods and ranges are plain functions of their input, and the
answers are built from `MarketState` plus, for minutes memory no longer holds, one blocking call
to the aggregate store (one thread hop per request, whatever the number of sources).

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
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Final, Literal, Protocol

import attrs
import trio

from marketflow.config import SOURCE_NAME_RE, SYMBOL_RE, Config, parse_period
from marketflow.flusher import StoreHealth, describe
from marketflow.logs import rate_limited
from marketflow.models import Key, RangeStats
from marketflow.ports import AggregateStore
from marketflow.state import MarketState, combine_stats

log = logging.getLogger("marketflow.queries")

Stat = Literal["highest", "lowest", "average"]
STATS: Final[tuple[Stat, ...]] = ("highest", "lowest", "average")
# A PostgreSQL read never holds a request longer than this; the store's own statement timeout
# bounds the thread, this bounds the wait for the reader connection behind other queries.
QUERY_TIMEOUT_S: Final = 10.0
_ECHO_CHARS = 40  # how much of a refused name an error message repeats


class QueryError(Exception):
    """A request the API refuses: `status` is the HTTP status, `message` the JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _echo(text: str) -> str:
    """A refused input, shortened and quoted, safe to put in an error message or a log line."""
    if len(text) > _ECHO_CHARS:
        return repr(text[:_ECHO_CHARS] + "…")
    return repr(text)


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
            raise QueryError(400, f"bad symbol {_echo(raw)}: expected 2-20 letters or digits")
        symbol = raw.upper()
        if symbol not in self.symbols:
            raise QueryError(404, f"unknown symbol {symbol}")
        return symbol

    def source(self, raw: str) -> str:
        """A configured source name (either mode); 400 if malformed, 404 if not configured."""
        if raw in self.sources:
            return raw
        if not SOURCE_NAME_RE.fullmatch(raw):
            raise QueryError(400, f"bad exchange {_echo(raw)}: expected 1-32 of A-Z a-z 0-9 _ -")
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
                f"period {_echo(text)}: expected whole numbers with units s, m, h or d, "
                "each unit at most once (30s, 5m, 1h30m, 7d)",
            )
        if seconds <= 0:
            raise QueryError(400, f"period {_echo(text)}: must be greater than zero")
        if seconds > self.max_period_s:
            raise QueryError(
                400, f"period {_echo(text)}: longer than the maximum ({self.max_period_text})"
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


def latest_entry(state: MarketState, source: str, symbol: str) -> dict[str, Any] | None:
    st = state.keys.get((source, symbol))
    if st is None or st.latest_ts < 0:
        return None
    ts = st.latest_ts
    return {
        "symbol": symbol,
        "exchange": source,
        "price": st.latest_price,
        "timestamp": ts,
        "time": rfc3339(ts),
    }


def latest_for_source(state: MarketState, source: str, symbol: str) -> dict[str, Any]:
    """`GET /prices/latest/{exchange}/{symbol}` for validated names."""
    entry = latest_entry(state, source, symbol)
    if entry is None:
        raise QueryError(404, f"no price yet for {symbol} on {source}")
    return entry


def latest_across(state: MarketState, sources: Iterable[str], symbol: str) -> dict[str, Any]:
    """`GET /prices/latest/{symbol}`: the freshest (newest timestamp; ties: the first source in
    configured order) of `sources`, plus each source's own latest under `sources`."""
    entries = [e for source in sources if (e := latest_entry(state, source, symbol)) is not None]
    if not entries:
        raise QueryError(404, f"no price yet for {symbol} on the current mode's exchanges")
    best = entries[0]
    for entry in entries[1:]:
        if entry["timestamp"] > best["timestamp"]:
            best = entry
    return {**best, "sources": entries}


# --- statistics --------------------------------------------------------------------------------


class QueryContext(Protocol):
    """What statistics need from the service (`Service` satisfies it)."""

    state: MarketState
    postgres_reader: AggregateStore
    query_limiter: trio.CapacityLimiter
    postgres_health: StoreHealth
    range_cache: RangeCache


class _Flight:
    """One read in progress; its waiters take its answer when `done` is set (if it got one)."""

    __slots__ = ("answer", "done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.answer: Any = None


class RangeCache:
    """Single-flight, short-lived answers to identical PostgreSQL reads.

    The minutes these reads cover are older than anything memory holds, so they change only
    when a journal replay commits; without sharing, 64 clients asking for `?period=1d` queue 64
    identical reads behind the one reader connection. Concurrent identical requests wait for one
    read; its answer serves for `ttl_s` (or not at all once read: `shared(..., keep=False)`).
    Expired answers leave one by one as new ones arrive, so neither memory nor a pause to free
    them grows with the request rate.
    """

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 256) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._answers: dict[Hashable, tuple[float, Any]] = {}  # oldest first
        self._inflight: dict[Hashable, _Flight] = {}

    async def get(self, ctx: QueryContext, ranges: Sequence[StoreRange]) -> list[RangeStats | None]:
        """Statistics over `ranges`, shared."""
        answer: list[RangeStats | None] = await self.shared(
            tuple(ranges), lambda: _read_store_ranges(ctx, ranges)
        )
        return answer

    async def shared(
        self, key: Hashable, read: Callable[[], Awaitable[Any]], *, keep: bool = True
    ) -> Any:
        """`await read()`, or the answer of an identical read (same `key`) in flight, or done
        within `ttl_s` (`keep=False`: in flight only; for large answers seldom asked twice)."""
        while True:
            cached = self._answers.get(key)
            if cached is not None and trio.current_time() - cached[0] < self.ttl_s:
                return cached[1]
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.ok:
                return flight.answer
            # it failed: try ourselves
        flight = self._inflight[key] = _Flight()
        try:
            flight.answer = answer = await read()
            flight.ok = True
            if keep:
                self._keep(key, answer)
            return answer
        finally:
            del self._inflight[key]
            flight.done.set()

    def _keep(self, key: Hashable, answer: Any) -> None:
        now = trio.current_time()
        answers = self._answers
        answers.pop(key, None)  # re-inserted last: the dict stays in time order
        for oldest in list(answers):
            if now - answers[oldest][0] < self.ttl_s and len(answers) < self.max_entries:
                break
            del answers[oldest]
        answers[key] = (now, answer)


@attrs.frozen
class StoreRange:
    """One PostgreSQL range query: minutes [from_ms, to_ms) of one key."""

    source: str
    symbol: str
    from_ms: int | None
    to_ms: int


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


def _read_ranges(store: AggregateStore, ranges: Sequence[StoreRange]) -> list[RangeStats | None]:
    return [store.range_stats(r.source, r.symbol, r.from_ms, r.to_ms) for r in ranges]


async def read_store_ranges(
    ctx: QueryContext, ranges: Sequence[StoreRange]
) -> list[RangeStats | None]:
    """All of a request's PostgreSQL ranges in one thread hop (shared with identical concurrent
    requests); 503 when it cannot answer."""
    health = ctx.postgres_health
    if health.checked and not health.up:
        raise QueryError(
            503,
            "PostgreSQL is unavailable and memory does not hold this whole range; "
            "try a period within the last window_seconds",
        )
    return await ctx.range_cache.get(ctx, ranges)


async def _read_store_ranges(
    ctx: QueryContext, ranges: Sequence[StoreRange]
) -> list[RangeStats | None]:
    return await read_store(ctx, lambda store: _read_ranges(store, ranges))


async def read_store[T](ctx: QueryContext, read: Callable[[AggregateStore], T]) -> T:
    """`read(store)` on the reader connection, in one thread hop; 503 when PostgreSQL is known
    to be down, fails, or does not answer within QUERY_TIMEOUT_S."""
    health = ctx.postgres_health
    if health.checked and not health.up:
        raise QueryError(
            503,
            "PostgreSQL is unavailable and memory does not hold this whole range; "
            "try a period within the last window_seconds",
        )
    with trio.move_on_after(QUERY_TIMEOUT_S) as scope:
        try:
            return await trio.to_thread.run_sync(
                read, ctx.postgres_reader, limiter=ctx.query_limiter
            )
        except Exception as exc:
            if rate_limited("queries.postgres_failed", 10.0):
                log.warning("query failed on postgres", extra={"ctx": {"error": describe(exc)}})
            raise QueryError(
                503,
                f"PostgreSQL query failed ({type(exc).__name__}) and memory does not hold "
                "this whole range",
            ) from exc
    assert scope.cancelled_caught
    raise QueryError(503, "PostgreSQL did not answer in time")


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
    ctx: QueryContext,
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
    plan = plan_range(now, period, window_seconds)
    if plan.resolution == "1s":
        from_s, stats = seconds_stats(ctx.state, keys, plan)
        from_ms = from_s * 1000
    else:
        held, ranges = split_minutes(ctx.state, keys, plan)
        stored = await read_store_ranges(ctx, ranges) if ranges else []
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
