"""The ingest side of a node: restore, the pipeline, the Redis flusher and the minute aggregator.

Task tree (`Ingest.run`, inside the node's nursery):

    Ingest.run
    ├── prepare            once: migrations and the journal a previous run left, retried until
    │                      PostgreSQL answers; cancelled if the node stops meanwhile
    ├── RedisFlusher.run   every flush_interval_ms: one pipelined call via trio.to_thread
    ├── aggregator scope   a cancel scope of its own: closed minutes -> PostgreSQL / journal
    ├── Pipeline.run       the fan-in channel, the distributor, the worker nursery, and a nursery
    │                      per source inside the current mode's cancel scope, where
    │                      Ownership.hold takes the source (file lock, lease, epoch), restores
    │                      its open minutes, then runs its reader or generator while held
    └── Coordinator.run    status every second, the shared mode, control requests (with Redis)

Shutdown, in a shielded scope with `shutdown_timeout_s` as deadline: stop the sources, let the
workers drain every batch already read, cancel the aggregator's scope and wait for it (a write in
progress finishes; rows not confirmed are marked dirty again), flush Redis once more, then write
every changed minute — the open ones too — and replay what the journal still holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from marketflow.aggregation import Aggregator
from marketflow.backoff import Backoff
from marketflow.config import Config
from marketflow.coordination import Coordinator
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth, describe
from marketflow.leases import Ownership
from marketflow.metrics import Metrics
from marketflow.models import Key, Mode
from marketflow.pipeline import Pipeline
from marketflow.ports import AggregateStore, Journal, PriceStore
from marketflow.restore import Restored, prepare_postgres, restore
from marketflow.state import MarketState

log = logging.getLogger("marketflow.ingest")


class Ingest:
    """Owns the write path of one process: sources to state, state to Redis and PostgreSQL."""

    def __init__(
        self,
        config: Config,
        state: MarketState,
        metrics: Metrics,
        *,
        price_store: PriceStore,
        aggregate_store: AggregateStore,
        journal: Journal,
        redis_health: StoreHealth,
        postgres_health: StoreHealth,
        instance: str = "local",
        clock: Callable[[], float] = time.time,
    ) -> None:
        app = config.app
        self.config = config
        self.state = state
        self.clock = clock
        self.price_store = price_store
        self.aggregate_store = aggregate_store
        self.postgres_health = postgres_health
        self.pipeline = Pipeline(config, state, metrics=metrics, clock=clock)
        self.flusher = RedisFlusher(
            state,
            price_store,
            redis_health,
            metrics,
            interval_s=app.flush_interval_ms / 1000,
            instance=instance,
            mode=lambda: self.pipeline.mode.value,
            clock=clock,
        )
        self.aggregator = Aggregator(
            state,
            aggregate_store,
            journal,
            postgres_health,
            metrics,
            grace_ms=app.grace_ms,
            batch_size=app.db_batch_size,
            pending_rows_max=app.pending_rows_max,
            clock=clock,
        )
        self.restored: dict[str, Restored] = {}
        self.running = False
        self.finished = trio.Event()
        # Set by the composition root: sharing through Redis, and the leases of the sources.
        self.coordinator: Coordinator | None = None
        self.ownership: Ownership | None = None
        self.on_give_up: Callable[[], None] | None = None  # a mirror re-reads what we let go

    async def run(
        self, stopping: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Restore, start the task tree, report started, and run until `stopping`; then shut
        down in order (module docstring). Reports started also when `stopping` comes first."""
        try:
            with trio.CancelScope() as starting:
                async with trio.open_nursery() as watch:
                    watch.start_soon(_cancel_when, stopping, starting)
                    await self._prepare()
                    watch.cancel_scope.cancel()
            if starting.cancelled_caught:
                log.info("stopped before the restore completed; nothing was written")
                task_status.started()
                return
            if self.coordinator is not None:
                self.pipeline.mode = await self.coordinator.shared_mode(self.pipeline.mode)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.flusher.run)
                aggregator = trio.CancelScope()
                aggregator_done = trio.Event()
                nursery.start_soon(self._aggregate, aggregator, aggregator_done)
                await nursery.start(self.pipeline.run)
                if self.coordinator is not None:
                    nursery.start_soon(self.coordinator.run)
                self.running = True
                task_status.started()
                await stopping.wait()
                await self._shutdown(aggregator, aggregator_done)
                nursery.cancel_scope.cancel()
        finally:
            self.running = False
            self.finished.set()

    async def _prepare(self) -> None:
        """Migrations and the journal a previous run left, before any source: retried until
        PostgreSQL answers (restore.py says why it must)."""
        await self.aggregator.open_journal()
        await prepare_postgres(
            self.aggregate_store,
            replay_journal=lambda: self.aggregator.replay_if_due(force=True),
            postgres_health=self.postgres_health,
            limiter=self.aggregator.limiter,
        )

    async def take_over(self, source: str, epoch: int) -> None:
        """`source` is ours (its lease and lock taken): resume its open minutes by the restore
        rule (from PostgreSQL and Redis, never both), then own its keys under `epoch`.
        A source this process held already (a mode switch back) keeps its state."""
        keys = [(source, symbol) for symbol in self.config.app.symbols]
        if not all(k in self.state.keys and self.state.keys[k].owned for k in keys):
            # Restored aside, then swapped in without a checkpoint: while the restore waits,
            # a mirror may still apply updates to the keys it held (harmless, they are
            # replaced), and nothing ever mixes its seconds with a restored row.
            scratch = MarketState(self.state.window_seconds, owned_by_default=False)
            self.restored[source] = await restore(
                scratch,
                keys,
                now_s=int(self.clock()),
                window_seconds=self.config.app.window_seconds,
                price_store=self.price_store,
                aggregate_store=self.aggregate_store,
                replay_journal=lambda: self.aggregator.replay_if_due(force=True),
                postgres_health=self.postgres_health,
                redis_limiter=self.flusher.limiter,
                postgres_limiter=self.aggregator.limiter,
            )
            for key in keys:
                st = scratch.keys[key]
                st.owned = st.rewrite = st.meta_dirty = True
                self.state.keys[key] = st
        await self.fence(source, epoch)
        self.set_epoch(source, epoch)

    async def fence(self, source: str, epoch: int) -> None:
        """Register `epoch` in PostgreSQL before ingesting under it, so a former holder's late
        rows are refused even before this process writes its first one; retried until
        PostgreSQL answers (nothing may be written under an unfenced epoch)."""
        if epoch == 0:
            return
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                await trio.to_thread.run_sync(
                    self.aggregate_store.register_epoch,
                    source,
                    epoch,
                    limiter=self.aggregator.limiter,
                )
                return
            except Exception as exc:
                self.postgres_health.write_failed(exc)
                delay = backoff.next()
                log.warning(
                    "waiting for postgres to fence the source's new epoch",
                    extra={"ctx": {"source": source, "error": describe(exc)}},
                )
                await trio.sleep(delay)

    def set_epoch(self, source: str, epoch: int) -> None:
        self.aggregator.epochs[source] = epoch

    async def refence(self, source: str, epoch: int) -> None:
        """A lease taken again while ingesting (after the guard was off, or it expired)."""
        await self.fence(source, epoch)
        self.set_epoch(source, epoch)

    def give_up(self, source: str) -> None:
        """`source` is held elsewhere: its keys are no longer ours (a mirror may fill them)."""
        for symbol in self.config.app.symbols:
            st = self.state.keys.get((source, symbol))
            if st is not None and st.owned and not st.minutes_dirty:
                st.owned = False
        if self.on_give_up is not None:
            self.on_give_up()

    async def _aggregate(self, scope: trio.CancelScope, done: trio.Event) -> None:
        with scope:
            try:
                await self.aggregator.run()
            finally:
                done.set()

    async def _shutdown(self, aggregator: trio.CancelScope, aggregator_done: trio.Event) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.app.shutdown_timeout_s
            log.info("shutting down: draining pipeline")
            if self.ownership is not None:
                self.ownership.shutting_down = True  # leases are released after the flush
            self.pipeline.stop()
            await self.pipeline.drained.wait()
            aggregator.cancel()
            await aggregator_done.wait()
            await self.flusher.flush(force=True)
            await self.aggregator.flush_all()
            if self.ownership is not None:
                await self.ownership.release_all()
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

    async def switch_mode(self, mode: Mode) -> dict[str, Any]:
        """Switch this process's sources; the body `POST /mode/*` answers."""
        previous, changed = await self.pipeline.switch_mode(mode)
        return {
            "mode": mode.value,
            "previous": previous.value,
            "changed": changed,
            "sources": self.pipeline.sources(),
        }

    def oldest_unwritten_ms(self) -> int | None:
        """The oldest minute not committed to PostgreSQL that readers of Redis cannot see
        either: journaled (pruned from the window), or held dirty but older than the window
        Redis keeps (rows that could be written nowhere)."""
        found = list(self.aggregator.journaled_from.values())
        dirty = self.state.oldest_dirty_minute()
        window_start_ms = (int(self.clock()) - self.config.app.window_seconds) * 1000
        if dirty is not None and dirty * 60_000 < window_start_ms:
            found.append(dirty * 60_000)
        return min(found) if found else None

    def unwritten_from(self, key: Key) -> int | None:
        """For this process's own reads: the oldest journaled minute of `key` (minutes held in
        memory are answered from memory)."""
        return self.aggregator.journaled_from.get(key)

    def pipeline_json(self) -> dict[str, int]:
        """The /health `pipeline` object."""
        return {
            "queue_depth": self.pipeline.queue_depth,
            "updates_total": self.state.updates_total,
            "pending_rows": self.aggregator.pending_rows,
            "late": self.state.late,
            "refused": self.state.refused,
        }


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
