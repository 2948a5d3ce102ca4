"""The minute aggregator (contract: PostgreSQL): closed minutes -> PostgreSQL, or the journal while
it is down.

Rows carry whole-minute totals and are upserted by overwrite, so writing a minute again (a late
tick, a replay, a restart) can never count a tick twice. While PostgreSQL is unreachable each
finished batch is appended to the journal (fsync) before it leaves memory; the journal is
replayed in order, and truncated only after the replay committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import trio

from marketflow.backoff import Backoff
from marketflow.flusher import StoreHealth, describe
from marketflow.logs import rate_limited
from marketflow.metrics import Metrics
from marketflow.models import MinuteRow
from marketflow.ports import AggregateStore, Journal
from marketflow.state import MarketState

log = logging.getLogger("marketflow.aggregator")
CHECK_INTERVAL_S = 0.25


class Aggregator:
    """Owns the write path to PostgreSQL and the journal. Time comes from `clock` (wall, for
    minute boundaries and grace) and Trio's clock (for sleeps), so tests can inject both."""

    def __init__(
        self,
        state: MarketState,
        store: AggregateStore,
        journal: Journal,
        health: StoreHealth,
        metrics: Metrics,
        *,
        grace_ms: int,
        batch_size: int,
        retry_cap_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.store = store
        self.journal = journal
        self.health = health
        self.metrics = metrics
        self.grace_ms = grace_ms
        self.batch_size = batch_size
        self.clock = clock
        self.limiter = trio.CapacityLimiter(1)  # one connection: one thread at a time
        self._backoff = Backoff(1.0, retry_cap_s)
        self._retry_at = 0.0
        self._migrated = False
        self.journaled_rows = 0  # rows waiting in the journal (mirrors len(journal))

    @property
    def pending_rows(self) -> int:
        return self.journaled_rows

    async def run(self) -> None:
        """Write closed minutes every CHECK_INTERVAL_S until cancelled.

        Cancellation between checks loses nothing: unwritten minutes stay marked in state, and
        the service's shutdown calls `flush_all()` in a shielded scope.
        """
        while True:
            await self.step()
            await trio.sleep(CHECK_INTERVAL_S)

    async def step(self) -> None:
        """Replay the journal if due, write minutes closed for `grace_ms`, prune old buckets."""
        now = self.clock()
        await self._replay_if_due()
        rows = self.state.take_minutes(int(now * 1000) - self.grace_ms)
        await self.write(rows)
        self.state.prune(int(now))

    async def flush_all(self) -> None:
        """Write every changed minute, the open ones too (shutdown)."""
        await self._replay_if_due(force=True)
        await self.write(self.state.take_minutes(None))

    async def write(self, rows: Sequence[MinuteRow]) -> None:
        for start in range(0, len(rows), self.batch_size):
            await self._write_batch(rows[start : start + self.batch_size])

    async def _write_batch(self, batch: Sequence[MinuteRow]) -> None:
        if self.journaled_rows == 0:
            started = time.perf_counter()
            try:
                await trio.to_thread.run_sync(self._upsert, batch, limiter=self.limiter)
            except Exception as exc:
                self._failed(exc)
            else:
                self.metrics.db_write_seconds.observe(time.perf_counter() - started)
                self.metrics.db_rows.inc(len(batch))
                self.health.ok()
                return
        # PostgreSQL is down, or older batches wait before this one: keep the order.
        try:
            await trio.to_thread.run_sync(self.journal.append, batch, limiter=self.limiter)
        except OSError as exc:
            # Not even the disk: keep the minutes in memory (bounded by the state's keys).
            log.error("journal append failed", extra={"ctx": {"error": describe(exc)}})
            for row in batch:
                self.state.key(row.exchange, row.symbol).minutes_dirty.add(row.minute // 60_000)
            return
        self.journaled_rows += len(batch)

    def _upsert(self, rows: Sequence[MinuteRow]) -> None:
        if not self._migrated:
            self.store.migrate()
            self._migrated = True
        self.store.upsert(rows)

    def _replay(self) -> int:
        """Commit every journaled batch in order, then truncate. Runs in a worker thread."""
        if not self._migrated:
            self.store.migrate()
            self._migrated = True
        replayed = 0
        for batch in self.journal.batches():
            self.store.upsert(batch)
            replayed += len(batch)
        self.journal.truncate()
        return replayed

    async def _replay_if_due(self, *, force: bool = False) -> None:
        if self.journaled_rows == 0:
            return
        if not force and trio.current_time() < self._retry_at:
            return
        try:
            replayed = await trio.to_thread.run_sync(self._replay, limiter=self.limiter)
        except Exception as exc:
            self._failed(exc)
            return
        log.info("journal replayed into postgres", extra={"ctx": {"rows": replayed}})
        self.metrics.db_rows.inc(replayed)
        self.journaled_rows = 0
        self._backoff.reset()
        self.health.ok()

    def _failed(self, exc: Exception) -> None:
        was_up = self.health.up
        self.health.down(exc)
        self.metrics.store_errors.labels("postgres").inc()
        delay = self._backoff.next()
        self._retry_at = trio.current_time() + delay
        if was_up or rate_limited("pg-write", 10.0):
            log.warning(
                "postgres write failed; journaling rows",
                extra={
                    "ctx": {
                        "error": describe(exc),
                        "retry_in_s": round(delay, 1),
                        "journaled_rows": self.journaled_rows,
                    }
                },
            )

    async def start(self) -> None:
        """Replay a journal left by an earlier run (best effort: PostgreSQL may be down)."""
        self.journaled_rows = await trio.to_thread.run_sync(len, self.journal)
        await self._replay_if_due(force=True)
