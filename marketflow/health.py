"""What /health says about the stores: each store's state, and the probe that keeps it current.

A store is `ok` only while it is reachable *and* its writes succeed. Two things feed
`StoreHealth`:
- the probe (`probe_store`, one task per store, every second, on a connection of its own, never
  the API reader's or the writer's): a writer's probe checks that the store would take a write (a
  Redis `SET` with a TTL; PostgreSQL not in recovery, not read-only, INSERT/UPDATE granted), a
  reader's probe only that it answers;
- the writers themselves: a failed write marks the store down at once with the write's error
  (`write_failed`), and only a successful write clears that (`wrote`), so a store that answers a
  ping but refuses writes (a read-only replica, out of memory, a revoked privilege) shows `down`
  within 2 s of the failed write and recovers by itself once writes go through again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from marketflow.logs import rate_limited
from marketflow.models import SourceStats

PROBE_INTERVAL_S = 1.0


@attrs.define
class StoreHealth:
    """What /health says about one store."""

    name: str
    reachable: bool = False
    latency_ms: float | None = None
    probe_error: str | None = "not reached yet"  # until the first probe answers
    write_error: str | None = None  # the last write's error, until a write succeeds
    checked: bool = False  # the probe (or a write) has answered at least once

    @property
    def up(self) -> bool:
        return self.reachable and self.write_error is None

    @property
    def error(self) -> str | None:
        return self.write_error or self.probe_error

    def ok(self, latency_ms: float | None = None) -> None:
        """The probe got an answer."""
        self.reachable, self.probe_error, self.checked = True, None, True
        if latency_ms is not None:
            self.latency_ms = round(latency_ms, 2)

    def down(self, exc: BaseException) -> None:
        """The probe got no answer (or the store would refuse a write)."""
        self.reachable, self.checked = False, True
        self.latency_ms = None
        self.probe_error = describe(exc)

    def wrote(self) -> None:
        """A write committed: the store is reachable and takes writes."""
        self.write_error = None
        self.reachable, self.probe_error, self.checked = True, None, True

    def write_failed(self, exc: BaseException) -> None:
        self.write_error = describe(exc)
        self.checked = True

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.up else "down",
            "latency_ms": self.latency_ms,
            "error": self.error,
        }


def source_json(stats: SourceStats, now: float | None) -> dict[str, Any]:
    """One source in /health; `now` is Trio's clock (None outside Trio: no age)."""
    age = None
    if stats.last_message_at is not None and now is not None:
        age = int((now - stats.last_message_at) * 1000)
    return {
        "status": stats.status.value,
        "last_message_age_ms": age,
        "messages": stats.messages,
        "rejected": stats.rejected,
        "rejected_by_reason": dict(stats.rejected_by_reason),
        "reconnects": stats.reconnects,
    }


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a store error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


async def probe_store(
    health: StoreHealth,
    check: Callable[[], float],
    *,
    on_up: Callable[[], None] | None = None,
    interval_s: float = PROBE_INTERVAL_S,
) -> None:
    """Run `check` (blocking; returns its latency in ms, raises when the store is unusable) every
    `interval_s` in a thread of its own, until cancelled; `on_up` runs when the store comes back.

    One task per store, so a store that hangs for its timeout never delays another's news.
    """
    limiter = trio.CapacityLimiter(1)
    logger = logging.getLogger(f"marketflow.{health.name}")
    while True:
        was_up = health.reachable
        try:
            latency = await trio.to_thread.run_sync(check, limiter=limiter)
        except Exception as exc:
            health.down(exc)
            if rate_limited(f"probe:{health.name}", 30.0):
                logger.warning(f"{health.name} unusable", extra={"ctx": {"error": health.error}})
        else:
            if not was_up and health.checked:
                logger.info(f"{health.name} reachable again")
            health.ok(latency)
            if not was_up and on_up is not None:
                on_up()
        await trio.sleep(interval_s)
