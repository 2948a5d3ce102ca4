"""In-process market state: per key the latest price and per-second buckets (contract: pipeline).

Workers fold ticks in; the Redis flusher takes the changed seconds, the aggregator takes the
changed minutes, and the API reads. All of it runs on the Trio thread, so no locks: a store
call gets copies, never live buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from marketflow.live import KeyMeta
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
    Extreme,
    Key,
    LatestPrice,
    MinuteRow,
    RangeStats,
    Tick,
    merge_bucket,
)
from marketflow.ports import FlushPlan


class KeyState:
    """State of one (source, symbol). Seconds below `horizon_s` are no longer held."""

    __slots__ = (
        "buckets",
        "horizon_s",
        "latest_dirty",
        "latest_price",
        "latest_ts",
        "live_dirty",
        "meta_dirty",
        "minute_base",
        "minutes_dirty",
        "owned",
        "redis_dirty",
        "rewrite",
        "source",
        "symbol",
    )

    def __init__(self, source: str, symbol: str, owned: bool = True) -> None:
        self.source = source
        self.symbol = symbol
        self.latest_price = 0.0
        self.latest_ts = -1  # no price yet
        self.latest_dirty = False
        self.buckets: dict[int, Bucket] = {}
        # Minutes resumed from a stored row (PostgreSQL or journal) rather than from buckets.
        self.minute_base: dict[int, Bucket] = {}
        self.redis_dirty: set[int] = set()
        self.minutes_dirty: set[int] = set()
        # Seconds changed since the live candles last looked; None while nobody follows them.
        self.live_dirty: set[int] | None = None
        self.horizon_s = 0
        self.meta_dirty = False  # horizon or resumed rows changed since the last flush
        # Ingested (and so flushed, written, pruned) by this process; False for a key mirrored
        # from another instance that holds its source's lease.
        self.owned = owned
        self.rewrite = True  # the next flush replaces this key's window whole

    def fold(self, ticks: Iterable[Tick], refuse_new_minutes: bool = False) -> tuple[int, int]:
        """Fold ticks in arrival order. Returns (late, refused): ticks too old to be held, and
        ticks refused because they would open a new minute while `refuse_new_minutes` (rows
        cannot be written anywhere and memory is at its bound)."""
        buckets = self.buckets
        redis_dirty = self.redis_dirty
        minutes_dirty = self.minutes_dirty
        live_dirty = self.live_dirty
        horizon = self.horizon_s
        latest_price, latest_ts = self.latest_price, self.latest_ts
        held: set[int] | None = None
        if refuse_new_minutes:
            held = {sec // 60 for sec in buckets} | set(self.minute_base)
        late = refused = 0
        last_sec = -1
        b: Bucket = []
        for _, price, ts in ticks:
            sec = ts // 1000
            if sec != last_sec:
                if sec < horizon:
                    late += 1
                    continue
                got = buckets.get(sec)
                if got is None and held is not None and sec // 60 not in held:
                    refused += 1
                    continue
                last_sec = sec
                redis_dirty.add(sec)
                minutes_dirty.add(sec // 60)
                if live_dirty is not None:
                    live_dirty.add(sec)
                if got is None:
                    buckets[sec] = b = [1, price, price, price, price, price, ts, ts]
                    if ts >= latest_ts:
                        latest_price, latest_ts = price, ts
                    continue
                b = got
            b[COUNT] += 1
            b[SUM] += price
            if price < b[MIN]:
                b[MIN] = price
            elif price > b[MAX]:
                b[MAX] = price
            if ts < b[FIRST_TS]:
                b[FIRST] = price
                b[FIRST_TS] = ts
            if ts >= b[LAST_TS]:
                b[LAST] = price
                b[LAST_TS] = ts
            if ts >= latest_ts:
                latest_price, latest_ts = price, ts
        if latest_ts != self.latest_ts or latest_price != self.latest_price:
            self.latest_price, self.latest_ts = latest_price, latest_ts
            self.latest_dirty = True
        return late, refused

    def minute_bucket(self, minute: int) -> Bucket | None:
        """The whole minute as one bucket: its resumed row (if any) plus its seconds."""
        base = self.minute_base.get(minute)
        total = list(base) if base is not None else None
        buckets = self.buckets
        for sec in range(minute * 60, minute * 60 + 60):
            b = buckets.get(sec)
            if b is None:
                continue
            if total is None:
                total = list(b)
            else:
                merge_bucket(total, b)
        return total

    def minute_row(self, minute: int) -> MinuteRow | None:
        b = self.minute_bucket(minute)
        if b is None:
            return None
        return MinuteRow.from_bucket(self.source, self.symbol, minute * 60_000, b)

    def held_minutes(self) -> list[int]:
        return sorted({s // 60 for s in self.buckets} | set(self.minute_base))

    def prune(self, keep_from_s: int) -> None:
        """Forget whole minutes that end before `keep_from_s`, are written, and whose changes
        the live candles have seen."""
        cutoff_minute = keep_from_s // 60
        if self.minutes_dirty:
            cutoff_minute = min(cutoff_minute, min(self.minutes_dirty))
        if self.live_dirty:
            cutoff_minute = min(cutoff_minute, min(self.live_dirty) // 60)
        cutoff_s = cutoff_minute * 60
        if cutoff_s <= self.horizon_s:
            return
        for sec in [s for s in self.buckets if s < cutoff_s]:
            del self.buckets[sec]
        for minute in [m for m in self.minute_base if m < cutoff_minute]:
            del self.minute_base[minute]
        self.redis_dirty = {s for s in self.redis_dirty if s >= cutoff_s}
        self.horizon_s = cutoff_s
        self.meta_dirty = True

    def meta(self) -> KeyMeta:
        """The key's horizon and resumed rows, as readers of Redis need them."""
        bases = tuple((m * 60_000, list(b)) for m, b in sorted(self.minute_base.items()))
        return KeyMeta(self.source, self.symbol, self.horizon_s * 1000, bases)


class MarketState:
    """Every key's state, plus the counters that span keys."""

    def __init__(self, window_seconds: int, *, owned_by_default: bool = True) -> None:
        self.window_seconds = window_seconds
        # A process that holds sources by lease creates its keys as not owned: a key becomes
        # owned when its source is taken over (restored), never by accident.
        self.owned_by_default = owned_by_default
        self.keys: dict[Key, KeyState] = {}
        self.late = 0
        self.refused = 0  # ticks refused while `refuse_new_minutes` (pending_rows_max reached)
        self.updates_total = 0
        # Keys on a Redis Cluster node that refused writes: each is rewritten whole once its
        # node takes writes again (the node may have come back empty).
        self.held_rewrites: set[Key] = set()
        # Set by the aggregator while rows can be written neither to PostgreSQL nor the journal
        # and `pending_rows_max` of them are held: ticks opening a new minute are refused.
        self.refuse_new_minutes = False

    def key(self, source: str, symbol: str) -> KeyState:
        state = self.keys.get((source, symbol))
        if state is None:
            state = self.keys[(source, symbol)] = KeyState(source, symbol, self.owned_by_default)
        return state

    # --- Redis flush -------------------------------------------------------------------------

    def take_flush(self, now_s: int) -> FlushPlan | None:
        """Copies of what changed since the last flush, for the keys this process owns. A key
        marked `rewrite` (restored, or Redis was down) has its window replaced whole, so Redis
        never keeps a bucket this process does not hold."""
        keep_from = now_s - self.window_seconds
        latest: list[LatestPrice] = []
        buckets: dict[Key, list[tuple[int, Bucket]]] = {}
        meta: list[KeyMeta] = []
        rewritten: list[Key] = []
        for key, st in self.keys.items():
            if not st.owned:
                continue
            rewrite = st.rewrite
            if st.latest_ts >= 0 and (rewrite or st.latest_dirty):
                latest.append(LatestPrice(st.source, st.symbol, st.latest_price, st.latest_ts))
                st.latest_dirty = False
            seconds: Iterable[int] = st.buckets if rewrite else st.redis_dirty
            # What memory holds (whole minutes from the horizon), so a mirror reading the
            # window sees whole minutes too.
            changed = [
                (s, list(st.buckets[s])) for s in seconds if s >= min(st.horizon_s, keep_from + 1)
            ]
            st.redis_dirty = set()
            if changed:
                buckets[key] = changed
            if rewrite or st.meta_dirty:
                meta.append(st.meta())
                st.meta_dirty = False
            if rewrite:
                rewritten.append(key)
                st.rewrite = False
        if not latest and not buckets and not meta:
            return None
        touched = list(dict.fromkeys([*buckets, *rewritten]))
        horizons = {key: self.keys[key].horizon_s for key in touched}
        return FlushPlan(
            latest=latest,
            buckets=buckets,
            touched=touched,
            now_s=now_s,
            meta=meta,
            rewrite=bool(rewritten),
            rewritten=rewritten,
            horizons=horizons,
        )

    def rewrite_all(self) -> None:
        """Redis may have lost what was written (it was down): rewrite every owned key."""
        self.held_rewrites.clear()
        for st in self.keys.values():
            if st.owned:
                st.rewrite = True

    def hold_rewrites(self, covers: Callable[[Key], bool]) -> None:
        """The owned keys `covers` selects sit on a Redis node that refused a write: rewrite
        each whole once that node takes writes again (`release_rewrites`)."""
        for key, st in self.keys.items():
            if st.owned and covers(key):
                self.held_rewrites.add(key)

    def release_rewrites(self, failing: Callable[[Key], bool] | None = None) -> int:
        """A flush went through (on every node, or on all but those `failing` selects): the
        held keys whose node took it are marked for a whole rewrite. Returns how many."""
        released = [k for k in self.held_rewrites if failing is None or not failing(k)]
        for key in released:
            self.held_rewrites.discard(key)
            st = self.keys.get(key)
            if st is not None and st.owned:
                st.rewrite = True
        return len(released)

    def oldest_dirty_minute(self) -> int | None:
        """The oldest minute (number) changed but not yet taken for writing."""
        oldest = None
        for st in self.keys.values():
            if st.minutes_dirty:
                low = min(st.minutes_dirty)
                if oldest is None or low < oldest:
                    oldest = low
        return oldest

    # --- minute aggregates -------------------------------------------------------------------

    def take_minutes(self, before_ms: int | None) -> list[MinuteRow]:
        """Rows of changed minutes that end at or before `before_ms` (None: every changed one)."""
        rows: list[MinuteRow] = []
        for st in self.keys.values():
            if not st.minutes_dirty or not st.owned:
                continue
            done = [
                m for m in st.minutes_dirty if before_ms is None or (m + 1) * 60_000 <= before_ms
            ]
            for minute in sorted(done):
                st.minutes_dirty.discard(minute)
                row = st.minute_row(minute)
                if row is not None:
                    rows.append(row)
        return rows

    def prune(self, now_s: int) -> None:
        keep_from = now_s - self.window_seconds
        for st in self.keys.values():
            if st.owned:  # a mirrored key follows its owner's horizon
                st.prune(keep_from)

    # --- reads for the API -------------------------------------------------------------------

    def second_stats(self, keys: Iterable[Key], from_s: int, to_s: int) -> RangeStats | None:
        """Stats over the held seconds from_s..to_s inclusive."""
        return _stats(
            (key[0], sec * 1000, b)
            for key in keys
            if (st := self.keys.get(key)) is not None
            for sec, b in seconds_in(st.buckets, from_s, to_s)
        )

    def minute_stats(self, key: Key, from_minute: int, to_minute: int) -> RangeStats | None:
        """Stats over the held minutes from_minute..to_minute inclusive."""
        st = self.keys.get(key)
        if st is None:
            return None
        return _stats(
            (key[0], m * 60_000, b)
            for m in st.held_minutes()
            if from_minute <= m <= to_minute and (b := st.minute_bucket(m)) is not None
        )

    def held_from_minute(self, key: Key) -> int | None:
        """The first minute held in memory for `key` (older minutes live in PostgreSQL only)."""
        st = self.keys.get(key)
        if st is None:
            return None
        held = st.held_minutes()
        return held[0] if held else None


def seconds_in(buckets: dict[int, Bucket], from_s: int, to_s: int) -> Iterator[tuple[int, Bucket]]:
    """The held buckets of seconds from_s..to_s: look up the range when it is the smaller side
    (a 1-minute question over a 5-minute window), else filter what is held."""
    if to_s - from_s + 1 < len(buckets):
        for sec in range(from_s, to_s + 1):
            b = buckets.get(sec)
            if b is not None:
                yield sec, b
    else:
        for sec, b in buckets.items():
            if from_s <= sec <= to_s:
                yield sec, b


def _stats(items: Iterator[tuple[str, int, Bucket]]) -> RangeStats | None:
    count = 0
    total = 0.0
    high: Extreme | None = None
    low: Extreme | None = None
    first_ms = last_ms = -1
    for source, at, b in items:
        count += int(b[COUNT])
        total += b[SUM]
        if high is None or b[MAX] > high.price or (b[MAX] == high.price and at < high.at):
            high = Extreme(b[MAX], at, source)
        if low is None or b[MIN] < low.price or (b[MIN] == low.price and at < low.at):
            low = Extreme(b[MIN], at, source)
        first_ms = at if first_ms < 0 else min(first_ms, at)
        last_ms = max(last_ms, at)
    if count == 0:
        return None
    return RangeStats(count, total, high, low, first_ms, last_ms)


def combine_stats(parts: Iterable[RangeStats | None]) -> RangeStats | None:
    """Merge stats of disjoint ranges or sources."""
    out: RangeStats | None = None
    for part in parts:
        if part is None:
            continue
        if out is None:
            out = part
            continue
        high = _pick(out.high, part.high, higher=True)
        low = _pick(out.low, part.low, higher=False)
        out = RangeStats(
            out.count + part.count,
            out.total + part.total,
            high,
            low,
            min(out.first_ms, part.first_ms),
            max(out.last_ms, part.last_ms),
        )
    return out


def _pick(a: Extreme | None, b: Extreme | None, *, higher: bool) -> Extreme | None:
    if a is None or b is None:
        return a or b
    if a.price == b.price:
        return a if a.at <= b.at else b
    return a if (a.price > b.price) == higher else b
