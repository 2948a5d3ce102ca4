"""The one entry point for a live source, whatever its kind (contract: exchange connectors).

`read_source` has `read_feed`'s signature and picks the reader for `exchange.kind`: the TCP
NDJSON reader or a venue connector. Nothing after it knows the kind: both hand batches of
validated ticks to `send_batch` and keep the same `SourceStats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import trio

from marketflow.config import ExchangeConfig
from marketflow.feeds.reader import SendBatch, read_feed
from marketflow.feeds.venues import VENUES
from marketflow.feeds.websocket import read_venue
from marketflow.models import SourceStats


async def read_source(
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
    """Read `exchange` until cancelled (see `read_feed` and `read_venue` for what each owns).

    `max_line_bytes` bounds a TCP feed's lines; a connector's frames have their own bound
    (`websocket.MAX_FRAME_CHARS`): a venue's snapshot frame is not a feed line.
    """
    if exchange.kind == "tcp":
        await read_feed(
            exchange,
            send_batch,
            stats,
            symbols=symbols,
            max_line_bytes=max_line_bytes,
            max_skew_ms=max_skew_ms,
            max_future_ms=max_future_ms,
            stale_after_s=stale_after_s,
            reconnect_max_delay_s=reconnect_max_delay_s,
            clock=clock,
            task_status=task_status,
        )
    else:
        await read_venue(
            exchange,
            VENUES[exchange.kind],
            send_batch,
            stats,
            symbols=symbols,
            max_skew_ms=max_skew_ms,
            max_future_ms=max_future_ms,
            stale_after_s=stale_after_s,
            reconnect_max_delay_s=reconnect_max_delay_s,
            clock=clock,
            task_status=task_status,
        )
