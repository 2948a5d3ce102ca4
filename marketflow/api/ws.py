"""`WS /ws/prices` (contract: WebSocket): the Quart-Trio route around `ws_protocol.serve`.

The protocol (query string, messages, frames, closing codes) lives in `marketflow.ws_protocol`;
here the handshake is accepted (or refused with a JSON 503 while the node is not ready) and
Quart's websocket is turned into `receive`/`send`.
"""

from __future__ import annotations

import logging

import orjson
import trio
from quart import Response, websocket
from quart.wrappers.base import ClientDisconnectedError
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from marketflow.api.routes import NodeRef
from marketflow.config import Config
from marketflow.health import describe
from marketflow.logs import rate_limited
from marketflow.queries import Catalog
from marketflow.ws_protocol import ClientGone, serve

log = logging.getLogger("marketflow.ws")

CLOSE_TIMEOUT_S = 2.0


class NotReady(Exception):
    """The node is starting or stopping: the handshake is refused with a JSON 503."""


def register(app: QuartTrio, config: Config, ref: NodeRef) -> None:
    """Add `WS /ws/prices`; the node's `PriceHub` fans prices and candles out to the clients."""
    catalog = Catalog(config)

    @app.errorhandler(NotReady)
    async def not_ready(exc: NotReady) -> Response:
        return Response(b'{"error":"marketflow is starting"}', 503, content_type="application/json")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        """A WebSocket upgrade to a path that has no WebSocket route: its 404 (or 405) in JSON."""
        status = exc.code or 400
        body = orjson.dumps({"error": "not found" if status == 404 else (exc.name or "refused")})
        return Response(body, status, content_type="application/json")

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"ctx": {"path": websocket.path[:200]}})
        return Response(b'{"error":"internal error"}', 500, content_type="application/json")

    @app.websocket("/ws/prices")
    async def prices_stream() -> None:
        node = ref.node
        if node is None or not node.is_ready():
            raise NotReady  # a 503 answer instead of the handshake
        try:
            await websocket.accept()
        except Exception as exc:  # a malformed upgrade: Hypercorn 0.18 raises from its h11 state
            if rate_limited("ws-handshake", 10.0):
                log.warning("websocket handshake failed", extra={"ctx": {"error": describe(exc)}})
            return
        closing = await serve(node.hub, catalog, websocket.args.getlist, _receive, _send)
        if closing is not None:
            await _close(*closing)


async def _receive() -> str | bytes:
    try:
        return await websocket.receive()
    except ClientDisconnectedError:
        raise ClientGone from None


async def _send(text: str) -> None:
    try:
        await websocket.send(text)
    except ClientDisconnectedError:
        raise ClientGone from None


async def _close(code: int, reason: str) -> None:
    """Close with `code`, bounded in time: a client that stopped reading cannot hold us."""
    reason = reason.encode()[:120].decode(errors="ignore")  # a close reason is <= 123 bytes
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await websocket.close(code, reason)
        except Exception as exc:  # already closed or disconnected: nothing left to tell
            log.debug("websocket close failed", extra={"ctx": {"error": repr(exc)}})
