"""One task per live exchange: connect, read, parse, send batches; reconnect forever (contract: feed
protocol)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

import trio

from marketflow.backoff import Backoff
from marketflow.config import ExchangeConfig
from marketflow.feeds.framing import FeedParser
from marketflow.health import describe
from marketflow.logs import bind, rate_limited
from marketflow.models import Reject, SourceStats, SourceStatus, Tick

log = logging.getLogger("marketflow.feed")
RECEIVE_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 5.0
conn_ids = itertools.count(1)  # connection ids for the logs, shared by every kind of source

SendBatch = Callable[[str, list[Tick]], Awaitable[None]]


class RejectCounting(Protocol):
    """A parser that counts what it refuses (`FeedParser`, `TradeParser`)."""

    rejected: dict[Reject, int]
    last_rejected: tuple[Reject, bytes] | None


async def read_feed(
    exchange: ExchangeConfig,
    send_batch: SendBatch,
    stats: SourceStats,
    *,
    symbols: Collection[str],
    max_line_bytes: int,
    max_skew_ms: int,
    max_future_ms: int,
    stale_after_s: float,
    reconnect_max_delay_s: float,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Read `exchange` until cancelled, handing each received chunk's ticks to `send_batch`.

    Owns its TCP stream and its parser (one per connection). Bad lines are counted in `stats`
    and skipped; EOF, errors and silence longer than `stale_after_s` lead to a reconnect after a
    capped, jittered backoff that resets at the first valid line. On cancel the stream is
    closed and the status becomes `disconnected`; nothing else is left behind.
    """
    backoff = Backoff(1.0, max(1.0, reconnect_max_delay_s))
    task_status.started()
    with bind(source=exchange.name):
        try:
            while True:
                stats.status = SourceStatus.CONNECTING
                try:
                    with trio.fail_after(CONNECT_TIMEOUT_S):
                        stream = await trio.open_tcp_stream(exchange.host, exchange.port)
                except (OSError, trio.TooSlowError) as exc:
                    delay = backoff.next()
                    if rate_limited(f"connect:{exchange.name}", 10.0):
                        log.warning(
                            "feed connect failed",
                            extra={
                                "ctx": {
                                    "error": describe(exc),
                                    "retry_in_s": round(delay, 1),
                                    "attempt": backoff.attempt,
                                    "addr": f"{exchange.host}:{exchange.port}",
                                }
                            },
                        )
                    await trio.sleep(delay)
                    continue
                conn_id = next(conn_ids)
                parser = FeedParser(
                    symbols,
                    max_line_bytes=max_line_bytes,
                    max_skew_ms=max_skew_ms,
                    max_future_ms=max_future_ms,
                    clock=clock,
                )
                stats.status = SourceStatus.CONNECTED
                with bind(conn_id=conn_id):
                    log.info(
                        "feed connected",
                        extra={"ctx": {"addr": f"{exchange.host}:{exchange.port}"}},
                    )
                    reason = await _read_connection(
                        stream, parser, exchange.name, send_batch, stats, backoff, stale_after_s
                    )
                    stats.reconnects += 1
                    stats.status = SourceStatus.CONNECTING
                    delay = backoff.next()
                    log.warning(
                        "feed disconnected",
                        extra={"ctx": {"reason": reason, "retry_in_s": round(delay, 1)}},
                    )
                await trio.sleep(delay)
        finally:
            stats.status = SourceStatus.DISCONNECTED


async def _read_connection(
    stream: trio.SocketStream,
    parser: FeedParser,
    name: str,
    send_batch: SendBatch,
    stats: SourceStats,
    backoff: Backoff,
    stale_after_s: float,
) -> str:
    """Read one connection to its end; return why it ended."""
    rejected_seen = dict(parser.rejected)
    async with stream:
        while True:
            try:
                with trio.move_on_after(stale_after_s) as scope:
                    data = await stream.receive_some(RECEIVE_BYTES)
            except (OSError, trio.BrokenResourceError) as exc:
                return describe(exc)
            if scope.cancelled_caught:
                return f"stale: no data for {stale_after_s:g}s"
            if not data:
                return "eof"
            ticks = parser.feed(data)
            if ticks:
                stats.messages += len(ticks)
                stats.last_message_at = trio.current_time()
                if backoff.attempt:
                    backoff.reset()
                await send_batch(name, ticks)
            if parser.last_rejected is not None:
                count_rejects(parser, stats, rejected_seen)


def count_rejects(parser: RejectCounting, stats: SourceStats, seen: dict[Reject, int]) -> None:
    """Add the parser's new refusals to `stats` and log the last one (rate-limited)."""
    for reason, total in parser.rejected.items():
        new = total - seen[reason]
        if new:
            stats.rejected_by_reason[reason.value] += new
            seen[reason] = total
    assert parser.last_rejected is not None
    reason, excerpt = parser.last_rejected
    parser.last_rejected = None
    if rate_limited(f"bad-line:{stats.name}", 5.0):
        log.warning(
            "feed line rejected",
            extra={
                "ctx": {
                    "reason": reason.value,
                    "excerpt": excerpt.decode("utf-8", "replace"),
                    "rejected_total": stats.rejected,
                }
            },
        )
