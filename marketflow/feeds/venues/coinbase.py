"""Coinbase Advanced Trade market data, `market_trades` + `heartbeats` (contract: exchange
connectors).

One subscribe frame per product on `market_trades` (so a product Coinbase refuses does not take
the others with it), then one on `heartbeats`, paced under Coinbase's 8 messages per second.
Frames are `{"channel":..,"timestamp":..,"sequence_num":..,"events":[..]}`; a trade event is
`{"type":"snapshot"|"update","trades":[{"product_id","trade_id","price","time",..}]}`. The first
`snapshot` replays the last trades per product: the trade ids let the connector drop the ones it
already counted before a reconnect. Keep-alive: the `heartbeats` channel sends a frame every
second (Coinbase closes channels that stay silent for a minute or so without it).
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
from marketflow.feeds.venues.fields import decimal_price, ms_from_iso


class Envelope(msgspec.Struct, gc=False):
    channel: str = ""
    type: str = ""  # "error" on a refused request, with `message` and maybe `reason`
    message: str = ""
    reason: str = ""
    events: msgspec.Raw = msgspec.Raw()


class MarketTrade(msgspec.Struct, gc=False):
    product_id: str
    trade_id: str
    price: str
    time: str


class TradeEvent(msgspec.Struct, gc=False):
    trades: list[MarketTrade] = []


_decode_envelope = msgspec.json.Decoder(Envelope).decode
_decode_events = msgspec.json.Decoder(list[TradeEvent]).decode


def url(base: str, pairs: Sequence[str]) -> str:
    return base


def subscribe(pairs: Sequence[str]) -> list[str]:
    frames = [
        json.dumps({"type": "subscribe", "product_ids": [pair], "channel": "market_trades"})
        for pair in pairs
    ]
    frames.append(
        json.dumps({"type": "subscribe", "product_ids": list(pairs), "channel": "heartbeats"})
    )
    return frames


def parse(frame: str | bytes, trades: list[Trade]) -> Note | None:
    try:
        message = _decode_envelope(frame)
    except DECODE_ERRORS:
        return MALFORMED
    if message.channel != "market_trades":
        if message.channel:
            return CONTROL  # heartbeats, subscriptions, ticker, candles, status, ...
        if message.type == "error":
            detail = f"{message.message}: {message.reason}" if message.reason else message.message
            return Note(NoteKind.REFUSED, detail=detail[:200])
        return MALFORMED
    try:
        events = _decode_events(message.events)
    except DECODE_ERRORS:
        return MALFORMED
    bad = 0
    for event in events:
        for trade in event.trades:
            price = decimal_price(trade.price)
            ts = ms_from_iso(trade.time)
            if price is None or ts is None:
                bad += 1
            else:
                trades.append((trade.product_id, price, ts, trade.trade_id))
    return Note(NoteKind.MALFORMED, count=bad) if bad else None


VENUE = Venue(
    kind="coinbase",
    default_url="wss://advanced-trade-ws.coinbase.com",
    default_symbols={
        "BTCUSDT": "BTC-USDT",
        "DOGEUSDT": "DOGE-USDT",
        "TONUSDT": "TON-USDT",
        "SOLUSDT": "SOL-USDT",
        "ETHUSDT": "ETH-USDT",
    },
    pair_pattern=re.compile(r"[A-Z0-9]{1,15}-[A-Z0-9]{1,15}"),
    pair_example="BTC-USDT",
    keepalive=KeepAlive("heartbeats channel: the server sends a frame every second"),
    url=url,
    subscribe=subscribe,
    parse=parse,
    subscribe_pace_s=0.2,
)
