"""Live candles for the WebSocket stream (contract: WebSocket protocol v1, candles).

`CandleBook` belongs to the `PriceHub` and runs on the Trio thread, inside the hub's step. It
follows the candles of every (symbol, interval) pair some client subscribes to, for every
configured source of the symbol, and reports each step which candles changed. The values are
the ones `GET /prices/candles/...` answers, and they stay exact without a PostgreSQL read per
step:

- A followed key's fold records the seconds it changed (`KeyState.live_dirty`); the step takes
  them, so its work follows what changed, not the number of keys or clients.
- A sub-minute candle is summed from its held seconds (at most 30 lookups).
- A candle of a minute or more is its `frozen` part (what can no longer change: the part
  PostgreSQL held when the pair was first followed, plus every minute memory has let go of
  since) merged with the held minutes still in it. The book keeps its own copy of each held
  minute (`KeyMirror`), refreshed when the minute changes; memory never prunes a minute whose
  changes the book has not taken (`KeyState.prune`), so when a minute falls below the horizon
  its final copy is folded into the frozen part of the candles holding it.
- Starting to follow a pair reads the stored minutes (`acquire`, one thread hop through
  `ports.StoredMinutes`): the part of the intervals not yet closed that lies before what memory
  holds.
- A key whose state was replaced rather than changed tick by tick — a mirror's full read (role
  api: after a gap or a Redis outage, its copies may lack ticks it never saw), or a take-over that
  restored the key afresh — is re-read (`reload`; `keep_exact`, a task of the hub's, re-reads its
  symbol's pairs with retries and replaces their candles, which are then sent again).

Candles are followed from the intervals not yet closed when their pair was first followed; a
candle is forgotten once it is closed and memory holds none of its seconds (then nothing can
change it).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs
import trio

from marketflow.backoff import Backoff
from marketflow.candles import (
    INTERVAL_NAMES,
    MINUTE_MS,
    align,
    align_up,
    candle_json,
    exact_seconds_from,
    merge_across,
)
from marketflow.logs import rate_limited
from marketflow.models import Bucket, Key, StoreCandles, StoreRange, merge_bucket
from marketflow.ports import StoredMinutes
from marketflow.queries import QueryError
from marketflow.state import KeyState, MarketState

log = logging.getLogger("marketflow.ws")

CandleKey = tuple[str, str, str, int]  # (source or "all", symbol, interval name, start ms)
Entry = dict[str, Any]  # a candle as frames carry it: shared, never mutated
Pair = tuple[str, int]  # (symbol, interval ms)
ALL: Final = "all"
ACQUIRE_ATTEMPTS: Final = 3


class LiveCandle:
    """One source's candle: `frozen` holds every minute before `frozen_until` (minute number);
    `value` is the whole candle as last computed (None: no tick yet)."""

    __slots__ = ("frozen", "frozen_until", "value")

    def __init__(self, frozen: Bucket | None, frozen_until: int) -> None:
        self.frozen = frozen
        self.frozen_until = frozen_until
        self.value: Bucket | None = None


class Series:
    """One followed (symbol, interval): its candles by start and source, oldest first."""

    __slots__ = (
        "announced_ms",
        "candles",
        "first_t",
        "interval_ms",
        "name",
        "refs",
        "starts",
        "symbol",
    )

    def __init__(self, symbol: str, interval_ms: int, first_t: int, now_ms: int) -> None:
        self.symbol = symbol
        self.interval_ms = interval_ms
        self.name = INTERVAL_NAMES[interval_ms]
        self.first_t = first_t  # candles before it were closed when following began
        self.candles: dict[int, dict[str, LiveCandle]] = {}
        self.starts: list[int] = []
        self.announced_ms = now_ms  # closings up to this wall time have been announced
        self.refs = 0

    def candle(self, t: int, source: str) -> LiveCandle:
        by_source = self.candles.get(t)
        if by_source is None:
            by_source = self.candles[t] = {}
            bisect.insort(self.starts, t)
        got = by_source.get(source)
        if got is None:
            got = by_source[source] = LiveCandle(None, t // MINUTE_MS)
        return got


class KeyMirror:
    """The book's copy of one key's held minutes from `from_minute` on, taken from `st` (a
    take-over replaces a key's `KeyState`: the book notices by identity)."""

    __slots__ = ("from_minute", "minutes", "st")

    def __init__(self, st: KeyState, from_minute: int, minutes: dict[int, Bucket]) -> None:
        self.st = st
        self.from_minute = from_minute
        self.minutes = minutes


@attrs.frozen
class _Plan:
    """What following some pairs needs, computed before the PostgreSQL read."""

    now_ms: int
    froms: dict[Key, int]  # per key, the minute memory is complete from
    starts: dict[Pair, list[int]]
    first_t: dict[Pair, int]
    reads: list[tuple[Pair, str, int, StoreCandles]]  # (pair, source, start, read)


class CandleBook:
    """Owns the followed series and the key mirrors; every method runs on the Trio thread."""

    def __init__(
        self,
        state: MarketState,
        stored: StoredMinutes,
        *,
        all_sources: Sequence[str],
        grace_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.stored = stored
        self.all_sources = list(all_sources)
        self.grace_ms = grace_ms
        self.clock = clock
        self.series: dict[Pair, Series] = {}
        self.by_symbol: dict[str, list[Series]] = {}
        self.mirrors: dict[Key, KeyMirror] = {}
        self._current: tuple[str, ...] = ()
        self._stale: set[str] = set()  # symbols whose pairs `keep_exact` must read again
        self._stale_event = trio.Event()
        self._resend: set[Pair] = set()  # pairs read again: every candle goes out once more
        self.reloads = 0  # pairs read again so far (tests)

    # --- following pairs ---------------------------------------------------------------------

    async def acquire(self, pairs: Iterable[Pair]) -> None:
        """Follow `pairs` (counted: each `acquire` is undone by one `release`). Reads the stored
        part of the open intervals in one thread hop; 503 (QueryError) when it cannot, and then
        nothing is followed."""
        wanted = set(pairs)
        for attempt in range(ACQUIRE_ATTEMPTS + 1):
            missing = sorted(p for p in wanted if p not in self.series)
            if not missing:  # counted with no await since the check: nothing can drop them
                for pair in wanted:
                    self.series[pair].refs += 1
                return
            if attempt == ACQUIRE_ATTEMPTS:
                break
            plan = self._plan(missing)
            found = await self._read(plan)
            self._install(missing, plan, found)  # or memory moved meanwhile: plan again
        raise QueryError(503, "memory moved on while candles were being read; try again")

    async def _read(self, plan: _Plan) -> list[list[tuple[int, Bucket]]]:
        if not plan.reads:
            return []
        return await self.stored.candles([read for _, _, _, read in plan.reads])

    def reload(self, keys: Iterable[Key]) -> None:
        """These keys' states were replaced by a full read (a mirror's): follow them afresh and
        read the followed pairs of their symbols again (`keep_exact`). Nothing to do for keys
        nothing follows."""
        for key in keys:
            st = self.state.keys.get(key)
            if key in self.mirrors and st is not None:
                self._refollow(key, st)

    async def keep_exact(self) -> None:
        """Read the pairs of stale symbols again and replace their candles, until cancelled.

        Owned by the hub's nursery; cancelling it leaves nothing half done (a read is installed
        without an await). A read that fails (PostgreSQL down) is retried with backoff;
        meanwhile those candles go on from what the book held, which may lack ticks."""
        backoff = Backoff(0.5, 10.0)
        while True:
            await self._stale_event.wait()
            self._stale_event = trio.Event()
            symbols, self._stale = self._stale, set()
            try:
                await self._reread(symbols)
            except QueryError as exc:
                if rate_limited("candles-reload", 30.0):
                    log.warning(
                        "live candles not read again yet; retrying",
                        extra={"ctx": {"symbols": ",".join(sorted(symbols)), "error": exc.message}},
                    )
                self._stale |= symbols
                self._stale_event.set()
                await trio.sleep(backoff.next())
            else:
                backoff.reset()

    async def _reread(self, symbols: set[str]) -> None:
        for _ in range(ACQUIRE_ATTEMPTS):
            pairs = sorted(p for p in self.series if p[0] in symbols)
            if not pairs:
                return
            plan = self._plan(pairs)
            found = await self._read(plan)
            if self._install(pairs, plan, found, replace=True):
                return
        raise QueryError(503, "memory moved on while candles were being read")

    def release(self, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            series = self.series.get(pair)
            if series is None:
                continue
            series.refs -= 1
            if series.refs > 0:
                continue
            del self.series[pair]
            left = [s for s in self.by_symbol[pair[0]] if s is not series]
            if left:
                self.by_symbol[pair[0]] = left
                continue
            del self.by_symbol[pair[0]]
            for source in self.all_sources:
                self.mirrors.pop((source, pair[0]), None)
                st = self.state.keys.get((source, pair[0]))
                if st is not None:
                    st.live_dirty = None

    def _memory_from(self, key: Key, now_ms: int) -> int:
        """The minute from which the book (or memory, for a key it does not mirror yet) holds
        every minute of `key`."""
        mirror = self.mirrors.get(key)
        if mirror is not None:
            return mirror.from_minute
        return _held_from(self.state.key(*key), now_ms)

    def _plan(self, pairs: Sequence[Pair]) -> _Plan:
        now_ms = int(self.clock() * 1000)
        froms: dict[Key, int] = {}
        starts: dict[Pair, list[int]] = {}
        first_t: dict[Pair, int] = {}
        reads: list[tuple[Pair, str, int, StoreCandles]] = []
        for symbol, iv in pairs:
            keys = [(source, symbol) for source in self.all_sources]
            for key in keys:
                froms[key] = self._memory_from(key, now_ms)
            t = align(now_ms, iv)
            open_starts: list[int] = []
            while t + iv + self.grace_ms > now_ms:
                open_starts.append(t)
                t -= iv
            first = open_starts[-1]
            if iv < MINUTE_MS:  # seconds hold every tick only from here on
                exact = max(exact_seconds_from(self.state.key(*key)) for key in keys)
                first = max(first, align_up(exact, iv))
            starts[(symbol, iv)] = sorted(t for t in open_starts if t >= first)
            first_t[(symbol, iv)] = first
            if iv < MINUTE_MS:
                continue
            for t in starts[(symbol, iv)]:
                for key in keys:
                    held_from_ms = froms[key] * MINUTE_MS
                    if t < held_from_ms:
                        stored = StoreRange(key[0], symbol, t, min(t + iv, held_from_ms))
                        reads.append(((symbol, iv), key[0], t, StoreCandles(stored, iv, 1, False)))
        return _Plan(now_ms, froms, starts, first_t, reads)

    def _install(
        self,
        pairs: Sequence[Pair],
        plan: _Plan,
        found: Sequence[list[tuple[int, Bucket]]],
        *,
        replace: bool = False,
    ) -> bool:
        """Install the planned pairs (`replace`: in place of the followed ones, which are then
        sent again); False (nothing done) if memory moved under the read."""
        for key, from_minute in plan.froms.items():
            if self._memory_from(key, plan.now_ms) != from_minute:
                return False
            if (
                mirror := self.mirrors.get(key)
            ) is not None and mirror.st is not self.state.keys.get(key):
                return False  # replaced under the read: the next step adopts it, then again
        for key, from_minute in plan.froms.items():
            if key in self.mirrors:
                continue
            st = self.state.key(*key)
            self.mirrors[key] = KeyMirror(st, from_minute, _held_copy(st, from_minute))
            if st.live_dirty is None:
                st.live_dirty = set()
        stored: dict[tuple[Pair, str, int], Bucket] = {}
        for (pair, source, t, _), parts in zip(plan.reads, found, strict=True):
            for _, bucket in parts:
                stored[(pair, source, t)] = bucket
        for pair in pairs:
            old = self.series.get(pair)
            if (old is not None) != replace:  # followed meanwhile, or no longer followed
                continue
            symbol, iv = pair
            series = Series(symbol, iv, plan.first_t[pair], plan.now_ms)
            for t in plan.starts[pair]:
                for source in self.all_sources:
                    candle = series.candle(t, source)
                    if iv >= MINUTE_MS:
                        candle.frozen = stored.get((pair, source, t))
                        candle.frozen_until = max(t // MINUTE_MS, plan.froms[(source, symbol)])
                    candle.value = self._value(series, source, t, candle)
            self.series[pair] = series
            if old is None:
                self.by_symbol.setdefault(symbol, []).append(series)
                continue
            series.refs = old.refs
            series.announced_ms = max(old.announced_ms, plan.now_ms)
            self.by_symbol[symbol] = [series if s is old else s for s in self.by_symbol[symbol]]
            self._resend.add(pair)
            self.reloads += 1
        return True

    # --- values ------------------------------------------------------------------------------

    def _value(self, series: Series, source: str, t: int, candle: LiveCandle) -> Bucket | None:
        key = (source, series.symbol)
        iv = series.interval_ms
        value: Bucket | None = None
        if iv < MINUTE_MS:
            st = self.state.keys.get(key)
            if st is None:
                return None
            buckets = st.buckets
            for sec in range(t // 1000, (t + iv) // 1000):
                b = buckets.get(sec)
                if b is not None:
                    if value is None:
                        value = list(b)
                    else:
                        merge_bucket(value, b)
            return value
        if candle.frozen is not None:
            value = list(candle.frozen)
        lo = max(candle.frozen_until, t // MINUTE_MS)
        hi = (t + iv) // MINUTE_MS
        mirror = self.mirrors[key]
        for m, b in mirror.minutes.items():  # a few held minutes; they never tie on tick times
            if lo <= m < hi:
                if value is None:
                    value = list(b)
                else:
                    merge_bucket(value, b)
        return value

    def _across(self, by_source: dict[str, LiveCandle], current: Sequence[str]) -> Bucket | None:
        value: Bucket | None = None
        for source in sorted(current):
            candle = by_source.get(source)
            if candle is None or candle.value is None:
                continue
            if value is None:
                value = list(candle.value)
            else:
                merge_across(value, candle.value)
        return value

    def _entry(self, source: str, series: Series, t: int, value: Bucket, now_ms: int) -> Entry:
        return {
            "symbol": series.symbol,
            "exchange": source,
            "interval": series.name,
            **candle_json(
                t, value, interval_ms=series.interval_ms, now_ms=now_ms, grace_ms=self.grace_ms
            ),
        }

    # --- the hub's step ----------------------------------------------------------------------

    def step(self, now_ms: int, current: Sequence[str]) -> dict[CandleKey, Entry]:
        """Take what changed since the last step: every followed candle whose ticks changed,
        each one that closed (end + grace passed) since, and the cross-source candles of both;
        after a mode switch, every open cross-source candle again."""
        out: dict[CandleKey, Entry] = {}
        current_t = tuple(current)
        mode_switched = bool(self._current) and current_t != self._current
        self._current = current_t
        if not self.series:
            return out
        touched: set[tuple[Pair, int]] = set()
        for key, mirror in self.mirrors.items():
            st = self.state.keys.get(key)
            if st is not None:
                if st is not mirror.st:  # a take-over restored the key afresh
                    self._refollow(key, st)
                across = touched if key[0] in current_t else None
                self._take_changes(key, st, mirror, now_ms, out, across)
        for pair in self._resend:
            resent = self.series.get(pair)
            if resent is None:
                continue
            for t in resent.starts:
                for source, candle in resent.candles[t].items():
                    if candle.value is not None:
                        out[(source, resent.symbol, resent.name, t)] = self._entry(
                            source, resent, t, candle.value, now_ms
                        )
                touched.add((pair, t))
        self._resend.clear()
        grace = self.grace_ms
        for pair, series in self.series.items():
            iv = series.interval_ms
            starts = series.starts
            lo = bisect.bisect_right(starts, series.announced_ms - iv - grace)
            hi = bisect.bisect_right(starts, now_ms - iv - grace)
            for t in starts[lo:hi]:
                for source, candle in series.candles[t].items():
                    if candle.value is not None:
                        out[(source, series.symbol, series.name, t)] = self._entry(
                            source, series, t, candle.value, now_ms
                        )
                touched.add((pair, t))
            series.announced_ms = now_ms
            if mode_switched:
                touched.update((pair, t) for t in starts[hi:])
            self._forget_old(series, now_ms)
        for pair, t in touched:
            series = self.series[pair]
            by_source = series.candles.get(t)
            if by_source is None:
                continue
            value = self._across(by_source, current_t)
            if value is not None:
                out[(ALL, series.symbol, series.name, t)] = self._entry(
                    ALL, series, t, value, now_ms
                )
        return out

    def _take_changes(
        self,
        key: Key,
        st: KeyState,
        mirror: KeyMirror,
        now_ms: int,
        out: dict[CandleKey, Entry],
        touched: set[tuple[Pair, int]] | None,
    ) -> None:
        """Take `key`'s changed seconds; `touched` collects the cross-source candles to
        recompute (None: the source is not in the current mode)."""
        dirty = st.live_dirty
        if dirty:
            st.live_dirty = set()
        horizon_minute = st.horizon_s // 60
        if horizon_minute > mirror.from_minute:
            self._freeze(key, mirror, horizon_minute)
        if not dirty:
            return
        minutes = {sec // 60 for sec in dirty}
        for m in minutes:
            b = st.minute_bucket(m)
            if b is not None:
                mirror.minutes[m] = b
            else:  # a full read or a take-over left this minute without ticks
                mirror.minutes.pop(m, None)
        source, symbol = key
        for series in self.by_symbol.get(symbol, ()):
            iv = series.interval_ms
            if iv < MINUTE_MS:
                starts = {sec * 1000 - sec * 1000 % iv for sec in dirty}
            else:
                starts = {align(m * MINUTE_MS, iv) for m in minutes}
            for t in starts:
                if t < series.first_t:
                    continue
                candle = series.candle(t, source)
                candle.value = self._value(series, source, t, candle)
                if candle.value is not None:
                    out[(source, symbol, series.name, t)] = self._entry(
                        source, series, t, candle.value, now_ms
                    )
                if touched is not None:
                    touched.add(((symbol, iv), t))

    def _refollow(self, key: Key, st: KeyState) -> None:
        """`key`'s state was replaced rather than changed tick by tick: copy what it holds now
        and read the symbol's pairs again (`keep_exact`). Until that read, the frozen parts of
        its candles end where the book's copy used to begin, so a candle may lack the minutes
        between (they went by unseen)."""
        mirror = self.mirrors[key]
        mirror.st = st
        mirror.from_minute = _held_from(st, int(self.clock() * 1000))
        mirror.minutes = _held_copy(st, mirror.from_minute)
        st.live_dirty = set()
        self._stale.add(key[1])
        self._stale_event.set()

    def _freeze(self, key: Key, mirror: KeyMirror, horizon_minute: int) -> None:
        """Fold the minutes memory let go of into the frozen part of their candles."""
        source, symbol = key
        for m in sorted(m for m in mirror.minutes if m < horizon_minute):
            b = mirror.minutes.pop(m)
            for series in self.by_symbol.get(symbol, ()):
                if series.interval_ms < MINUTE_MS:
                    continue
                by_source = series.candles.get(align(m * MINUTE_MS, series.interval_ms))
                candle = by_source.get(source) if by_source is not None else None
                if candle is None or candle.frozen_until > m:
                    continue
                if candle.frozen is None:
                    candle.frozen = list(b)
                else:
                    merge_bucket(candle.frozen, b)
                candle.frozen_until = m + 1
        mirror.from_minute = horizon_minute

    def _forget_old(self, series: Series, now_ms: int) -> None:
        """Drop closed candles memory holds no second of: nothing can change them now."""
        starts = series.starts
        if not starts:
            return
        held_from_ms = min(
            (st.horizon_s * 1000 if st is not None else now_ms)
            for st in (self.state.keys.get((s, series.symbol)) for s in self.all_sources)
        )
        iv = series.interval_ms
        cut = 0
        while (
            cut < len(starts)
            and starts[cut] + iv <= held_from_ms
            and starts[cut] + iv + self.grace_ms <= series.announced_ms
        ):
            del series.candles[starts[cut]]
            cut += 1
        if cut:
            del starts[:cut]

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(
        self,
        symbols: Sequence[str],
        sources: Sequence[str],
        intervals: Sequence[int],
        current: Sequence[str],
        now_ms: int,
    ) -> list[Entry]:
        """The candles not yet closed of each followed (symbol, interval), per source in
        `sources` and across the `current` ones, oldest first."""
        out: list[Entry] = []
        for symbol in symbols:
            for iv in intervals:
                series = self.series.get((symbol, iv))
                if series is None:
                    continue
                for t in series.starts:
                    if t + iv + self.grace_ms <= now_ms:
                        continue
                    by_source = series.candles[t]
                    for source in sources:
                        candle = by_source.get(source)
                        if candle is not None and candle.value is not None:
                            out.append(self._entry(source, series, t, candle.value, now_ms))
                    value = self._across(by_source, current)
                    if value is not None:
                        out.append(self._entry(ALL, series, t, value, now_ms))
        return out


def _held_from(st: KeyState, now_ms: int) -> int:
    """The minute from which memory holds every minute of `st`."""
    if st.horizon_s > 0:
        return st.horizon_s // 60
    held = st.held_minutes()  # never pruned nor restored: memory starts where it starts
    return held[0] if held else now_ms // MINUTE_MS


def _held_copy(st: KeyState, from_minute: int) -> dict[int, Bucket]:
    """Copies of `st`'s held minutes from `from_minute` on (a resumed row plus its seconds)."""
    return {
        m: b
        for m in st.held_minutes()
        if m >= from_minute and (b := st.minute_bucket(m)) is not None
    }
