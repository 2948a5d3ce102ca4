"""The Redis flusher: changed state to Redis, one pipelined call per flush through `trio.to_thread`,
bounded by the adapter's own socket timeouts (thread calls cannot be cancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs
import trio

from marketflow.backoff import Backoff
from marketflow.health import StoreHealth, describe
from marketflow.live import encode_update
from marketflow.metrics import Metrics
from marketflow.ports import FlushPlan, PartialWrite, PriceStore
from marketflow.state import MarketState

log = logging.getLogger("marketflow.redis")


class RedisFlusher:
    """Writes changed state to Redis every `interval_s`, one pipelined call per flush.

    While Redis is down, state keeps accumulating in memory and retries back off; once a write
    succeeds again, the whole retained state is rewritten (Redis may have lost everything).
    With Redis Cluster, a node that refuses its part (`PartialWrite`) holds back only its own
    keys: the other nodes' keys go on being written every flush, and the failed node's keys are
    rewritten whole once it takes a write again (it may come back empty).

    Each flush that changed anything also publishes one `updates` message (live.py) in the same
    pipelined round: what changed, as full current values, for the processes that mirror the
    state. A full rewrite publishes `resync` instead, and readers re-read the keys.
    """

    def __init__(
        self,
        state: MarketState,
        store: PriceStore,
        health: StoreHealth,
        metrics: Metrics,
        *,
        interval_s: float,
        instance: str = "local",
        mode: Callable[[], str] = lambda: "test",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance
        self.mode = mode
        self.seq = 0  # of the last `updates` message (attempted: a failed round leaves a gap)
        self.state = state
        self.store = store
        self.health = health
        self.metrics = metrics
        self.interval_s = interval_s
        self.clock = clock
        self.limiter = trio.CapacityLimiter(1)
        self._backoff = Backoff(0.5, 5.0)
        self._retry_at = 0.0
        self._failing = False
        self._failed_nodes: list[str] = []  # cluster nodes refusing their part (last flush)

    async def run(self) -> None:
        """Flush forever; cancel to stop (call `flush()` once more for a final write)."""
        due = trio.current_time()
        while True:
            # A fixed schedule: the period is `interval_s`, not `interval_s` plus the flush.
            due = max(due + self.interval_s, trio.current_time())
            await trio.sleep_until(due)
            await self.flush()

    async def flush(self, *, force: bool = False) -> bool:
        """One flush; False if Redis refused it (the state stays marked for a full rewrite)."""
        if self._failing and not force and trio.current_time() < self._retry_at:
            return False
        now_s = int(self.clock())
        plan = self.state.take_flush(now_s)
        retry_only = plan is None
        if plan is None:
            if not self._failed_nodes:
                return True
            # Nothing changed, but cluster nodes failed: an empty plan lets the store try them
            # again (a PING each, after its backoff), so their keys' rewrite does not wait for
            # the next tick.
            plan = FlushPlan(latest=[], buckets={}, touched=[], now_s=now_s)
        else:
            self.seq += 1
            plan = attrs.evolve(plan, message=self.message(plan))
        started = time.perf_counter()
        try:
            await trio.to_thread.run_sync(self.store.write, plan, limiter=self.limiter)
        except PartialWrite as exc:
            if exc.written_any or retry_only:
                self._nodes_failed(exc)
                return False
            return self._failed(exc)
        except Exception as exc:  # any client error means: Redis is not usable now
            return self._failed(exc)
        if not retry_only:
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            self.metrics.redis_commands.inc(plan_commands(plan))
        if self._failing:
            log.info(
                "redis back; retained state rewritten", extra={"ctx": {"keys": len(plan.touched)}}
            )
            self._failing = False
            self._backoff.reset()
        if self.state.held_rewrites:
            released = self.state.release_rewrites()
            log.info("redis nodes back; their keys rewritten", extra={"ctx": {"keys": released}})
        self._failed_nodes = []
        self.health.wrote()
        return True

    def _nodes_failed(self, exc: PartialWrite) -> None:
        """Some cluster nodes refused their part: their keys wait, the others were written."""
        if self._failing:  # the nodes that answered took their keys' rewrite
            self._failing = False
            self._backoff.reset()
        self.state.hold_rewrites(exc.covers)
        self.state.release_rewrites(exc.covers)
        self.health.write_failed(exc)
        self.metrics.store_errors.labels("redis").inc()
        if exc.nodes != self._failed_nodes:
            log.warning(
                "redis nodes refused writes; their keys wait in memory",
                extra={"ctx": {"nodes": ",".join(exc.nodes), "error": describe(exc)}},
            )
            self._failed_nodes = exc.nodes

    def _failed(self, exc: Exception) -> bool:
        """Redis took nothing: every owned key is rewritten once it does, retries back off."""
        self.state.rewrite_all()
        self.health.write_failed(exc)
        self.metrics.store_errors.labels("redis").inc()
        delay = self._backoff.next()
        self._retry_at = trio.current_time() + delay
        if not self._failing:  # the health probe repeats the news while it lasts
            log.warning(
                "redis write failed; keeping state in memory",
                extra={"ctx": {"error": describe(exc), "retry_in_s": round(delay, 1)}},
            )
        self._failing = True
        return False

    def message(self, plan: FlushPlan) -> bytes:
        """The `updates` message announcing `plan` (pure apart from the sequence number)."""
        if plan.rewrite:
            return encode_update(
                instance=self.instance, seq=self.seq, mode=self.mode(), resync=True
            )
        return encode_update(
            instance=self.instance,
            seq=self.seq,
            mode=self.mode(),
            latest=[((p.source, p.symbol), p.price, p.ts) for p in plan.latest],
            buckets=[(key, sec, b) for key, seconds in plan.buckets.items() for sec, b in seconds],
            meta=plan.meta,
        )


def plan_commands(plan: FlushPlan) -> int:
    """Redis commands a flush plan costs (for the metric that shows Redis stays flat)."""
    seconds = sum(len(v) for v in plan.buckets.values())
    rewrite = len(plan.rewritten)
    published = 1 if plan.message is not None else 0
    metas = 2 * len(plan.meta) + len({*plan.touched, *((m.source, m.symbol) for m in plan.meta)})
    return 2 * len(plan.latest) + 2 * seconds + 2 * len(plan.touched) + rewrite + metas + published
