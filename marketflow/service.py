"""The service: stores, state, pipeline, flusher and aggregator wired under one nursery.

`Service.run()` is the one entry point both launchers use: `marketflow` (cli -> app.serve) and
Hypercorn's own command (the ASGI lifespan starts it in the app's nursery).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from marketflow import __version__
from marketflow.aggregation import Aggregator
from marketflow.broadcast import CANDLE_FRAME_MIN_S, HEARTBEAT_S, PriceHub
from marketflow.config import Config
from marketflow.flusher import RedisFlusher, StoreHealth, describe, probe_stores
from marketflow.metrics import Metrics
from marketflow.models import COUNT, Bucket, Key, MinuteRow, Mode, SourceStatus
from marketflow.pipeline import Pipeline
from marketflow.ports import AggregateStore, Journal, PriceStore
from marketflow.queries import RangeCache
from marketflow.state import MarketState

log = logging.getLogger("marketflow.service")
RESTORE_TIMEOUT_S = 5.0
READER_CONNECTIONS = 2


class Service:
    """Owns every long-lived part of marketflow except the HTTP server."""

    def __init__(
        self,
        config: Config,
        *,
        price_store: PriceStore | None = None,
        aggregate_store: AggregateStore | None = None,
        query_store: AggregateStore | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from marketflow.store.journal import FileJournal
        from marketflow.store.pool import StorePool
        from marketflow.store.postgres import PostgresAggregateStore
        from marketflow.store.redis import RedisPriceStore

        app = config.app
        self.config = config
        self.clock = clock
        self.state = MarketState(app.window_seconds)
        self.metrics = Metrics()
        self.pipeline = Pipeline(config, self.state, metrics=self.metrics, clock=clock)
        self.hub = PriceHub(
            self.state,
            self.pipeline.sources,
            symbols=app.symbols,
            all_sources=config.all_sources,
            interval_s=app.ws_min_interval_ms / 1000,
            max_lag_s=app.ws_max_lag_s,
            grace_ms=app.grace_ms,
            heartbeat_s=HEARTBEAT_S,
            candle_interval_s=max(app.ws_min_interval_ms / 1000, CANDLE_FRAME_MIN_S),
            clock=clock,
        )
        self.redis: PriceStore = price_store or RedisPriceStore(
            config.redis, window_seconds=app.window_seconds, ttl_seconds=app.redis_ttl_seconds
        )
        self.postgres: AggregateStore = aggregate_store or PostgresAggregateStore(config.postgres)
        # The API reads through its own connections so queries never wait behind a batch write;
        # two of them, so one request's read (a thousand candles: a few ms) runs beside another's.
        self.postgres_reader: AggregateStore = query_store or StorePool(
            [PostgresAggregateStore(config.postgres) for _ in range(READER_CONNECTIONS)]
        )
        self.query_limiter = trio.CapacityLimiter(READER_CONNECTIONS)
        self.range_cache = RangeCache()
        self.journal: Journal = journal or FileJournal(Path(app.data_dir) / "journal.ndjson")
        self.redis_health = StoreHealth("redis")
        self.postgres_health = StoreHealth("postgres")
        self.flusher = RedisFlusher(
            self.state,
            self.redis,
            self.redis_health,
            self.metrics,
            interval_s=app.flush_interval_ms / 1000,
            clock=clock,
        )
        self.aggregator = Aggregator(
            self.state,
            self.postgres,
            self.journal,
            self.postgres_health,
            self.metrics,
            grace_ms=app.grace_ms,
            batch_size=app.db_batch_size,
            clock=clock,
        )
        self.metrics.watch(self.health)
        self.started_at = time.monotonic()
        self.stopping = trio.Event()
        self.ready = trio.Event()
        self.finished = trio.Event()

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Restore, start every task, report ready, and run until `stop()`; then shut down.

        Shutdown order (contract: configuration): stop sources, drain the channels through the
        workers, flush Redis, write every open minute, close the stores, all within
        `shutdown_timeout_s`.
        """
        try:
            with trio.move_on_after(RESTORE_TIMEOUT_S):
                await self.restore()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    probe_stores,
                    [
                        (self.redis_health, self.redis.ping, self.flusher.limiter),
                        (self.postgres_health, self.postgres_reader.ping, self.query_limiter),
                    ],
                )
                nursery.start_soon(self.flusher.run)
                nursery.start_soon(self.aggregator.run)
                await nursery.start(self.pipeline.run)
                await nursery.start(self.hub.run, self.stopping)
                self.ready.set()
                log.info(
                    "marketflow ready",
                    extra={"ctx": {"mode": self.pipeline.mode.value, "version": __version__}},
                )
                task_status.started()
                await self.stopping.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            self.redis.close()
            self.postgres.close()
            self.postgres_reader.close()
            self.finished.set()

    def stop(self) -> None:
        self.stopping.set()

    async def _shutdown(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.app.shutdown_timeout_s
            log.info("shutting down: draining pipeline")
            self.pipeline.stop()
            await self.pipeline.drained.wait()
            await self.flusher.flush(force=True)
            await self.aggregator.flush_all()
            log.info(
                "shutdown complete",
                extra={
                    "ctx": {
                        "updates_total": self.state.updates_total,
                        "journaled_rows": self.aggregator.journaled_rows,
                    }
                },
            )
        if scope.cancelled_caught:
            log.error("shutdown deadline passed; some state was not flushed")

    # --- restore (each open minute from whichever record holds more ticks) ------------

    async def restore(self) -> None:
        await self.aggregator.start()
        now_s = int(self.clock())
        since_s = now_s - self.config.app.window_seconds
        # The edge minute is only partly in the window: hold whole minutes only.
        horizon_s = (since_s // 60 + 1) * 60
        keys = [(s, sym) for s in self.config.all_sources for sym in self.config.app.symbols]
        try:
            windows = await trio.to_thread.run_sync(
                self.redis.read_windows, keys, horizon_s, limiter=self.flusher.limiter
            )
            latest = await trio.to_thread.run_sync(
                self.redis.read_latest, keys, limiter=self.flusher.limiter
            )
        except Exception as exc:
            log.warning(
                "redis unavailable at start; nothing restored from it",
                extra={"ctx": {"error": describe(exc)}},
            )
            windows, latest = {}, {}
        rows: dict[Key, dict[int, MinuteRow]] = {}
        try:
            rows = await trio.to_thread.run_sync(
                self._stored_rows, keys, horizon_s * 1000, limiter=self.aggregator.limiter
            )
        except Exception as exc:
            log.warning(
                "postgres unavailable at start; open minutes resume from redis and journal",
                extra={"ctx": {"error": describe(exc)}},
            )
        # Rows still in the journal are newer than PostgreSQL's (they could not be written).
        for batch in await trio.to_thread.run_sync(list, self.journal.batches()):
            for journaled in batch:
                if journaled.minute >= horizon_s * 1000:
                    key = (journaled.exchange, journaled.symbol)
                    rows.setdefault(key, {})[journaled.minute // 60_000] = journaled
        restored = 0
        for key in keys:
            st = self.state.key(*key)
            st.horizon_s = horizon_s
            if key in latest:
                st.latest_price, st.latest_ts = latest[key].price, latest[key].ts
            by_minute: dict[int, list[tuple[int, Bucket]]] = {}
            for second, bucket in windows.get(key, []):
                by_minute.setdefault(second // 60, []).append((second, bucket))
            stored = rows.get(key, {})
            for minute in set(by_minute) | set(stored):
                seconds = by_minute.get(minute, [])
                redis_count = sum(int(b[COUNT]) for _, b in seconds)
                row = stored.get(minute)
                if row is not None and row.count > redis_count:
                    st.minute_base[minute] = row.as_bucket()
                    continue
                for second, bucket in seconds:
                    st.buckets[second] = bucket
                restored += redis_count
                if row is None or row.count != redis_count:
                    st.minutes_dirty.add(minute)
        if restored or rows:
            log.info(
                "state restored",
                extra={"ctx": {"ticks_from_redis": restored, "keys": len(windows)}},
            )

    def _stored_rows(self, keys: list[Key], from_ms: int) -> dict[Key, dict[int, MinuteRow]]:
        self.postgres.migrate()
        out: dict[Key, dict[int, MinuteRow]] = {}
        for source, symbol in keys:
            found = self.postgres.rows(source, symbol, from_ms, 2**62)
            out[(source, symbol)] = {row.minute // 60_000: row for row in found}
        return out

    # --- the operations the API calls --------------------------------------------------------

    async def switch_mode(self, mode: Mode) -> tuple[Mode, bool]:
        """(previous mode, changed): the operation behind `POST /mode/*`."""
        return await self.pipeline.switch_mode(mode)

    def health(self) -> dict[str, Any]:
        now = trio.current_time() if _in_trio() else None
        current = set(self.pipeline.sources())
        sources: dict[str, Any] = {}
        for name, stats in self.pipeline.stats.items():
            age = None
            if stats.last_message_at is not None and now is not None:
                age = int((now - stats.last_message_at) * 1000)
            sources[name] = {
                "status": stats.status.value,
                "last_message_age_ms": age,
                "messages": stats.messages,
                "rejected": stats.rejected,
                "rejected_by_reason": dict(stats.rejected_by_reason),
                "reconnects": stats.reconnects,
            }
        degraded = (
            not self.redis_health.up
            or not self.postgres_health.up
            or any(self.pipeline.stats[n].status is not SourceStatus.CONNECTED for n in current)
        )
        return {
            "status": "degraded" if degraded else "ok",
            "mode": self.pipeline.mode.value,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "version": __version__,
            "postgres": self.postgres_health.as_json(),
            "redis": self.redis_health.as_json(),
            "sources": sources,
            "pipeline": {
                "queue_depth": self.pipeline.queue_depth,
                "updates_total": self.state.updates_total,
                "pending_rows": self.aggregator.pending_rows,
                "late": self.state.late,
            },
        }


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
