"""`marketflow` run: the root nursery holding the service and the Hypercorn server."""

from __future__ import annotations

import logging
import os
import signal

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from marketflow.api.app import create_app
from marketflow.api.fast import FastRoutes
from marketflow.config import Config
from marketflow.hypercorn_guard import guard_hypercorn_connections
from marketflow.service import Service

log = logging.getLogger("marketflow")


def hypercorn_config(config: Config) -> HypercornConfig:
    """Hypercorn settings: bounded request sizes and timeouts so slow clients cannot pile up."""
    hc = HypercornConfig()
    hc.bind = [f"{config.http.host}:{config.http.port}"]
    hc.accesslog = None
    hc.errorlog = None
    hc.graceful_timeout = max(1.0, config.app.shutdown_timeout_s / 2)
    hc.keep_alive_timeout = 30
    hc.read_timeout = 30
    hc.h11_max_incomplete_size = 16 * 1024  # request line + headers
    hc.websocket_max_message_size = 64 * 1024
    # Hypercorn (trio) closes a WebSocket's socket only once the connection's ping task wakes up
    # and sees it closed: a client that vanishes without a close frame holds its socket and task
    # for up to this interval. 5 s keeps that bounded (tests/faults/test_http.py).
    hc.websocket_ping_interval = 5
    return hc


async def serve(
    config: Config,
    *,
    service: Service | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run marketflow until SIGINT/SIGTERM (or `service.stop()`); return after a clean shutdown.

    The root nursery owns the signal watcher, the service (pipeline, flusher, aggregator) and
    Hypercorn. Hypercorn's shutdown trigger is the service's `stopping` event, so one signal
    stops accepting connections and drains the pipeline together.
    """
    service = service or Service(config)
    app = create_app(config, service=service)
    guard_hypercorn_connections()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, service)
        await nursery.start(service.run)
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(
                FastRoutes(app, config),
                hypercorn_config(config),
                shutdown_trigger=service.stopping.wait,
                task_status=task_status,
            )
        )
        log.info("http listening", extra={"ctx": {"binds": ",".join(binds)}})
        task_status.started(binds)
        await service.finished.wait()
        nursery.cancel_scope.cancel()


async def _watch_signals(service: Service) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if service.stopping.is_set():
                log.warning("second signal: exiting at once")
                os._exit(1)
            log.info(
                "signal received; shutting down",
                extra={"ctx": {"signal": signal.Signals(signum).name}},
            )
            service.stop()
