"""The composition root: `build_node` wires the adapters into a node, `serve` runs it with
Hypercorn under the root nursery (the `marketflow` command).

Only wiring happens here. Each store gets its own connections per job: the ingest's writer, the
API's reader and the health probe never wait behind one another.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from marketflow.config import Config
from marketflow.coordination import Coordinator
from marketflow.health import StoreHealth
from marketflow.hypercorn_guard import guard_hypercorn_connections
from marketflow.ingest import Ingest
from marketflow.leases import FileLocks, Ownership
from marketflow.metrics import Metrics
from marketflow.minute_reader import MinuteReader
from marketflow.mirror import Mirror
from marketflow.models import Mode
from marketflow.node import Node, Probe, Role, new_instance_id
from marketflow.ports import AggregateStore, Journal, LiveStore, PriceStore
from marketflow.state import MarketState

log = logging.getLogger("marketflow")

# The API reads stored minutes through this many connections of its own, so one request's read
# (a thousand candles: a few ms) runs beside another's instead of queueing behind it.
READER_CONNECTIONS = 2


def build_node(
    config: Config,
    *,
    price_store: PriceStore | None = None,
    aggregate_store: AggregateStore | None = None,
    query_store: AggregateStore | None = None,
    journal: Journal | None = None,
    live_store: LiveStore | None = None,
    probes: bool = True,
    clock: Callable[[], float] = time.time,
) -> Node:
    """A node for `config` and its role on the real stores; tests pass fakes for any of them
    (with `probes=False` to run without the probe connections; without a `live_store` and
    with a fake price store, nothing is shared through Redis)."""
    from marketflow.store.journal import claim_journal
    from marketflow.store.pool import StorePool
    from marketflow.store.postgres import PostgresAggregateStore
    from marketflow.store.redis import RedisPriceStore

    app = config.app
    role: Role = app.role  # type: ignore[assignment]  # checked by config.validate
    instance = new_instance_id()

    def redis_store() -> RedisPriceStore:
        return RedisPriceStore(
            config.redis, window_seconds=app.window_seconds, ttl_seconds=app.redis_ttl_seconds
        )

    # Keys become owned when their source is taken over (leases), never by accident.
    state = MarketState(app.window_seconds, owned_by_default=False)
    metrics = Metrics()
    redis_health = StoreHealth("redis")
    postgres_health = StoreHealth("postgres")
    reader: AggregateStore = (
        query_store
        if query_store is not None
        else StorePool(
            [
                PostgresAggregateStore(config.postgres, migrate=False)
                for _ in range(READER_CONNECTIONS)
            ]
        )
    )
    connections = 1 if query_store is not None else READER_CONNECTIONS
    closers: list[Callable[[], None]] = [reader.close]
    # Status, mode and control: a connection of their own, never behind a flush.
    live: LiveStore | None = live_store
    if live is None and price_store is None:
        live = redis_store()
    if live is not None and live_store is None:
        closers.append(live.close)
    checks: list[Probe] = []
    keys = [(s, sym) for s in config.all_sources for sym in app.symbols]

    if role == "api":
        assert live is not None, "an api process needs Redis"
        api_mirror = Mirror(state, live, redis_health, keys, mode=Mode(app.mode))
        minutes = MinuteReader(
            reader,
            postgres_health,
            unwritten_from=lambda key: api_mirror.oldest_unwritten_ms(),
            connections=connections,
        )
        if probes:  # an api process judges the stores by reads
            checks.append((postgres_health, reader.ping, None))
        return Node(
            config,
            role=role,
            instance=instance,
            state=state,
            metrics=metrics,
            minutes=minutes,
            redis_health=redis_health,
            postgres_health=postgres_health,
            mirror=api_mirror,
            live=live,
            probes=checks,
            closers=closers,
            clock=clock,
        )

    writer = price_store if price_store is not None else redis_store()
    aggregates = (
        aggregate_store if aggregate_store is not None else PostgresAggregateStore(config.postgres)
    )
    closers += [writer.close, aggregates.close]
    ingest = Ingest(
        config,
        state,
        metrics,
        price_store=writer,
        aggregate_store=aggregates,
        journal=journal if journal is not None else claim_journal(app.data_dir),
        redis_health=redis_health,
        postgres_health=postgres_health,
        instance=instance,
        clock=clock,
    )
    if probes:
        redis_probe = redis_store()
        postgres_probe = PostgresAggregateStore(config.postgres, migrate=False)
        closers += [redis_probe.close, postgres_probe.close]
        checks = [
            (redis_health, redis_probe.probe_write, None),
            (postgres_health, postgres_probe.probe_write, ingest.aggregator.retry_soon),
        ]
    # Role all serves the sources another instance holds as `api`: their keys are mirrored.
    mirror: Mirror | None = None
    if role == "all" and live is not None:
        mirror = Mirror(state, live, StoreHealth("redis-mirror"), keys, mode=Mode(app.mode))
        ingest.on_give_up = mirror.request_resync
    node = Node(
        config,
        role=role,
        instance=instance,
        state=state,
        metrics=metrics,
        minutes=MinuteReader(
            reader, postgres_health, unwritten_from=ingest.unwritten_from, connections=connections
        ),
        redis_health=redis_health,
        postgres_health=postgres_health,
        ingest=ingest,
        mirror=mirror,
        live=live,
        probes=checks,
        closers=closers,
        clock=clock,
    )
    ingest.ownership = Ownership(
        store=live,
        instance=instance,
        role=role,
        ttl_ms=app.lease_ttl_ms,
        locks=FileLocks(app.data_dir),
        take_over=ingest.take_over,
        give_up=ingest.give_up,
        set_epoch=ingest.refence,
    )
    ingest.pipeline.owner = ingest.ownership.hold
    if live is not None:
        ingest.coordinator = Coordinator(
            live,
            instance,
            status=node.status_body,
            mode=lambda: ingest.pipeline.mode,
            switch=ingest.switch_mode,
        )
    return node


def hypercorn_settings(config: Config) -> dict[str, Any]:
    """Hypercorn settings: bounded request sizes and timeouts so slow clients cannot pile up.
    The `marketflow` command and Hypercorn's own (`marketflow.hypercorn_config`) use these."""
    return {
        "bind": [f"{config.http.host}:{config.http.port}"],
        "accesslog": None,
        "errorlog": None,
        "graceful_timeout": max(1.0, config.app.shutdown_timeout_s / 2),
        "keep_alive_timeout": 30,
        "read_timeout": 30,
        "h11_max_incomplete_size": 16 * 1024,  # request line + headers
        "websocket_max_message_size": 64 * 1024,
        # Hypercorn (trio) closes a WebSocket's socket only once the connection's ping task
        # wakes up and sees it closed: a client that vanishes without a close frame holds its
        # socket and task for up to this interval. 5 s keeps that bounded (tests/faults).
        "websocket_ping_interval": 5,
    }


def hypercorn_config(config: Config) -> HypercornConfig:
    return HypercornConfig.from_mapping(hypercorn_settings(config))


async def serve(
    config: Config,
    *,
    node: Node | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run marketflow until SIGINT/SIGTERM (or `node.stop()`); return after a clean shutdown.

    The root nursery owns the signal watcher, the node and Hypercorn. Hypercorn's shutdown
    trigger is the node's `stopping` event, so one signal stops accepting connections and
    drains the pipeline together.
    """
    from marketflow.api.app import create_app

    node = node or build_node(config)
    asgi = create_app(config, node=node)
    guard_hypercorn_connections()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, node)
        await nursery.start(node.run)
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(
                asgi,
                hypercorn_config(config),
                shutdown_trigger=node.stopping.wait,
                task_status=task_status,
            )
        )
        log.info("http listening", extra={"ctx": {"binds": ",".join(binds)}})
        task_status.started(binds)
        await node.finished.wait()
        nursery.cancel_scope.cancel()


async def _watch_signals(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if node.stopping.is_set():
                log.warning("second signal: exiting at once")
                os._exit(1)
            log.info(
                "signal received; shutting down",
                extra={"ctx": {"signal": signal.Signals(signum).name}},
            )
            node.stop()
