"""OKX v5 public WebSocket, `trades` (contract: exchange connectors).

One subscribe frame per instrument (`{"op":"subscribe","args":[{"channel":"trades",
"instId":"BTC-USDT"}]}`) so a refused instrument does not take the others with it; OKX acks
each with `{"event":"subscribe","arg":..}` and refuses with `{"event":"error","code","msg"}`.
Trade frames are `{"arg":{"channel":"trades","instId":..},"data":[{"instId","tradeId","px",
"ts",..}]}` with `ts` as integer milliseconds in text. The first trade after subscribing is the
instrument's latest, however old: the trade id drops it when it was counted before a reconnect.
Keep-alive: OKX closes a connection that receives nothing for 30 s; the client sends the text
`ping` and OKX answers the text `pong`.
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
from marketflow.feeds.venues.fields import decimal_price, ms_from_digits


class Arg(msgspec.Struct, gc=False):
    channel: str = ""
    instId: str = ""


class Envelope(msgspec.Struct, gc=False):
    arg: Arg | None = None
    data: msgspec.Raw = msgspec.Raw()
    event: str = ""
    code: str = ""
    msg: str = ""


class OkxTrade(msgspec.Struct, gc=False):
    instId: str
    tradeId: str
    px: str
    ts: str


_decode_envelope = msgspec.json.Decoder(Envelope).decode
_decode_trades = msgspec.json.Decoder(list[OkxTrade]).decode


def url(base: str, pairs: Sequence[str]) -> str:
    return base


def subscribe(pairs: Sequence[str]) -> list[str]:
    return [
        json.dumps({"op": "subscribe", "args": [{"channel": "trades", "instId": pair}]})
        for pair in pairs
    ]


def parse(frame: str | bytes, trades: list[Trade]) -> Note | None:
    if frame == "pong" or frame == b"pong":
        return CONTROL
    try:
        message = _decode_envelope(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if message.event:
        if message.event == "error":
            return Note(NoteKind.REFUSED, detail=f"{message.code} {message.msg}"[:200])
        return CONTROL  # subscribe, unsubscribe, notice, channel-conn-count, ...
    if message.arg is None:
        return MALFORMED
    if message.arg.channel != "trades":
        return CONTROL
    try:
        entries = _decode_trades(message.data)
    except DECODE_ERRORS:
        return MALFORMED
    bad = 0
    for entry in entries:
        price = decimal_price(entry.px)
        ts = ms_from_digits(entry.ts)
        if price is None or ts is None:
            bad += 1
        else:
            trades.append((entry.instId, price, ts, entry.tradeId))
    return Note(NoteKind.MALFORMED, count=bad) if bad else None


VENUE = Venue(
    kind="okx",
    default_url="wss://ws.okx.com:8443/ws/v5/public",
    default_symbols={
        "BTCUSDT": "BTC-USDT",
        "DOGEUSDT": "DOGE-USDT",
        "TONUSDT": "TON-USDT",
        "SOLUSDT": "SOL-USDT",
        "ETHUSDT": "ETH-USDT",
    },
    pair_pattern=re.compile(r"[A-Z0-9]{1,15}(?:-[A-Z0-9]{1,15}){1,3}"),
    pair_example="BTC-USDT",
    keepalive=KeepAlive(
        "client sends text 'ping' (under 30 s apart), server answers 'pong'",
        every_s=25.0,
        message="ping",
    ),
    url=url,
    subscribe=subscribe,
    parse=parse,
)
