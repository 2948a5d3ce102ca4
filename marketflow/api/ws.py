"""`WS /ws/prices` (contract: WebSocket): a snapshot, then coalesced `prices` frames from the
`PriceHub`.

Protocol choices (documented in docs/api.md):
- A bad query string (`symbols`, `exchanges`) is answered after the handshake: one
  `{"type":"error","error":...}` frame, then close 1008 with the same reason, so browser clients
  can read why (a refused handshake tells them nothing).
- `symbols` and `exchanges` are comma lists and may be repeated; absent means every configured
  symbol and the current mode's sources (following mode switches).
- Every accepted `subscribe`/`unsubscribe` is answered by a `snapshot` of the whole resulting
  subscription; a bad message by an `error` frame, and the connection stays.
- Slow client: close 1008 `too slow...`; shutdown: close 1001.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence

import orjson
import trio
from quart import Response, websocket
from quart.wrappers.base import ClientDisconnectedError
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from marketflow.api.routes import NodeRef
from marketflow.broadcast import (
    CLOSE_POLICY,
    SNAPSHOT,
    Client,
    PriceHub,
    error_frame,
)
from marketflow.config import Config
from marketflow.health import describe
from marketflow.logs import rate_limited
from marketflow.ports import NodePort
from marketflow.queries import Catalog, QueryError

log = logging.getLogger("marketflow.ws")

CLOSE_INTERNAL = 1011
CLOSE_TIMEOUT_S = 2.0
MAX_LIST_ITEMS = 256


# --- subscriptions -----------------------------------------------------------------------------


def _names(values: Iterable[object], check: Callable[[str], str], field: str) -> frozenset[str]:
    names: set[str] = set()
    for value in values:
        if not isinstance(value, str):
            raise QueryError(400, f"{field}: expected a list of strings")
        if not value:
            raise QueryError(400, f"{field}: empty name in the list")
        names.add(check(value))
        if len(names) > MAX_LIST_ITEMS:
            raise QueryError(400, f"{field}: too many names")
    return frozenset(names)


def parse_query(
    catalog: Catalog, args: MultiDict[str, str]
) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    """`?symbols=A,B&exchanges=x` -> (symbols, exchanges); None where the parameter is absent."""
    out: list[frozenset[str] | None] = []
    for field, check in (("symbols", catalog.symbol), ("exchanges", catalog.source)):
        raw = args.getlist(field)
        if not raw:
            out.append(None)
            continue
        items = [item.strip() for value in raw for item in value.split(",")]
        out.append(_names(items, check, field))
    return out[0], out[1]


def apply_message(
    catalog: Catalog, client: Client, data: str | bytes, current: Sequence[str]
) -> None:
    """Apply one client message to `client`'s subscription, or raise QueryError (400)."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise QueryError(400, "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise QueryError(400, 'message must be a JSON object like {"op":"subscribe",...}')
    op = message.get("op")
    if op not in ("subscribe", "unsubscribe"):
        raise QueryError(400, 'op must be "subscribe" or "unsubscribe"')
    if "symbols" not in message and "exchanges" not in message:
        raise QueryError(400, f"{op} needs symbols and/or exchanges")
    lists: dict[str, frozenset[str] | None] = {}
    for field, check in (("symbols", catalog.symbol), ("exchanges", catalog.source)):
        if field not in message:
            lists[field] = None
            continue
        value = message[field]
        if not isinstance(value, list):
            raise QueryError(400, f"{field}: expected a list of strings")
        lists[field] = _names(value, check, field)
    symbols, exchanges = lists["symbols"], lists["exchanges"]
    # Validated as a whole before any change, so a bad message changes nothing.
    if op == "subscribe":
        if symbols is not None and client.symbols is not None:
            client.symbols = client.symbols | symbols
        if exchanges is not None:
            base = frozenset(current) if client.exchanges is None else client.exchanges
            if client.exchanges is not None or not exchanges <= base:
                client.exchanges = base | exchanges
    else:
        if symbols is not None:
            base = catalog.symbols if client.symbols is None else client.symbols
            client.symbols = base - symbols
        if exchanges is not None:
            base = frozenset(current) if client.exchanges is None else client.exchanges
            client.exchanges = base - exchanges


# --- the route ---------------------------------------------------------------------------------


class NotReady(Exception):
    """The node is starting or stopping: the handshake is refused with a JSON 503."""


def register(app: QuartTrio, config: Config, ref: NodeRef) -> None:
    """Add `WS /ws/prices`; the node's `PriceHub` fans prices out to the clients."""
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
        try:
            symbols, exchanges = parse_query(catalog, websocket.args)
        except QueryError as exc:
            await websocket.send(error_frame(exc.message))
            await _close(CLOSE_POLICY, exc.message)
            return
        hub = node.hub
        if not hub.running:
            await websocket.send(error_frame("the live stream is not running"))
            await _close(CLOSE_INTERNAL, "the live stream is not running")
            return
        client = hub.add(symbols, exchanges)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, hub, client, nursery.cancel_scope)
                nursery.start_soon(_watch_close, client, nursery.cancel_scope)
                await _read_messages(catalog, client, node)
                nursery.cancel_scope.cancel()  # the client went away
        finally:
            hub.remove(client)
        if client.close_code is not None:
            await _close(client.close_code, client.close_reason)


async def _pump(hub: PriceHub, client: Client, scope: trio.CancelScope) -> None:
    with contextlib.suppress(ClientDisconnectedError):
        await hub.pump(client, websocket.send)
    scope.cancel()


async def _watch_close(client: Client, scope: trio.CancelScope) -> None:
    await client.closed.wait()
    scope.cancel()


async def _read_messages(catalog: Catalog, client: Client, node: NodePort) -> None:
    """Apply the client's messages, answering each with a snapshot or an error frame; return
    when the client goes away."""
    while True:
        try:
            data = await websocket.receive()
        except ClientDisconnectedError:
            return
        try:
            apply_message(catalog, client, data, node.view.sources())
        except QueryError as exc:
            await client.put_control(error_frame(exc.message), trio.current_time())
        else:
            await client.put_control(SNAPSHOT, trio.current_time())


async def _close(code: int, reason: str) -> None:
    """Close with `code`, bounded in time: a client that stopped reading cannot hold us."""
    reason = reason.encode()[:120].decode(errors="ignore")  # a close reason is <= 123 bytes
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await websocket.close(code, reason)
        except Exception as exc:  # already closed or disconnected: nothing left to tell
            log.debug("websocket close failed", extra={"ctx": {"error": repr(exc)}})
