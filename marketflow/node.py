"""One marketflow process — a node — and what the API asks of it (`ports.NodePort`).

A node runs the parts its role needs under one nursery and answers for them (contract: roles):

- `all` (the default): the ingest side (restore, pipeline, flusher, aggregator) and the API,
  answering from the state it ingests into; it needs no Redis to start.
- `ingest`: the same ingest side and the same API (the `api` processes are the ones meant to
  serve clients; an ingest process answers alike, from its own sources).
- `api`: no sources; the API answers from a mirror of the state kept current from Redis, plus
  PostgreSQL for older minutes, and from PostgreSQL alone (`"fallback":"postgres"`) while Redis
  is unreachable.

The node is also the read port (`ports.MarketView`) the queries answer from, whatever fills its
state. `Node.run` reports started at once, so the HTTP server answers `/health` with `starting`
(503) while the restore waits.
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
from typing import Any, Literal

import trio

from marketflow import __version__
from marketflow.broadcast import CANDLE_FRAME_MIN_S, HEARTBEAT_S, PriceHub
from marketflow.config import Config
from marketflow.coordination import request_mode
from marketflow.health import StoreHealth, describe, probe_store, source_json
from marketflow.ingest import Ingest
from marketflow.metrics import Metrics
from marketflow.minute_reader import MinuteReader
from marketflow.mirror import Mirror
from marketflow.models import Mode, SourceStatus
from marketflow.ports import LiveStore
from marketflow.queries import QueryError
from marketflow.state import MarketState

log = logging.getLogger("marketflow")

Role = Literal["all", "ingest", "api"]
Probe = tuple[StoreHealth, Callable[[], float], Callable[[], None] | None]
# A source's health status that is not a fault: ingesting, or held by another process while
# this one stands by for it.
_RUNNING = (SourceStatus.CONNECTED.value, "standby")


def new_instance_id() -> str:
    """`<host>-<pid>-<random>`: unique per process, safe in a Redis key and a log line."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Node:
    """Owns the long-lived parts of one process except the HTTP server (see module docstring).

    `ingest` is set for roles all and ingest, `mirror` for role api — and for role all with
    Redis, which mirrors the sources another instance holds.
    """

    def __init__(
        self,
        config: Config,
        *,
        role: Role,
        instance: str,
        state: MarketState,
        metrics: Metrics,
        minutes: MinuteReader,
        redis_health: StoreHealth,
        postgres_health: StoreHealth,
        ingest: Ingest | None = None,
        mirror: Mirror | None = None,
        live: LiveStore | None = None,
        probes: list[Probe] | None = None,
        closers: list[Callable[[], None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert ingest is not None or mirror is not None, "a node ingests, mirrors, or both"
        app = config.app
        self.config = config
        self.role: Role = role
        self.instance = instance
        self._state = state
        self._metrics = metrics
        self.ingest = ingest
        self.mirror = mirror
        self.live = live
        self.minutes = minutes
        self.redis_health = redis_health
        self.postgres_health = postgres_health
        self.probes = probes or []
        self.closers = closers or []
        self.clock = clock
        self._hub = PriceHub(
            state,
            self.sources,
            stored=minutes,
            symbols=app.symbols,
            all_sources=config.all_sources,
            interval_s=app.ws_min_interval_ms / 1000,
            max_lag_s=app.ws_max_lag_s,
            fresh_ms=app.redis_ttl_seconds * 1000,
            grace_ms=app.grace_ms,
            heartbeat_s=HEARTBEAT_S,
            candle_interval_s=max(app.ws_min_interval_ms / 1000, CANDLE_FRAME_MIN_S),
            clock=clock,
        )
        if mirror is not None:
            mirror.on_change = self._hub.poke
            mirror.on_reload = self._hub.book.reload
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

    @property
    def fallback(self) -> bool:
        """True while answers come from PostgreSQL alone (role api, Redis unreachable)."""
        return self.ingest is None and self.mirror is not None and not self.mirror.current

    @property
    def fresh_ms(self) -> int:
        """A latest price older than this (by its timestamp) is no longer current."""
        return self.config.app.redis_ttl_seconds * 1000

    def sources(self) -> list[str]:
        return self.config.sources_for(self.mode().value)

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
        """Can this process serve current data? (/health/ready)"""
        if self._stopping.is_set():
            return False
        if self.ingest is not None:
            return self.ingest.running
        assert self.mirror is not None
        return self.mirror.current or self.postgres_health.up

    def mode(self) -> Mode:
        if self.ingest is not None:
            return self.ingest.pipeline.mode
        assert self.mirror is not None
        return self.mirror.mode

    async def switch_mode(self, mode: Mode) -> dict[str, Any]:
        if self.ingest is not None:
            coordinator = self.ingest.coordinator
            if coordinator is not None:
                return await coordinator.switch(mode)
            return await self.ingest.switch_mode(mode)
        assert self.mirror is not None and self.live is not None
        instances = list(self.mirror.live_statuses())
        try:
            body = await request_mode(self.live, mode, instances, self.config.all_sources)
        except QueryError:
            raise
        except Exception as exc:  # Redis unreachable: nobody can be asked
            raise QueryError(503, f"redis unavailable: {describe(exc)}") from None
        self.mirror.mode = mode
        return body

    def metrics(self) -> bytes:
        return self._metrics.render()

    def health(self) -> dict[str, Any]:
        """The /health body (contract: health) for this role."""
        if self.ingest is not None:
            return self._ingest_health(self.ingest)
        assert self.mirror is not None
        return self._api_health(self.mirror)

    def _base(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "role": self.role,
            "instance": self.instance,
            "mode": self.mode().value,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "version": __version__,
            "postgres": self.postgres_health.as_json(),
            "redis": self.redis_health.as_json(),
        }

    def _ingest_health(self, ingest: Ingest) -> dict[str, Any]:
        now = trio.current_time() if _in_trio() else None
        pipeline = ingest.pipeline
        current = set(pipeline.sources())
        sources = {name: source_json(stats, now) for name, stats in pipeline.stats.items()}
        ownership = ingest.ownership
        if ownership is not None:
            # Sources another process holds, this one standing by to take them over.
            for name in ownership.elsewhere:
                if name in current and name not in ownership.held and name in sources:
                    sources[name] = {**sources[name], "status": "standby"}
        if ownership is not None and self.mirror is not None:
            # Sources another instance holds: as that instance reports them.
            for body in self.mirror.live_statuses().values():
                for name, src in body.get("sources", {}).items():
                    if name in current and name not in ownership.held:
                        sources[name] = src
        body_pipeline = ingest.pipeline_json()
        if not ingest.running:
            status = "starting"
        elif ownership is not None and ownership.standby:
            status = "standby"
        elif (
            not self.redis_health.up
            or not self.postgres_health.up
            or body_pipeline["pending_rows"] > 0
            or any(sources[n]["status"] not in _RUNNING for n in current)
        ):
            status = "degraded"
        else:
            status = "ok"
        return {**self._base(status), "sources": sources, "pipeline": body_pipeline}

    def status_body(self) -> dict[str, Any]:
        """This ingesting instance's `status:{INSTANCE}` (contract: Redis)."""
        assert self.ingest is not None
        health = self._ingest_health(self.ingest)
        ownership = self.ingest.ownership
        # Only the sources this instance ingests: a standby or an instance that holds some of
        # them must never report the others as disconnected over their holder's report.
        current = set(self.sources()) if ownership is None else set(ownership.held)
        oldest = self.ingest.oldest_unwritten_ms()
        return {
            "instance": self.instance,
            "mode": health["mode"],
            "sources": {k: v for k, v in health["sources"].items() if k in current},
            "pipeline": health["pipeline"],
            "postgres": health["postgres"],
            "oldest_unwritten_minute": oldest,
            "at": int(self.clock() * 1000),
        }

    def _api_health(self, mirror: Mirror) -> dict[str, Any]:
        statuses = mirror.live_statuses()
        sources: dict[str, Any] = {}
        pipeline = {"queue_depth": 0, "updates_total": 0, "pending_rows": 0, "late": 0}
        ages = []
        now_ms = int(self.clock() * 1000)
        for body in statuses.values():
            for name, src in body.get("sources", {}).items():
                if name not in sources or src.get("status") == "connected":
                    sources[name] = src
            for field in pipeline:
                pipeline[field] += int(body.get("pipeline", {}).get(field, 0))
            ages.append(now_ms - int(body.get("at", now_ms)))
        ingest = {
            "status": "ok" if statuses else "down",
            "instances": sorted(statuses),
            "age_ms": min(ages) if ages else None,
        }
        current = self.sources()
        degraded = (
            not statuses
            or not self.redis_health.up
            or not self.postgres_health.up
            or pipeline["pending_rows"] > 0
            or any(sources.get(n, {}).get("status") != "connected" for n in current)
        )
        return {
            **self._base("degraded" if degraded else "ok"),
            "sources": sources,
            "pipeline": pipeline,
            "ingest": ingest,
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
                if self.mirror is not None:
                    nursery.start_soon(self.mirror.run)
                if self.ingest is not None:
                    await nursery.start(self.ingest.run, self._stopping)
                # After the restore, which creates and migrates the database on first use and
                # reports PostgreSQL's state itself while it waits.
                for health, check, on_up in self.probes:
                    nursery.start_soon(partial(probe_store, health, check, on_up=on_up))
                if not self._stopping.is_set():
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
                if self.ingest is not None:
                    await self.ingest.finished.wait()
                else:
                    await self._stopping.wait()
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
