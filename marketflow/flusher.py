"""The Redis flusher: changed state to Redis, one pipelined call per flush through `trio.to_thread`,
bounded by the adapter's own socket timeouts (thread calls cannot be cancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from marketflow.backoff import Backoff
from marketflow.health import StoreHealth, describe
from marketflow.metrics import Metrics
from marketflow.ports import FlushPlan, PriceStore
from marketflow.state import MarketState

log = logging.getLogger("marketflow.redis")


class RedisFlusher:
    """Writes changed state to Redis every `interval_s`, one pipelined call per flush.

    While Redis is down, state keeps accumulating in memory and retries back off; once a write
    succeeds again, the whole retained state is rewritten (Redis may have lost everything).
    """

    def __init__(
        self,
        state: MarketState,
        store: PriceStore,
        health: StoreHealth,
        metrics: Metrics,
        *,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
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
        plan = self.state.take_flush(int(self.clock()))
        if plan is None:
            return True
        started = time.perf_counter()
        try:
            await trio.to_thread.run_sync(self.store.write, plan, limiter=self.limiter)
        except Exception as exc:  # any client error means: Redis is not usable now
            self.state.redis_rewrite_all = True
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
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        self.metrics.redis_commands.inc(plan_commands(plan))
        if self._failing:
            log.info(
                "redis back; retained state rewritten", extra={"ctx": {"keys": len(plan.touched)}}
            )
            self._failing = False
            self._backoff.reset()
        self.health.wrote()
        return True


def plan_commands(plan: FlushPlan) -> int:
    """Redis commands a flush plan costs (for the metric that shows Redis stays flat)."""
    seconds = sum(len(v) for v in plan.buckets.values())
    return 2 * len(plan.latest) + 2 * seconds + 2 * len(plan.touched)
