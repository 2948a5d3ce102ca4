"""`WS /ws/prices` (contract: WebSocket): the Quart route around `ws_protocol.serve`.

The protocol (query string, messages, frames, closing codes) lives in `marketflow.ws_protocol`;
here the handshake is accepted and Quart's websocket is turned into `receive`/`send`.
"""

from __future__ import annotations

import logging

import trio
from quart import websocket
from quart.wrappers.base import ClientDisconnectedError
from quart_trio import QuartTrio

from marketflow.api.app import service_of
from marketflow.config import Config
from marketflow.flusher import describe
from marketflow.logs import rate_limited
from marketflow.queries import Catalog
from marketflow.ws_protocol import ClientGone, serve

log = logging.getLogger("marketflow.ws")

CLOSE_TIMEOUT_S = 2.0


def register(app: QuartTrio, config: Config) -> None:
    """Add `WS /ws/prices`; the service's `PriceHub` fans prices and candles out."""
    catalog = Catalog(config)

    @app.websocket("/ws/prices")
    async def prices_stream() -> None:
        service = service_of(app)  # not ready: a 503 answer instead of the handshake
        try:
            await websocket.accept()
        except Exception as exc:  # a malformed upgrade: Hypercorn 0.18 raises from its h11 state
            if rate_limited("ws-handshake", 10.0):
                log.warning("websocket handshake failed", extra={"ctx": {"error": describe(exc)}})
            return
        closing = await serve(
            service.hub, service, catalog, websocket.args.getlist, _receive, _send
        )
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
