"""Store-facing background tasks: the Redis flusher and the store health probe.

Both call blocking adapters through `trio.to_thread`, one call per flush or probe, bounded by
the adapters' own socket timeouts (thread calls cannot be cancelled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from marketflow.backoff import Backoff
from marketflow.logs import rate_limited
from marketflow.metrics import Metrics
from marketflow.ports import FlushPlan, PriceStore
from marketflow.state import MarketState

log = logging.getLogger("marketflow.redis")


@attrs.define
class StoreHealth:
    """What /health says about one store."""

    name: str
    up: bool = False
    latency_ms: float | None = None
    error: str | None = "not reached yet"  # until the first probe or call answers
    checked: bool = False

    def ok(self, latency_ms: float | None = None) -> None:
        self.up, self.error, self.checked = True, None, True
        if latency_ms is not None:
            self.latency_ms = round(latency_ms, 2)

    def down(self, exc: BaseException) -> None:
        self.up, self.checked = False, True
        self.latency_ms = None
        self.error = describe(exc)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.up else "down",
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a store error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


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
            self.health.down(exc)
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
        self.health.ok()
        return True


def plan_commands(plan: FlushPlan) -> int:
    """Redis commands a flush plan costs (for the metric that shows Redis stays flat)."""
    seconds = sum(len(v) for v in plan.buckets.values())
    return 2 * len(plan.latest) + 2 * seconds + 2 * len(plan.touched)


async def probe_stores(
    checks: list[tuple[StoreHealth, Callable[[], float], trio.CapacityLimiter]],
    *,
    interval_s: float = 1.0,
) -> None:
    """Ping each store every `interval_s` so /health changes within 2 s of an outage."""
    while True:
        for health, ping, limiter in checks:
            was_up = health.up
            try:
                latency = await trio.to_thread.run_sync(ping, limiter=limiter)
            except Exception as exc:
                health.down(exc)
                if rate_limited(f"probe:{health.name}", 30.0):
                    logging.getLogger(f"marketflow.{health.name}").warning(
                        f"{health.name} unreachable", extra={"ctx": {"error": health.error}}
                    )
            else:
                if not was_up and health.checked:
                    logging.getLogger(f"marketflow.{health.name}").info(
                        f"{health.name} reachable again"
                    )
                health.ok(latency)
        await trio.sleep(interval_s)
