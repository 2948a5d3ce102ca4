"""One marketflow process — a node — and what the API asks of it (`ports.NodePort`).

The node runs the parts its role needs under one nursery and answers for them: the store
probes, the WebSocket hub, and the ingest side (restore, pipeline, flusher, aggregator). It is
also the read port (`ports.MarketView`) the queries answer from: the market state it fills, the
stored minutes older than that state, and the current mode's sources.

`Node.run` reports started at once, so the HTTP server answers `/health` with `starting` (503)
while the restore waits; the node is ready once its ingest runs.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from marketflow import __version__
from marketflow.broadcast import PriceHub
from marketflow.config import Config
from marketflow.health import StoreHealth, probe_store
from marketflow.ingest import Ingest
from marketflow.metrics import Metrics
from marketflow.minute_reader import MinuteReader
from marketflow.models import Mode, SourceStatus
from marketflow.state import MarketState

log = logging.getLogger("marketflow")

Probe = tuple[StoreHealth, Callable[[], float], Callable[[], None] | None]


def new_instance_id() -> str:
    """`<host>-<pid>-<random>`: unique per process, safe in a Redis key and a log line."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Node:
    """Owns the long-lived parts of one process except the HTTP server (see module docstring)."""

    def __init__(
        self,
        config: Config,
        *,
        state: MarketState,
        metrics: Metrics,
        ingest: Ingest,
        minutes: MinuteReader,
        redis_health: StoreHealth,
        postgres_health: StoreHealth,
        probes: list[Probe],
        closers: list[Callable[[], None]],
        clock: Callable[[], float] = time.time,
        instance: str | None = None,
    ) -> None:
        app = config.app
        self.config = config
        self.role = "all"
        self.instance = instance or new_instance_id()
        self._state = state
        self._metrics = metrics
        self.ingest = ingest
        self.minutes = minutes
        self.redis_health = redis_health
        self.postgres_health = postgres_health
        self.probes = probes
        self.closers = closers
        self.clock = clock
        self._hub = PriceHub(
            state,
            self.sources,
            symbols=app.symbols,
            all_sources=config.all_sources,
            interval_s=app.ws_min_interval_ms / 1000,
            max_lag_s=app.ws_max_lag_s,
        )
        self._stopping = trio.Event()
        self.finished = trio.Event()
        self.started_at = time.monotonic()
        metrics.watch(self.health, self.feed_lag_ms)

    # --- MarketView (the read port) ----------------------------------------------------------

    @property
    def state(self) -> MarketState:
        return self._state

    @property
    def stored(self) -> MinuteReader:
        return self.minutes

    def sources(self) -> list[str]:
        return self.ingest.pipeline.sources()

    def now(self) -> float:
        return self.clock()

    # --- NodePort ----------------------------------------------------------------------------

    @property
    def view(self) -> Node:
        return self

    @property
    def hub(self) -> PriceHub:
        return self._hub

    @property
    def stopping(self) -> trio.Event:
        return self._stopping

    def is_ready(self) -> bool:
        return self.ingest.running and not self._stopping.is_set()

    def mode(self) -> Mode:
        return self.ingest.pipeline.mode

    async def switch_mode(self, mode: Mode) -> dict[str, Any]:
        previous, changed = await self.ingest.pipeline.switch_mode(mode)
        return {
            "mode": mode.value,
            "previous": previous.value,
            "changed": changed,
            "sources": self.sources(),
        }

    def metrics(self) -> bytes:
        return self._metrics.render()

    def health(self) -> dict[str, Any]:
        """The /health body: `starting` until the ingest runs, then `ok` or `degraded`."""
        now = trio.current_time() if _in_trio() else None
        pipeline = self.ingest.pipeline
        current = set(pipeline.sources())
        sources: dict[str, Any] = {}
        for name, stats in pipeline.stats.items():
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
        body_pipeline = self.ingest.pipeline_json()
        if not self.ingest.running:
            status = "starting"
        elif (
            not self.redis_health.up
            or not self.postgres_health.up
            or body_pipeline["pending_rows"] > 0
            or any(pipeline.stats[n].status is not SourceStatus.CONNECTED for n in current)
        ):
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "role": self.role,
            "instance": self.instance,
            "mode": pipeline.mode.value,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "version": __version__,
            "postgres": self.postgres_health.as_json(),
            "redis": self.redis_health.as_json(),
            "sources": sources,
            "pipeline": body_pipeline,
        }

    def feed_lag_ms(self) -> dict[str, int | None]:
        """Per source, wall clock minus its newest tick's timestamp (None before any tick)."""
        now_ms = int(self.clock() * 1000)
        newest: dict[str, int] = {}
        for (source, _), st in self._state.keys.items():
            if st.latest_ts > newest.get(source, -1):
                newest[source] = st.latest_ts
        return {
            name: (now_ms - newest[name]) if name in newest else None
            for name in self.config.all_sources
        }

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every part until `stop()`, then let the ingest shut down in order and close the
        stores. Reports started before the restore, so `/health` can say `starting`."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._hub.run, self._stopping)
                task_status.started()
                await nursery.start(self.ingest.run, self._stopping)
                # After the restore, which creates and migrates the database on first use and
                # reports PostgreSQL's state itself while it waits.
                for health, check, on_up in self.probes:
                    nursery.start_soon(partial(probe_store, health, check, on_up=on_up))
                if self.ingest.running:
                    log.info(
                        "marketflow ready",
                        extra={
                            "ctx": {
                                "mode": self.mode().value,
                                "role": self.role,
                                "instance": self.instance,
                                "version": __version__,
                            }
                        },
                    )
                await self.ingest.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            for close in self.closers:
                close()
            self.finished.set()

    def stop(self) -> None:
        self._stopping.set()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
