"""Bybit v5 public spot, `publicTrade` (contract: exchange connectors).

One subscribe frame per pair,
`{"op":"subscribe","req_id":"BTCUSDT","args":["publicTrade.BTCUSDT"]}`. Bybit's ack
`{"success":true|false,"ret_msg":..,"op":"subscribe","req_id":..}` does not name its topics, so
the request id says which pair a refusal is about. Trade frames are
`{"topic":"publicTrade.BTCUSDT","ts":..,"type":"snapshot","data":[{"i":<trade id>,"T":<ms>,
"p":"<price>","s":"BTCUSDT",..}]}`. Keep-alive: the client sends `{"op":"ping"}` every 20 s
and Bybit answers with a JSON pong (`"ret_msg":"pong"` on spot, `"op":"pong"` elsewhere).
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
from marketflow.feeds.venues.fields import decimal_price

TOPIC = "publicTrade."


class Envelope(msgspec.Struct, gc=False):
    topic: str = ""
    data: msgspec.Raw = msgspec.Raw()
    op: str = ""
    success: bool | None = None
    ret_msg: str = ""
    req_id: str = ""


class BybitTrade(msgspec.Struct, gc=False):
    i: str
    T: int
    p: str
    s: str


_decode_envelope = msgspec.json.Decoder(Envelope).decode
_decode_trades = msgspec.json.Decoder(list[BybitTrade]).decode


def url(base: str, pairs: Sequence[str]) -> str:
    return base


def subscribe(pairs: Sequence[str]) -> list[str]:
    return [
        json.dumps({"op": "subscribe", "req_id": pair, "args": [TOPIC + pair]}) for pair in pairs
    ]


def parse(frame: str | bytes, trades: list[Trade]) -> Note | None:
    try:
        message = _decode_envelope(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if not message.topic:
        if not message.op:
            return MALFORMED
        if message.success is False:
            return Note(NoteKind.REFUSED, detail=message.ret_msg[:200], pair=message.req_id)
        return CONTROL  # a subscribe ack or a pong
    if not message.topic.startswith(TOPIC):
        return CONTROL  # tickers, orderbook, kline, ...
    try:
        entries = _decode_trades(message.data)
    except DECODE_ERRORS:
        return MALFORMED
    bad = 0
    for entry in entries:
        price = decimal_price(entry.p)
        if price is None:
            bad += 1
        else:
            trades.append((entry.s, price, entry.T, entry.i))
    return Note(NoteKind.MALFORMED, count=bad) if bad else None


VENUE = Venue(
    kind="bybit",
    default_url="wss://stream.bybit.com/v5/public/spot",
    default_symbols={s: s for s in ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")},
    pair_pattern=re.compile(r"[A-Z0-9]{2,30}"),
    pair_example="BTCUSDT",
    keepalive=KeepAlive(
        'client sends {"op":"ping"} every 20 s, server answers a JSON pong',
        every_s=20.0,
        message='{"op":"ping"}',
    ),
    url=url,
    subscribe=subscribe,
    parse=parse,
)
