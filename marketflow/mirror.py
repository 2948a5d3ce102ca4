"""A read-only mirror of the market state, filled from Redis (role `api`).

The same `MarketState` the ingesting process folds ticks into, filled a second way: every key's
window, latest price and meta are read once, then each `updates` message is merged — a bucket
replaced when the message's count is at least the held one (a held second's count only grows),
a latest price when its timestamp is newer, a key's meta (horizon, resumed rows) replaced whole
and the buckets below the horizon dropped. A gap in an instance's `seq`, a `resync` message or
a lost connection makes the mirror read everything again. `queries` answers from it exactly as
from the ingesting state.

The live candles (`live_candles.CandleBook`) follow it as they follow an ingesting state: a
bucket applied is a second changed (`KeyState.live_dirty`); a horizon raised never drops a
second whose change the book has not taken yet (the minutes holding it stay, and the horizon
follows the owner's at a later update); a full read marks everything changed and tells the book
(`on_reload`), whose copies of what fell below the horizon may lack ticks it never saw.

It also follows each ingesting instance's `status:{INSTANCE}` (every second), for /health and
for the oldest minute not yet committed to PostgreSQL anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import orjson
import trio

from marketflow.backoff import Backoff
from marketflow.health import StoreHealth, describe
from marketflow.live import KeyMeta, Update, decode_update
from marketflow.logs import rate_limited
from marketflow.models import COUNT, Bucket, Key, LatestPrice, Mode
from marketflow.ports import LiveStore
from marketflow.state import KeyState, MarketState

log = logging.getLogger("marketflow.mirror")

STATUS_POLL_S: Final = 1.0
STATUS_FRESH_S: Final = 5.0  # an instance that wrote no status for this long is gone


class Mirror:
    """Owns the mirrored state's freshness: the full reads, the `updates` subscription and the
    instances' statuses. Runs until cancelled; Redis outages are retried with backoff."""

    def __init__(
        self,
        state: MarketState,
        store: LiveStore,
        health: StoreHealth,
        keys: Sequence[Key],
        *,
        mode: Mode,
        on_change: Callable[[], None] = lambda: None,
        on_reload: Callable[[Iterable[Key]], None] = lambda keys: None,
    ) -> None:
        self.state = state
        self.store = store
        self.health = health
        self.keys = list(keys)
        self.mode = mode
        self.on_change = on_change
        self.on_reload = on_reload  # after a full read, with the keys it replaced
        # Keys whose horizon waits below their owner's (the live candles had not taken every
        # second below it yet): the owner's horizon, applied at a later update.
        self._held_back: dict[Key, int] = {}
        self.current = False  # subscribed and read: answers are as fresh as the ingest's
        self.limiter = trio.CapacityLimiter(1)
        self.statuses: dict[str, tuple[float, dict[str, Any]]] = {}  # instance -> (seen, body)
        self.reads = 0  # full reads so far (tests and metrics)
        self._last_seq: dict[str, int] = {}
        self._resync = False

    def request_resync(self) -> None:
        """Read everything again soon (this process let a source go: mirror it now)."""
        self._resync = True

    # --- what the node reads -------------------------------------------------------------------

    def live_statuses(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            instance: body
            for instance, (seen, body) in self.statuses.items()
            if now - seen <= STATUS_FRESH_S
        }

    def oldest_unwritten_ms(self) -> int | None:
        """The oldest minute an ingesting instance has not committed to PostgreSQL yet."""
        found = [
            int(body["oldest_unwritten_minute"])
            for body in self.live_statuses().values()
            if body.get("oldest_unwritten_minute") is not None
        ]
        return min(found) if found else None

    # --- lifetime ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_statuses)
            await self._follow_updates()

    async def _follow_updates(self) -> None:
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                sub = await trio.to_thread.run_sync(
                    self.store.subscribe, self.store.updates_channel, limiter=self.limiter
                )
            except Exception as exc:
                self._lost(exc)
                await trio.sleep(backoff.next())
                continue
            try:
                await self.read_all()
                backoff.reset()
                while True:
                    messages = await trio.to_thread.run_sync(sub.drain, 1.0, abandon_on_cancel=True)
                    resync = bool(messages) and self.apply_messages(messages)
                    if resync or self._resync:
                        self._resync = False
                        await self.read_all()
            except Exception as exc:
                self._lost(exc)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(sub.close)
            await trio.sleep(backoff.next())

    def _lost(self, exc: Exception) -> None:
        if self.current or rate_limited("mirror-lost", 30.0):
            log.warning(
                "redis unavailable: answers come from postgres until it returns",
                extra={"ctx": {"error": describe(exc)}},
            )
        self.current = False
        self.health.down(exc)

    async def read_all(self) -> None:
        """Replace the mirrored state with a full read of every key (one pipelined round)."""
        windows, latest, metas = await trio.to_thread.run_sync(
            self.store.read_snapshot, self.keys, limiter=self.limiter
        )
        shared = await trio.to_thread.run_sync(self.store.get_mode, limiter=self.limiter)
        self.load(windows, latest, metas)
        if shared is not None:
            self.mode = Mode(shared)
        self._last_seq.clear()
        self.reads += 1
        if not self.current:
            log.info("mirror current", extra={"ctx": {"keys": len(windows)}})
        self.current = True
        self.health.wrote()
        self.on_change()

    def load(
        self,
        windows: dict[Key, list[tuple[int, Bucket]]],
        latest: dict[Key, LatestPrice],
        metas: dict[Key, KeyMeta],
    ) -> None:
        """The state becomes exactly what was read (pure). Keys this process owns (it ingests
        their source, role `all`) are left alone. Keys the live candles follow get every second
        and resumed minute, before and after, marked changed, and are passed to `on_reload`."""
        reloaded: list[Key] = []
        for key in self.keys:
            st = self.state.key(*key)
            if st.owned:
                continue
            self._held_back.pop(key, None)
            before = _held_seconds(st) if st.live_dirty is not None else None
            meta = metas.get(key)
            st.horizon_s = meta.horizon_ms // 1000 if meta is not None else 0
            st.minute_base = (
                {minute // 60_000: b for minute, b in meta.bases} if meta is not None else {}
            )
            st.buckets = {sec: b for sec, b in windows.get(key, []) if sec >= st.horizon_s}
            found = latest.get(key)
            st.latest_price, st.latest_ts = (found.price, found.ts) if found else (0.0, -1)
            if st.live_dirty is not None and before is not None:
                st.live_dirty |= before | _held_seconds(st)
                reloaded.append(key)
        if reloaded:
            self.on_reload(reloaded)

    def apply_messages(self, raw: list[bytes]) -> bool:
        """Merge `updates` messages in order; True when the mirror must read everything again
        (a gap in a sequence, or a writer that rewrote its windows whole)."""
        resync = False
        changed = False
        for message in raw:
            try:
                update = decode_update(message)
            except (ValueError, KeyError, TypeError):
                continue  # not ours
            last = self._last_seq.get(update.instance)
            if update.resync or (last is not None and update.seq != last + 1):
                resync = True
            self._last_seq[update.instance] = update.seq
            changed = self.apply(update) or changed
        for key, horizon_s in list(self._held_back.items()):
            st = self.state.keys[key]
            if st.owned:  # ingested here now: its own prune decides
                del self._held_back[key]
            else:
                self._set_horizon(key, st, horizon_s, st.minute_base)
        if changed:
            # Only for keys this process mirrors: in role all, its own flushes' messages change
            # nothing here, and a poke for them would move the hub's steps off its own schedule
            # (frames then went out up to an interval after the prices they carry).
            self.on_change()
        return resync

    def apply(self, update: Update) -> bool:
        """Merge one message; True when it touched a key this process mirrors (not owns)."""
        state = self.state
        self.mode = Mode(update.mode) if update.mode in ("live", "test") else self.mode
        touched = False
        for key, price, ts in update.latest:
            st = state.key(*key)
            if st.owned:
                continue
            touched = True
            if ts > st.latest_ts:
                st.latest_price, st.latest_ts = price, ts
        for key, second, bucket in update.buckets:
            st = state.key(*key)
            if st.owned or second < st.horizon_s:
                continue
            touched = True
            held = st.buckets.get(second)
            if held is None or bucket[COUNT] >= held[COUNT]:
                st.buckets[second] = bucket
                if st.live_dirty is not None:
                    st.live_dirty.add(second)
        for meta in update.meta:
            key = (meta.source, meta.symbol)
            st = state.key(*key)
            if st.owned:
                continue
            touched = True
            bases = {minute // 60_000: b for minute, b in meta.bases}
            self._set_horizon(key, st, meta.horizon_ms // 1000, bases)
        return touched

    def _set_horizon(
        self, key: Key, st: KeyState, horizon_s: int, bases: dict[int, Bucket]
    ) -> None:
        """The owner's horizon and resumed rows; seconds below the horizon are dropped — but
        never one whose change the live candles have not taken: then the minutes from it stay
        held (with their resumed rows) and the horizon waits (`_held_back`)."""
        cutoff = horizon_s
        if st.live_dirty:  # held where it is at most: never lowered for the book
            guard = min(st.live_dirty) // 60 * 60
            cutoff = max(min(horizon_s, guard), min(horizon_s, st.horizon_s))
        if cutoff < horizon_s:
            self._held_back[key] = horizon_s
        else:
            self._held_back.pop(key, None)
        first = cutoff // 60
        kept = {m: b for m, b in st.minute_base.items() if first <= m < horizon_s // 60}
        new_bases = {**kept, **{m: b for m, b in bases.items() if m >= first}}
        if st.live_dirty is not None:
            for m in set(st.minute_base) | set(new_bases):
                if m >= first and st.minute_base.get(m) != new_bases.get(m):
                    st.live_dirty.add(m * 60)
        st.minute_base = new_bases
        if cutoff > st.horizon_s:
            for second in [s for s in st.buckets if s < cutoff]:
                del st.buckets[second]
        st.horizon_s = cutoff

    async def _follow_statuses(self) -> None:
        while True:
            try:
                raw = await trio.to_thread.run_sync(self.store.read_statuses, limiter=self.limiter)
            except Exception as exc:
                if rate_limited("mirror-status", 30.0):
                    log.warning("statuses unreadable", extra={"ctx": {"error": describe(exc)}})
            else:
                now = time.monotonic()
                for item in raw:
                    try:
                        body = orjson.loads(item)
                        self.statuses[str(body["instance"])] = (now, body)
                    except (ValueError, KeyError, TypeError):
                        continue
                for instance in [
                    i for i, (seen, _) in self.statuses.items() if now - seen > 4 * STATUS_FRESH_S
                ]:
                    del self.statuses[instance]
            await trio.sleep(STATUS_POLL_S)


def _held_seconds(st: KeyState) -> set[int]:
    """Every second `st` holds ticks of: its buckets, and the first second of each resumed
    minute (a mark for the minute)."""
    return set(st.buckets) | {m * 60 for m in st.minute_base}
