"""The protocol of `WS /ws/prices` (contract: WebSocket, protocol v1): the query string, client
messages, subscriptions and the answers to them, and one connection's session (`serve`).

Independent of the web framework: the route accepts the handshake and hands `serve` a
`receive` and a `send` (raising `ClientGone` once the client is gone). Choices (documented in
docs/api.md):
- `symbols`, `exchanges` and `candles` are comma lists and may be repeated; absent symbols mean
  every configured one, absent exchanges the current mode's sources (following mode switches).
- A bad query string is answered with one `error` frame, then close 1008 with the same reason;
  candles that need PostgreSQL while it cannot answer: an `error` frame, then close 1013.
- Every accepted `subscribe`/`unsubscribe` is answered by an `ack` (echoing the message's `id`)
  and a `snapshot` of the whole resulting subscription; `ping` by a `pong`; a bad message by an
  `error` frame (with the `id`, when it had a valid one), and the connection stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import attrs
import orjson
import trio

from marketflow.broadcast import NO_ID, SNAPSHOT, Client, PriceHub, error_frame, with_seq
from marketflow.candles import INTERVALS
from marketflow.queries import Catalog, QueryError

CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013
MAX_LIST_ITEMS: Final = 256
MAX_ID_CHARS: Final = 128
OPS: Final = ("subscribe", "unsubscribe", "ping")

Receive = Callable[[], Awaitable[str | bytes]]
Send = Callable[[str], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected (raised by the route's `receive` and `send`)."""


class MessageError(QueryError):
    """A refused client message; `id` is its id (NO_ID: none, or not a valid one)."""

    def __init__(self, message: str, id: Any = NO_ID) -> None:
        super().__init__(400, message)
        self.id = id


@attrs.frozen
class Subscription:
    """`symbols` None: every configured symbol; `exchanges` None: the current mode's sources;
    `candles`: interval names."""

    symbols: frozenset[str] | None = None
    exchanges: frozenset[str] | None = None
    candles: frozenset[str] = frozenset()


@attrs.frozen
class Message:
    """A valid client message; a list is None when the message did not carry it."""

    op: str
    id: Any = NO_ID
    symbols: frozenset[str] | None = None
    exchanges: frozenset[str] | None = None
    candles: frozenset[str] | None = None


# --- names -------------------------------------------------------------------------------------


def _interval(name: str) -> str:
    if name not in INTERVALS:
        raise QueryError(
            400, f"unknown candle interval {name[:20]!r}: expected one of {', '.join(INTERVALS)}"
        )
    return name


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


def _fields(catalog: Catalog) -> tuple[tuple[str, Callable[[str], str]], ...]:
    return (("symbols", catalog.symbol), ("exchanges", catalog.source), ("candles", _interval))


def parse_query(catalog: Catalog, values: Callable[[str], Sequence[str]]) -> Subscription:
    """`?symbols=A,B&exchanges=x&candles=1m` (each parameter's every value from `values`)."""
    lists: dict[str, frozenset[str] | None] = {}
    for field, check in _fields(catalog):
        raw = values(field)
        if not raw:
            lists[field] = None
            continue
        items = [item.strip() for value in raw for item in value.split(",")]
        lists[field] = _names(items, check, field)
    return Subscription(lists["symbols"], lists["exchanges"], lists["candles"] or frozenset())


def parse_message(catalog: Catalog, data: str | bytes) -> Message:
    """One client message, validated as a whole; MessageError (with its id) if refused."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MessageError("message is not valid JSON") from None
    if not isinstance(message, dict):
        raise MessageError('message must be a JSON object like {"op":"subscribe",...}')
    id_ = message.get("id", NO_ID)
    if id_ is not NO_ID and not (
        (isinstance(id_, str) and len(id_) <= MAX_ID_CHARS)
        or (isinstance(id_, int) and not isinstance(id_, bool))
    ):
        raise MessageError(
            f"id: expected a string of at most {MAX_ID_CHARS} characters or an integer"
        )
    op = message.get("op")
    if op not in OPS:
        raise MessageError('op must be "subscribe", "unsubscribe" or "ping"', id_)
    if op == "ping":
        return Message("ping", id_)
    if not any(field in message for field, _ in _fields(catalog)):
        raise MessageError(f"{op} needs symbols, exchanges and/or candles", id_)
    lists: dict[str, frozenset[str] | None] = {}
    for field, check in _fields(catalog):
        if field not in message:
            lists[field] = None
            continue
        value = message[field]
        if not isinstance(value, list):
            raise MessageError(f"{field}: expected a list of strings", id_)
        try:
            lists[field] = _names(value, check, field)
        except QueryError as exc:
            raise MessageError(exc.message, id_) from None
    return Message(op, id_, lists["symbols"], lists["exchanges"], lists["candles"])


def updated(
    sub: Subscription, message: Message, all_symbols: frozenset[str], current: Sequence[str]
) -> Subscription:
    """The subscription after a subscribe/unsubscribe: sets grow or shrink; naming exchanges
    while following the mode makes the set explicit (unless subscribing only to sources the
    current mode already has)."""
    symbols, exchanges, candles = sub.symbols, sub.exchanges, sub.candles
    if message.op == "subscribe":
        if message.symbols is not None and symbols is not None:
            symbols = symbols | message.symbols
        if message.exchanges is not None:
            base = frozenset(current) if exchanges is None else exchanges
            if exchanges is not None or not message.exchanges <= base:
                exchanges = base | message.exchanges
        if message.candles is not None:
            candles = candles | message.candles
    else:
        if message.symbols is not None:
            symbols = (all_symbols if symbols is None else symbols) - message.symbols
        if message.exchanges is not None:
            base = frozenset(current) if exchanges is None else exchanges
            exchanges = base - message.exchanges
        if message.candles is not None:
            candles = candles - message.candles
    return Subscription(symbols, exchanges, candles)


# --- answers -----------------------------------------------------------------------------------


def _with_id(body: dict[str, Any], id_: Any) -> dict[str, Any]:
    return body if id_ is NO_ID else {"type": body.pop("type"), "id": id_, **body}


def pong_frame(id_: Any) -> str:
    return orjson.dumps(_with_id({"type": "pong"}, id_)).decode()


def ack_frame(id_: Any, client: Client, hub: PriceHub) -> str:
    """The subscription as it now is, in configured order; exchanges that follow the mode are
    listed as the current mode's sources."""
    symbols = [s for s in hub.symbols if client.symbols is None or s in client.symbols]
    if client.exchanges is None:
        exchanges = list(hub.current_sources())
    else:
        exchanges = [s for s in hub.all_sources if s in client.exchanges]
    candles = [name for name in INTERVALS if name in client.candles]
    subscription = {"symbols": symbols, "exchanges": exchanges, "candles": candles}
    return orjson.dumps(_with_id({"type": "ack", "subscription": subscription}, id_)).decode()


# --- one connection ----------------------------------------------------------------------------


async def serve(
    hub: PriceHub,
    catalog: Catalog,
    query: Callable[[str], Sequence[str]],
    receive: Receive,
    send: Send,
) -> tuple[int, str] | None:
    """One client after the handshake, until it goes away or the hub closes it: the (code,
    reason) to close with, or None when the client left.

    Owns the client's hub registration and its candle pairs in the book, both released on any
    exit (cancel included); runs the client's sender (`PriceHub.pump`) beside its reader.
    """
    try:
        sub = parse_query(catalog, query)
    except QueryError as exc:
        return await _refuse(send, CLOSE_POLICY, exc.message)
    if not hub.running:
        return await _refuse(send, CLOSE_INTERNAL, "the live stream is not running")
    pairs = hub.candle_pairs(sub.symbols, sub.candles)
    if pairs:
        try:
            await hub.book.acquire(pairs)
        except QueryError as exc:
            return await _refuse(send, CLOSE_TRY_AGAIN, exc.message)
    client = hub.add(sub.symbols, sub.exchanges, sub.candles)
    client.candle_pairs = pairs
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, hub, client, send, nursery.cancel_scope)
            nursery.start_soon(_watch_close, client, nursery.cancel_scope)
            await _read_messages(hub, catalog, client, receive)
            nursery.cancel_scope.cancel()  # the client went away
    finally:
        hub.remove(client)
        hub.book.release(client.candle_pairs)
        client.candle_pairs = set()
    if client.close_code is not None:
        return client.close_code, client.close_reason
    return None


async def _refuse(send: Send, code: int, reason: str) -> tuple[int, str] | None:
    """The first and only frame: an error; then close with `code` (None: the client left)."""
    try:
        await send(with_seq(1, error_frame(reason)))
    except ClientGone:
        return None
    return code, reason


async def _pump(hub: PriceHub, client: Client, send: Send, scope: trio.CancelScope) -> None:
    with contextlib.suppress(ClientGone):
        await hub.pump(client, send)
    scope.cancel()


async def _watch_close(client: Client, scope: trio.CancelScope) -> None:
    await client.closed.wait()
    scope.cancel()


async def _read_messages(hub: PriceHub, catalog: Catalog, client: Client, receive: Receive) -> None:
    """Answer the client's messages in order; return when the client goes away."""
    while True:
        try:
            data = await receive()
        except ClientGone:
            return
        try:
            message = parse_message(catalog, data)
            if message.op == "ping":
                await client.put_control(pong_frame(message.id), trio.current_time())
                continue
            await _apply(hub, catalog, client, message)
        except MessageError as exc:
            await client.put_control(error_frame(exc.message, exc.id), trio.current_time())
            continue
        await client.put_control(ack_frame(message.id, client, hub), trio.current_time())
        await client.put_control(SNAPSHOT, trio.current_time())


async def _apply(hub: PriceHub, catalog: Catalog, client: Client, message: Message) -> None:
    """Change `client`'s subscription, following any new candle pairs first (nothing changes
    if that fails)."""
    current = Subscription(client.symbols, client.exchanges, client.candles)
    new = updated(current, message, catalog.symbols, hub.current_sources())
    pairs = hub.candle_pairs(new.symbols, new.candles)
    added = pairs - client.candle_pairs
    if added:
        try:
            await hub.book.acquire(added)
        except QueryError as exc:
            raise MessageError(exc.message, message.id) from None
    removed = client.candle_pairs - pairs
    client.symbols, client.exchanges, client.candles = new.symbols, new.exchanges, new.candles
    client.candle_pairs = pairs
    hub.book.release(removed)
