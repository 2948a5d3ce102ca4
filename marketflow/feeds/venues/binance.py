"""Binance spot, combined streams, `aggTrade` (contract: exchange connectors).

The pairs are part of the URL (`/stream?streams=btcusdt@aggTrade/...`), so nothing is sent after
connecting. Each frame is `{"stream":"btcusdt@aggTrade","data":{"e":"aggTrade","s":"BTCUSDT",
"a":<aggregate trade id>,"p":"<price>","T":<trade time ms>,...}}`: one trade per frame.
Keep-alive: the server pings every 20 s and trio-websocket answers with pongs; the client also
pings, so a quiet pair still shows the connection alive within `stale_after_s`.
"""

from __future__ import annotations

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
from marketflow.feeds.venues.fields import decimal_price


class AggTrade(msgspec.Struct, gc=False):
    e: str
    s: str
    a: int
    p: str
    T: int


class Combined(msgspec.Struct, gc=False):
    stream: str
    data: AggTrade


_decode_trade = msgspec.json.Decoder(Combined).decode
_decode_any = msgspec.json.Decoder().decode


def url(base: str, pairs: Sequence[str]) -> str:
    streams = "/".join(f"{pair.lower()}@aggTrade" for pair in pairs)
    return f"{base}{'&' if '?' in base else '?'}streams={streams}"


def subscribe(pairs: Sequence[str]) -> list[str]:
    return []


def parse(frame: str | bytes, trades: list[Trade]) -> Note | None:
    try:
        message = _decode_trade(frame)
    except DECODE_ERRORS:
        return _other(frame)
    data = message.data
    price = decimal_price(data.p)
    if data.e != "aggTrade" or price is None:
        return MALFORMED
    trades.append((data.s, price, data.T, data.a))
    return None


def _other(frame: str | bytes) -> Note:
    """Anything but a well-formed trade: a reply to a request, an error, another event."""
    try:
        message = _decode_any(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if not isinstance(message, dict):
        return MALFORMED
    if "error" in message or ("code" in message and "msg" in message):
        error = message.get("error", message)
        detail = error.get("msg", "") if isinstance(error, dict) else error
        return Note(NoteKind.REFUSED, detail=str(detail)[:200])
    if "result" in message and "id" in message:
        return CONTROL  # the reply to a request
    stream, data = message.get("stream"), message.get("data")
    if isinstance(stream, str) and isinstance(data, dict):
        # A trade we could not read is malformed; another stream's event is not ours to count.
        return MALFORMED if stream.endswith("@aggTrade") else CONTROL
    if isinstance(message.get("e"), str):
        return CONTROL  # an event outside a stream, e.g. `serverShutdown`
    return MALFORMED


VENUE = Venue(
    kind="binance",
    default_url="wss://stream.binance.com:9443/stream",
    default_symbols={s: s for s in ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")},
    pair_pattern=re.compile(r"[A-Z0-9]{2,30}"),
    pair_example="BTCUSDT",
    keepalive=KeepAlive(
        "server pings every 20 s, pongs answered; client pings as well", every_s=20.0
    ),
    url=url,
    subscribe=subscribe,
    parse=parse,
)
