"""One task per exchange connector: open the venue's WebSocket, subscribe, read, send batches;
reconnect forever (contract: exchange connectors).

The loop is the TCP reader's, on trio-websocket: the same backoff (reset at the first valid
trade), the same stale rule (no frame and no answered ping for `stale_after_s` -> reconnect),
the same counters and log lines. What differs per venue lives in its `Venue`: the URL, the
subscribe frames, the keep-alive and the parser.
"""

from __future__ import annotations

import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from marketflow.backoff import Backoff
from marketflow.config import ExchangeConfig
from marketflow.feeds.reader import (
    CONNECT_TIMEOUT_S,
    RECEIVE_BYTES,
    SendBatch,
    conn_ids,
    count_rejects,
)
from marketflow.feeds.trades import TradeParser
from marketflow.feeds.venues.base import KeepAlive, Venue
from marketflow.health import describe
from marketflow.logs import bind, rate_limited
from marketflow.models import SourceStats, SourceStatus

log = logging.getLogger("marketflow.feed")
CLOSE_TIMEOUT_S = 2.0  # a closing handshake the server does not answer is abandoned after this
MAX_FRAME_CHARS = 1 << 20  # a larger frame closes the connection (1009) and counts as too_long
QUEUE_FRAMES = 64  # frames trio-websocket may read ahead while a batch is parsed
DRAIN_FRAMES = 256  # frames one receive turn may take: one batch, one channel send
MIN_PING_S = 1.0  # venues count pings against their message rate limits

_OVERSIZED = "Exceeded maximum message size"  # trio-websocket's own 1009 close reason


class Address(NamedTuple):
    host: str
    port: int
    resource: str  # path and query, as the HTTP request names it
    host_header: str


def parse_address(url: str) -> Address:
    """`wss://ws.okx.com:8443/ws/v5/public` -> where to connect and what to ask for."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    name = f"[{host}]" if ":" in host else host
    header = name if port == (443 if secure else 80) else f"{name}:{port}"
    return Address(host, port, resource, header)


def venue_pairs(exchange: ExchangeConfig, symbols: Collection[str]) -> dict[str, str]:
    """Our symbol -> the venue's pair, for the symbols both the app and the map know."""
    return {s: exchange.symbol_map[s] for s in symbols if s in exchange.symbol_map}


async def read_venue(
    exchange: ExchangeConfig,
    venue: Venue,
    send_batch: SendBatch,
    stats: SourceStats,
    *,
    symbols: Collection[str],
    max_skew_ms: int,
    max_future_ms: int,
    stale_after_s: float,
    reconnect_max_delay_s: float,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read `exchange` (a `venue` connector) until cancelled, handing each receive turn's
    ticks to `send_batch` as one batch.

    Owns one WebSocket connection at a time and one `TradeParser` for the source's whole life
    (its trade-id memory recognises what a venue replays after a reconnect). Bad frames are
    counted in `stats` and skipped; a refused pair is logged and the connection kept; a close,
    an error or silence longer than `stale_after_s` leads to a reconnect after a capped,
    jittered backoff that resets at the first valid trade. On cancel the connection is closed
    and the status becomes `disconnected`.
    """
    pairs = venue_pairs(exchange, symbols)
    url = venue.url(exchange.url or venue.default_url, list(pairs.values()))
    parser = TradeParser(
        venue.parse,
        {pair: symbol for symbol, pair in pairs.items()},
        max_skew_ms=max_skew_ms,
        max_future_ms=max_future_ms,
        clock=clock,
    )
    tls = ssl.create_default_context() if url.startswith("wss:") else None
    backoff = Backoff(1.0, max(1.0, reconnect_max_delay_s))
    session = _Session(url, tls, venue, pairs, parser, exchange.name, send_batch, stats, backoff)
    task_status.started()
    with bind(source=exchange.name):
        try:
            while True:
                stats.status = SourceStatus.CONNECTING
                with bind(conn_id=next(conn_ids)):
                    reason, opened = await session.run(stale_after_s)
                    delay = backoff.next()
                    if opened:
                        stats.reconnects += 1
                        log.warning(
                            "feed disconnected",
                            extra={"ctx": {"reason": reason, "retry_in_s": round(delay, 1)}},
                        )
                    elif rate_limited(f"connect:{exchange.name}", 10.0):
                        log.warning(
                            "feed connect failed",
                            extra={
                                "ctx": {
                                    "error": reason,
                                    "retry_in_s": round(delay, 1),
                                    "attempt": backoff.attempt,
                                    "addr": url,
                                }
                            },
                        )
                stats.status = SourceStatus.CONNECTING
                await trio.sleep(delay)
        finally:
            stats.status = SourceStatus.DISCONNECTED


class _Session:
    """What one connection needs; `run()` opens one and returns (why it ended, whether it
    opened)."""

    def __init__(
        self,
        url: str,
        tls: ssl.SSLContext | None,
        venue: Venue,
        pairs: Mapping[str, str],
        parser: TradeParser,
        name: str,
        send_batch: SendBatch,
        stats: SourceStats,
        backoff: Backoff,
    ) -> None:
        self.url = url
        self.address = parse_address(url)
        self.tls = tls
        self.venue = venue
        self.subscribe_frames = venue.subscribe(list(pairs.values()))
        self.symbol_of = {pair: symbol for symbol, pair in pairs.items()}
        self.parser = parser
        self.name = name
        self.send_batch = send_batch
        self.stats = stats
        self.backoff = backoff

    async def run(self, stale_after_s: float) -> tuple[str, bool]:
        """One connection: (why it ended, whether the WebSocket opened).

        This task owns the TCP (or TLS) stream and closes it whatever happens; trio-websocket
        speaks the protocol on it, its reader task in this task's nursery. (`open_websocket_url`
        leaves the socket of a connection the server closed to the garbage collector.)
        """
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await self._connect()
        except trio.TooSlowError:
            return f"connect timed out after {CONNECT_TIMEOUT_S:g}s", False
        except (OSError, trio.BrokenResourceError) as exc:
            return _connect_error(exc), False
        opened = False
        reason = f"handshake timed out after {CONNECT_TIMEOUT_S:g}s"
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(CONNECT_TIMEOUT_S):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        self.address.host_header,
                        self.address.resource,
                        message_queue_size=QUEUE_FRAMES,
                        max_message_size=MAX_FRAME_CHARS,
                        receive_buffer_size=RECEIVE_BYTES,
                    )
                    opened = True
                if opened:
                    self.stats.status = SourceStatus.CONNECTED
                    log.info(
                        "feed connected",
                        extra={"ctx": {"addr": self.url, "keepalive": self.venue.keepalive.rule}},
                    )
                    reason = await self._serve(ws, stale_after_s)
                    with trio.move_on_after(CLOSE_TIMEOUT_S):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
        except* ConnectionRejected as group:
            rejected = group.exceptions[0]
            status = rejected.status_code if isinstance(rejected, ConnectionRejected) else "?"
            reason = f"handshake refused: HTTP {status}"
        finally:
            await trio.aclose_forcefully(stream)
        return reason, opened

    async def _connect(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        address = self.address
        tcp = await trio.open_tcp_stream(address.host, address.port)
        if self.tls is None:
            return tcp
        tls = trio.SSLStream(tcp, self.tls, server_hostname=address.host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls

    async def _serve(self, ws: WebSocketConnection, stale_after_s: float) -> str:
        """Subscribe, keep alive and receive until the connection ends or goes stale."""
        with trio.CancelScope(deadline=trio.current_time() + stale_after_s) as alive:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_subscribe, ws, self.subscribe_frames, self.venue)
                keepalive = self.venue.keepalive
                if keepalive.every_s is not None:
                    every_s = max(MIN_PING_S, min(keepalive.every_s, stale_after_s / 2))
                    nursery.start_soon(_keep_alive, ws, keepalive, every_s, alive, stale_after_s)
                reason = await self._receive(ws, alive, stale_after_s)
                nursery.cancel_scope.cancel()
                return reason
        return f"stale: no frame for {stale_after_s:g}s"

    async def _receive(
        self, ws: WebSocketConnection, alive: trio.CancelScope, stale_after_s: float
    ) -> str:
        parser, stats = self.parser, self.stats
        seen = dict(parser.rejected)
        while True:
            try:
                frames: list[str | bytes] = [await ws.get_message()]
            except ConnectionClosed as exc:
                reason = self._closed(exc)
                if parser.last_rejected is not None:
                    count_rejects(parser, stats, seen)
                return reason
            _take_ready(ws, frames)
            alive.deadline = trio.current_time() + stale_after_s
            ticks = parser.feed(frames)
            if ticks:
                stats.messages += len(ticks)
                stats.last_message_at = trio.current_time()
                if self.backoff.attempt:
                    self.backoff.reset()
                # A full pipeline may hold this send for a while: that is not the venue's silence.
                alive.deadline = math.inf
                await self.send_batch(self.name, ticks)
                alive.deadline = trio.current_time() + stale_after_s
            if parser.last_rejected is not None:
                count_rejects(parser, stats, seen)
            if parser.refusals:
                self._log_refusals()

    def _closed(self, exc: ConnectionClosed) -> str:
        close = exc.reason
        if close is None:
            return "closed"
        if close.code == 1009 and (close.reason or "").startswith(_OVERSIZED):
            self.parser.reject_oversized(MAX_FRAME_CHARS)
            return f"frame over {MAX_FRAME_CHARS} characters"
        text = f"closed: {close.code} {close.name}"
        return f"{text} {close.reason}"[:200] if close.reason else text

    def _log_refusals(self) -> None:
        for note in self.parser.refusals:
            log.warning(
                "feed subscription refused",
                extra={
                    "ctx": {
                        "pair": note.pair or None,
                        "symbol": self.symbol_of.get(note.pair),
                        "detail": note.detail,
                    }
                },
            )
        self.parser.refusals.clear()


def _connect_error(exc: BaseException) -> str:
    """The useful part of a failed connect: trio wraps the attempts' errors (a group) and TLS
    failures (a BrokenResourceError caused by the SSL error)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        return describe(cause.exceptions[0])
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        return describe(cause)
    return describe(exc)


def _take_ready(ws: WebSocketConnection, frames: list[str | bytes]) -> None:
    """Add the frames trio-websocket has already read. Its public API only has the awaiting
    `get_message` (a checkpoint per frame); taking what is queued makes a receive turn, not a
    frame, the unit of a batch: Binance sends one trade per frame."""
    channel: Any = getattr(ws, "_recv_channel", None)
    if channel is None:
        return
    while len(frames) < DRAIN_FRAMES:
        try:
            frames.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


async def _subscribe(ws: WebSocketConnection, frames: list[str], venue: Venue) -> None:
    """Send the subscribe frames, paced for the venue. Ends quietly if the connection closes
    (the receive loop reports it)."""
    try:
        for index, frame in enumerate(frames):
            if index and venue.subscribe_pace_s:
                await trio.sleep(venue.subscribe_pace_s)
            await ws.send_message(frame)
    except ConnectionClosed:
        return


async def _keep_alive(
    ws: WebSocketConnection,
    keepalive: KeepAlive,
    every_s: float,
    alive: trio.CancelScope,
    stale_after_s: float,
) -> None:
    """Every `every_s`, send the venue's ping: a text frame, whose answer arrives as a frame,
    or a WebSocket ping, whose pong is the sign of life. Owned by the session's nursery."""
    try:
        while True:
            await trio.sleep(every_s)
            if keepalive.message is None:
                await ws.ping()
                alive.deadline = trio.current_time() + stale_after_s
            else:
                await ws.send_message(keepalive.message)
    except ConnectionClosed:
        return
