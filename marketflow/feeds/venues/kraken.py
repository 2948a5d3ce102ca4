"""Kraken spot, WebSocket API v1, `trade` (contract: exchange connectors).

One subscribe frame for all pairs; Kraken answers one `subscriptionStatus` per pair (`status`
`error` with an `errorMessage` for a pair it refuses). Data frames are arrays:
`[channelID, [[price, volume, time, side, orderType, misc], ...], "trade", "XBT/USD"]`, with the
time as decimal seconds text (`"1617666461.465618"`). v1 trades carry no id and Kraken does not
replay trades on subscribe, so nothing is deduplicated. Events are objects: `heartbeat`,
`systemStatus`, `subscriptionStatus`, `pong`. Keep-alive: Kraken sends `{"event":"heartbeat"}`
about every second when a connection has no other traffic; the client's optional
`{"event":"ping"}` is not needed for that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import msgspec

from marketflow.feeds.venues.base import (
    CONTROL,
    DECODE_ERRORS,
    MALFORMED,
    KeepAlive,
    Note,
    NoteKind,
    Trade,
    Venue,
)
from marketflow.feeds.venues.fields import decimal_price, ms_from_seconds


class Event(msgspec.Struct, gc=False):
    event: str = ""
    status: str = ""
    pair: str = ""
    errorMessage: str = ""


_decode_trades = msgspec.json.Decoder(tuple[int, list[list[str]], str, str]).decode
_decode_event = msgspec.json.Decoder(Event).decode
_decode_any = msgspec.json.Decoder().decode


def url(base: str, pairs: Sequence[str]) -> str:
    return base


def subscribe(pairs: Sequence[str]) -> list[str]:
    return [
        json.dumps({"event": "subscribe", "pair": list(pairs), "subscription": {"name": "trade"}})
    ]


def parse(frame: str | bytes, trades: list[Trade]) -> Note | None:
    head = frame[:1]
    if head in ("[", b"["):
        return _parse_array(frame, trades)
    try:
        message = _decode_event(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if not message.event:
        return MALFORMED
    if message.status == "error" or message.event == "error":
        return Note(NoteKind.REFUSED, detail=message.errorMessage[:200], pair=message.pair)
    return CONTROL  # heartbeat, systemStatus, subscriptionStatus, pong, ...


def _parse_array(frame: str | bytes, trades: list[Trade]) -> Note | None:
    try:
        _, entries, channel, pair = _decode_trades(frame)
    except DECODE_ERRORS:
        return _other_array(frame)
    if channel != "trade":
        return CONTROL
    bad = 0
    for entry in entries:
        price = decimal_price(entry[0]) if len(entry) >= 3 else None
        ts = ms_from_seconds(entry[2]) if price is not None else None
        if price is None or ts is None:
            bad += 1
        else:
            trades.append((pair, price, ts, None))
    return Note(NoteKind.MALFORMED, count=bad) if bad else None


def _other_array(frame: str | bytes) -> Note:
    """An array that is not a readable trade frame: another channel's data, or junk."""
    try:
        message = _decode_any(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if (
        isinstance(message, list)
        and len(message) >= 4
        and isinstance(message[-2], str)
        and isinstance(message[-1], str)
        and not message[-2].startswith("trade")
    ):
        return CONTROL  # ticker, spread, book-*, ohlc-*
    return MALFORMED


VENUE = Venue(
    kind="kraken",
    default_url="wss://ws.kraken.com",
    default_symbols={
        "BTCUSDT": "XBT/USDT",
        "DOGEUSDT": "XDG/USDT",
        "TONUSDT": "TON/USDT",
        "SOLUSDT": "SOL/USDT",
        "ETHUSDT": "ETH/USDT",
    },
    pair_pattern=re.compile(r"[A-Z0-9]{1,15}/[A-Z0-9]{1,15}"),
    pair_example="XBT/USDT",
    keepalive=KeepAlive("heartbeat events: the server sends one about every second when idle"),
    url=url,
    subscribe=subscribe,
    parse=parse,
)
