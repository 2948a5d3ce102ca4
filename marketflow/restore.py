"""Resuming the open minutes at start (contract: PostgreSQL), before any source runs.

The process holds again every whole minute within `window_seconds`. Each minute resumes from
whichever record of it holds more ticks — its row in PostgreSQL, or its buckets in the Redis
window — never from both; a row that wins becomes the minute's base, and later ticks fold on top.

Restore finishes or fails closed. A minute resumed without its stored row would later be
overwritten by a row holding only the ticks after the restart, so the stored rows must be read:
the journal a previous run left is replayed first (so PostgreSQL holds every row), then the rows
of the held minutes are read. Both are retried with backoff until PostgreSQL answers, with no
deadline (migrations included); until then the node is `starting` (health 503) and no source
runs. Redis is read once: when it is unreachable nothing is taken from it (availability first:
the rows alone are the base, nothing is doubled).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from marketflow.backoff import Backoff
from marketflow.health import StoreHealth, describe
from marketflow.models import COUNT, Bucket, Key, LatestPrice, MinuteRow
from marketflow.ports import AggregateStore, PriceStore
from marketflow.state import MarketState

log = logging.getLogger("marketflow.restore")
ROW_READ_UNTIL_MS = 2**62  # rows of every minute from the horizon on

Windows = dict[Key, list[tuple[int, Bucket]]]
Rows = dict[Key, dict[int, MinuteRow]]


@attrs.frozen
class Restored:
    """What a restore took from where, for the log line and the tests."""

    horizon_s: int
    ticks_from_redis: int
    minutes_from_rows: int
    redis_read: bool


def restore_horizon(now_s: int, window_seconds: int) -> int:
    """The first second held after a restart: the window's first *whole* minute (the edge
    minute is only partly in the window; a tick for it is late rather than overwriting its
    stored row with a partial one)."""
    return ((now_s - window_seconds) // 60 + 1) * 60


def merge_restored(
    state: MarketState,
    keys: Sequence[Key],
    horizon_s: int,
    windows: Windows,
    latest: dict[Key, LatestPrice],
    rows: Rows,
) -> tuple[int, int]:
    """Fill `state` from what was read (pure). Returns (ticks from Redis, minutes from rows)."""
    from_redis = from_rows = 0
    for key in keys:
        st = state.key(*key)
        st.horizon_s = horizon_s
        if key in latest and latest[key].ts > st.latest_ts:
            st.latest_price, st.latest_ts = latest[key].price, latest[key].ts
        by_minute: dict[int, list[tuple[int, Bucket]]] = {}
        for second, bucket in windows.get(key, []):
            if second >= horizon_s:
                by_minute.setdefault(second // 60, []).append((second, bucket))
        stored = rows.get(key, {})
        for minute in set(by_minute) | set(stored):
            seconds = by_minute.get(minute, [])
            redis_count = sum(int(b[COUNT]) for _, b in seconds)
            row = stored.get(minute)
            if row is not None and row.count > redis_count:
                st.minute_base[minute] = row.as_bucket()
                from_rows += 1
                continue
            for second, bucket in seconds:
                st.buckets[second] = bucket
            from_redis += redis_count
            if row is None or row.count != redis_count:
                st.minutes_dirty.add(minute)
    return from_redis, from_rows


def read_rows(store: AggregateStore, keys: Sequence[Key], from_ms: int) -> Rows:
    """The stored rows of every key from `from_ms` on (blocking; one thread hop for all)."""
    out: Rows = {}
    for source, symbol in keys:
        found = store.rows(source, symbol, from_ms, ROW_READ_UNTIL_MS)
        out[(source, symbol)] = {row.minute // 60_000: row for row in found}
    return out


def read_redis(
    store: PriceStore, keys: Sequence[Key], since_s: int
) -> tuple[Windows, dict[Key, LatestPrice]]:
    """Windows and latest prices of every key (blocking)."""
    return store.read_windows(keys, since_s), store.read_latest(keys)


async def until_postgres_answers[T](
    attempt: Callable[[], Awaitable[T | None]],
    postgres_health: StoreHealth,
    *,
    retry_cap_s: float = 10.0,
) -> T:
    """`attempt()` until it returns a value (None: the journal could not be replayed yet),
    retried with backoff and no deadline, PostgreSQL's error shown meanwhile; cancellable."""
    backoff = Backoff(0.5, retry_cap_s)
    while True:
        try:
            found = await attempt()
            if found is not None:
                postgres_health.wrote()
                return found
            error = postgres_health.error or "journal replay failed"
        except Exception as exc:
            postgres_health.write_failed(exc)
            error = describe(exc)
        delay = backoff.next()
        log.warning(
            "waiting for postgres to resume the open minutes; no source starts before",
            extra={"ctx": {"error": error, "retry_in_s": round(delay, 1)}},
        )
        await trio.sleep(delay)


async def prepare_postgres(
    store: AggregateStore,
    *,
    replay_journal: Callable[[], Awaitable[bool]],
    postgres_health: StoreHealth,
    limiter: trio.CapacityLimiter,
    retry_cap_s: float = 10.0,
) -> None:
    """Migrations, then the journal a previous run left, committed — retried with backoff until
    PostgreSQL answers, with no deadline; cancellable while it waits."""

    async def attempt() -> bool | None:
        await trio.to_thread.run_sync(store.migrate, limiter=limiter, abandon_on_cancel=True)
        return True if await replay_journal() else None

    await until_postgres_answers(attempt, postgres_health, retry_cap_s=retry_cap_s)


async def restore(
    state: MarketState,
    keys: Sequence[Key],
    *,
    now_s: int,
    window_seconds: int,
    price_store: PriceStore,
    aggregate_store: AggregateStore,
    replay_journal: Callable[[], Awaitable[bool]],
    postgres_health: StoreHealth,
    redis_limiter: trio.CapacityLimiter,
    postgres_limiter: trio.CapacityLimiter,
    retry_cap_s: float = 10.0,
) -> Restored:
    """Restore `state` for `keys` (see the module docstring); cancellable while it waits.

    `replay_journal` commits a previous run's journal (True once it is empty). A stop while a
    migration or the read of the rows waits on PostgreSQL (a migration waits up to its own
    60 s timeout for the lock) abandons that thread call at once: nothing was merged yet, and
    closing the store cancels the statement.
    """
    horizon_s = restore_horizon(now_s, window_seconds)

    async def attempt() -> Rows | None:
        if not await replay_journal():
            return None
        return await trio.to_thread.run_sync(
            read_rows,
            aggregate_store,
            keys,
            horizon_s * 1000,
            limiter=postgres_limiter,
            abandon_on_cancel=True,
        )

    rows = await until_postgres_answers(attempt, postgres_health, retry_cap_s=retry_cap_s)
    redis_read = True
    try:
        windows, latest = await trio.to_thread.run_sync(
            read_redis, price_store, keys, horizon_s, limiter=redis_limiter
        )
    except Exception as exc:
        log.warning(
            "redis unavailable at start; open minutes resume from postgres alone",
            extra={"ctx": {"error": describe(exc)}},
        )
        windows, latest, redis_read = {}, {}, False
    from_redis, from_rows = merge_restored(state, keys, horizon_s, windows, latest, rows)
    if from_redis or from_rows:
        log.info(
            "state restored",
            extra={
                "ctx": {
                    "ticks_from_redis": from_redis,
                    "minutes_from_rows": from_rows,
                    "keys": len(windows),
                }
            },
        )
    return Restored(horizon_s, from_redis, from_rows, redis_read)
