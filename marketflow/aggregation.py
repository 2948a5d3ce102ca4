"""The minute aggregator (contract: PostgreSQL): closed minutes -> PostgreSQL, or the journal
while it is down.

Rows carry whole-minute totals and are upserted by overwrite, so writing a minute again (a late
tick, a replay, a restart) can never count a tick twice. While PostgreSQL is unreachable each
finished batch is appended to the journal (fsync) before it leaves memory; the journal is
replayed in order, in chunks, and truncated only after every batch in it committed.

A minute leaves the state's dirty set when its row is taken for writing; if that write neither
commits nor reaches the journal — it failed, or the task was cancelled around it — the minute is
marked dirty again, so the next step (or the shutdown's final flush) writes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from marketflow.backoff import Backoff
from marketflow.health import StoreHealth, describe
from marketflow.logs import rate_limited
from marketflow.metrics import Metrics
from marketflow.models import Key, MinuteRow
from marketflow.ports import AggregateStore, Journal
from marketflow.state import MarketState

log = logging.getLogger("marketflow.aggregator")
CHECK_INTERVAL_S = 0.25
REPLAY_CHUNK_ROWS = 5_000  # rows per thread call of a replay: a deadline is checked between


class Aggregator:
    """Owns the write path to PostgreSQL and the journal. Time comes from `clock` (wall, for
    minute boundaries and grace) and Trio's clock (for sleeps and deadlines), so tests can inject
    both."""

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
        pending_rows_max: int = 1_000_000,
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
        self.pending_rows_max = pending_rows_max
        self.clock = clock
        self.limiter = trio.CapacityLimiter(1)  # one connection: one thread at a time
        self._backoff = Backoff(1.0, retry_cap_s)
        self._retry_at = 0.0
        self.journaled_rows = 0  # rows waiting in the journal (mirrors len(journal))
        # Per key, the oldest minute (ms) in the journal: not in PostgreSQL yet, and pruned from
        # memory once it leaves the window, so a read of it must wait (503), not omit it.
        self.journaled_from: dict[Key, int] = {}
        self.unwritable_rows = 0  # rows neither PostgreSQL nor the journal took: held in memory
        # Each owned source's lease epoch, stamped on its rows (0: no lease, the guard is off).
        self.epochs: dict[str, int] = {}
        self.fenced_rows = 0  # rows PostgreSQL refused: written under an older epoch
        self._replayed_to = 0  # byte offset of the journal prefix already committed
        self._replay_refused = 0

    @property
    def pending_rows(self) -> int:
        """Rows in the journal, waiting for PostgreSQL."""
        return self.journaled_rows

    async def run(self) -> None:
        """Write closed minutes every CHECK_INTERVAL_S until cancelled.

        Runs in a cancel scope of its own (the ingest's shutdown cancels it before the final
        flush). Cancellation loses nothing: a thread call in progress finishes (thread calls
        cannot be cancelled), and rows not confirmed written are marked dirty again.
        """
        while True:
            await self.step()
            await trio.sleep(CHECK_INTERVAL_S)

    async def step(self) -> None:
        """Replay the journal if due, write minutes closed for `grace_ms`, prune old buckets."""
        now = self.clock()
        await self.replay_if_due()
        await self.write(self.state.take_minutes(int(now * 1000) - self.grace_ms))
        self.state.prune(int(now))

    async def flush_all(self) -> None:
        """Write every changed minute, the open ones too (shutdown), then replay the journal.
        The caller bounds it with a deadline. The minutes go first: while the journal holds
        rows they are appended behind them (a local fsync, quick), so a long replay cut short
        by the deadline loses nothing — it is finished at the next start."""
        await self.write(self.state.take_minutes(None))
        await self.replay_if_due(force=True)

    async def write(self, rows: Sequence[MinuteRow]) -> None:
        """Write `rows` in batches of `batch_size`; rows of a batch that neither committed nor
        reached the journal (an error, or cancellation) are marked dirty again."""
        if not rows:
            return
        epochs = self.epochs
        rows = [
            attrs.evolve(r, epoch=epoch) if (epoch := epochs.get(r.exchange, 0)) else r
            for r in rows
        ]
        done = 0
        unwritable = 0
        try:
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                if not await self._write_batch(batch):
                    self._mark_dirty(batch)
                    unwritable += len(batch)
                done = start + len(batch)
        finally:
            self._mark_dirty(rows[done:])
        self._hold_unwritable(unwritable)

    def _hold_unwritable(self, rows: int) -> None:
        """Rows neither store took stay in memory; past `pending_rows_max` of them, the state
        refuses ticks that would open new minutes (loudly), so memory stays bounded."""
        self.unwritable_rows = rows
        refuse = rows >= self.pending_rows_max
        if refuse and not self.state.refuse_new_minutes:
            log.error(
                "pending_rows_max reached: neither PostgreSQL nor the journal takes rows; "
                "ticks opening new minutes are refused until they do",
                extra={"ctx": {"rows_in_memory": rows, "pending_rows_max": self.pending_rows_max}},
            )
        elif not refuse and self.state.refuse_new_minutes:
            log.info("rows are written again; new minutes accepted")
        self.state.refuse_new_minutes = refuse

    def _mark_dirty(self, rows: Sequence[MinuteRow]) -> None:
        for row in rows:
            self.state.key(row.exchange, row.symbol).minutes_dirty.add(row.minute // 60_000)

    async def _write_batch(self, batch: Sequence[MinuteRow]) -> bool:
        """Commit `batch`, or append it to the journal; False if neither took it."""
        if self.journaled_rows == 0:
            started = time.perf_counter()
            try:
                refused = await trio.to_thread.run_sync(
                    self.store.upsert, batch, limiter=self.limiter
                )
            except Exception as exc:
                self._failed(exc)
            else:
                self._fenced(refused)
                self.metrics.db_write_seconds.observe(time.perf_counter() - started)
                self.metrics.db_rows.inc(len(batch))
                self.health.wrote()
                return True
        # PostgreSQL is down, or older batches wait before this one: keep the order.
        try:
            await trio.to_thread.run_sync(self.journal.append, batch, limiter=self.limiter)
        except OSError as exc:
            # Not even the disk: the minutes stay in memory, bounded by `pending_rows_max`.
            if rate_limited("journal-append", 10.0):
                log.error(
                    "journal append failed; rows stay in memory",
                    extra={"ctx": {"error": describe(exc), "rows": len(batch)}},
                )
            return False
        self.journaled_rows += len(batch)
        for row in batch:
            key = (row.exchange, row.symbol)
            if row.minute < self.journaled_from.get(key, row.minute + 1):
                self.journaled_from[key] = row.minute
        return True

    def _fenced(self, refused: int) -> None:
        if not refused:
            return
        self.fenced_rows += refused
        self.metrics.fenced_rows.inc(refused)
        log.error(
            "rows refused by postgres: another process took this source's lease (newer epoch)",
            extra={"ctx": {"rows": refused, "refused_total": self.fenced_rows}},
        )

    def _replay_chunk(self, deadline: float) -> tuple[int, bool]:
        """Commit journaled batches from the committed prefix on, about REPLAY_CHUNK_ROWS at a
        time, until `deadline` (time.monotonic); truncate once all committed. Runs in a thread.
        Returns (rows committed, finished)."""
        self._replay_refused = 0
        replayed = 0
        chunk: list[MinuteRow] = []
        chunk_end = self._replayed_to
        for end, batch in self.journal.read_from(self._replayed_to):
            chunk.extend(batch)
            chunk_end = end
            if len(chunk) >= REPLAY_CHUNK_ROWS:
                self._replay_refused += self.store.upsert(chunk)
                replayed += len(chunk)
                self._replayed_to = chunk_end
                chunk = []
                if time.monotonic() >= deadline:
                    return replayed, False
        if chunk:
            self._replay_refused += self.store.upsert(chunk)
            replayed += len(chunk)
        self.journal.truncate()
        self._replayed_to = 0
        return replayed, True

    async def replay_if_due(self, *, force: bool = False) -> bool:
        """Replay the journal when its retry time has come (or `force`); True when it is empty.

        The replay stops between chunks at the caller's Trio deadline (the shutdown's), so a large
        journal never holds a shutdown past `shutdown_timeout_s`; it goes on at the next call.
        """
        if self.journaled_rows == 0:
            return True
        if not force and trio.current_time() < self._retry_at:
            return False
        deadline = trio.current_effective_deadline()
        while True:
            left = deadline - trio.current_time()
            wall_deadline = time.monotonic() + (min(left, 1.0) if left != float("inf") else 1.0)
            try:
                replayed, finished = await trio.to_thread.run_sync(
                    self._replay_chunk, wall_deadline, limiter=self.limiter
                )
            except Exception as exc:
                self._failed(exc)
                return False
            self.metrics.db_rows.inc(replayed)
            self._fenced(self._replay_refused)
            self.health.wrote()
            if finished:
                log.info("journal replayed into postgres", extra={"ctx": {"rows": replayed}})
                self.journaled_rows = 0
                self.journaled_from.clear()
                self._backoff.reset()
                return True
            if trio.current_time() >= deadline:
                log.warning(
                    "journal replay paused at the deadline; it resumes at the next start",
                    extra={"ctx": {"journaled_rows": self.journaled_rows}},
                )
                return False

    def _failed(self, exc: Exception) -> None:
        was_up = self.health.up
        self.health.write_failed(exc)
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

    def retry_soon(self) -> None:
        """PostgreSQL answers again (the probe saw it): replay at the next step, not after the
        backoff, so answers wait on the journal as briefly as possible."""
        self._retry_at = 0.0

    async def open_journal(self) -> None:
        """Count the rows a previous run left in the journal."""
        self.journaled_rows = await trio.to_thread.run_sync(len, self.journal)
