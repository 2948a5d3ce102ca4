"""The ASGI application: the HTTP route table in front, Quart-Trio behind it for the WebSocket
stream and the ASGI lifespan (contract: HTTP API, WebSocket, health)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from quart_trio import QuartTrio

from marketflow.api import ws
from marketflow.api.http import HttpApp, Router
from marketflow.api.routes import NodeRef, build_routes
from marketflow.config import Config
from marketflow.node import Node

log = logging.getLogger("marketflow.api")


def create_app(
    config: Config,
    *,
    node: Node | None = None,
    node_factory: Callable[[], Node] | None = None,
) -> HttpApp:
    """Build the app for `node`, which the caller runs (the `marketflow` command); or, with
    `node_factory`, one whose ASGI lifespan builds, runs and stops the node (Hypercorn's own
    command)."""
    ref = NodeRef(node)
    quart = QuartTrio("marketflow")
    quart.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = config.app.shutdown_timeout_s + 1

    if node is None and node_factory is not None:
        factory = node_factory

        @quart.before_serving
        async def start_node() -> None:
            owned = factory()
            ref.node = owned
            await quart.nursery.start(owned.run)

        @quart.after_serving
        async def stop_node() -> None:
            owned = ref.node
            assert isinstance(owned, Node)
            owned.stop()
            await owned.finished.wait()

    ws.register(quart, config, ref)
    return HttpApp(Router(build_routes(config, ref)), quart)
