"""What a connector opens and sends: addresses, URLs, subscribe frames, the venue table."""

from __future__ import annotations

import json

import pytest

from marketflow.config import DEFAULT_SYMBOLS
from marketflow.feeds.venues import VENUES
from marketflow.feeds.websocket import parse_address


def test_addresses() -> None:
    assert parse_address("wss://ws.okx.com:8443/ws/v5/public") == (
        "ws.okx.com",
        8443,
        "/ws/v5/public",
        "ws.okx.com:8443",
    )
    assert parse_address("wss://advanced-trade-ws.coinbase.com") == (
        "advanced-trade-ws.coinbase.com",
        443,
        "/",
        "advanced-trade-ws.coinbase.com",
    )
    assert parse_address("ws://[::1]:9000/stream?streams=a@aggTrade/b@aggTrade") == (
        "::1",
        9000,
        "/stream?streams=a@aggTrade/b@aggTrade",
        "[::1]:9000",
    )
    assert parse_address("ws://127.0.0.1/") == ("127.0.0.1", 80, "/", "127.0.0.1")


def test_binance_puts_the_streams_in_the_url() -> None:
    binance = VENUES["binance"]
    url = binance.url(binance.default_url, ["BTCUSDT", "ETHUSDT"])
    assert url == "wss://stream.binance.com:9443/stream?streams=btcusdt@aggTrade/ethusdt@aggTrade"
    assert (
        binance.url("ws://h/stream?x=1", ["BTCUSDT"])
        == "ws://h/stream?x=1&streams=btcusdt@aggTrade"
    )
    assert binance.subscribe(["BTCUSDT"]) == []


def test_subscribe_frames_name_each_pair() -> None:
    pairs = ["BTC-USDT", "ETH-USDT"]
    coinbase = [json.loads(f) for f in VENUES["coinbase"].subscribe(pairs)]
    assert [(f["channel"], f["product_ids"]) for f in coinbase] == [
        ("market_trades", ["BTC-USDT"]),
        ("market_trades", ["ETH-USDT"]),
        ("heartbeats", pairs),
    ]
    okx = [json.loads(f) for f in VENUES["okx"].subscribe(pairs)]
    assert [f["args"] for f in okx] == [
        [{"channel": "trades", "instId": "BTC-USDT"}],
        [{"channel": "trades", "instId": "ETH-USDT"}],
    ]
    (kraken,) = [json.loads(f) for f in VENUES["kraken"].subscribe(["XBT/USDT", "ETH/USDT"])]
    assert kraken == {
        "event": "subscribe",
        "pair": ["XBT/USDT", "ETH/USDT"],
        "subscription": {"name": "trade"},
    }
    bybit = [json.loads(f) for f in VENUES["bybit"].subscribe(["BTCUSDT"])]
    assert bybit == [{"op": "subscribe", "req_id": "BTCUSDT", "args": ["publicTrade.BTCUSDT"]}]


@pytest.mark.parametrize("kind", list(VENUES))
def test_each_venue_maps_the_default_pairs_to_pairs_it_accepts(kind: str) -> None:
    venue = VENUES[kind]
    assert venue.kind == kind
    assert set(venue.default_symbols) == set(DEFAULT_SYMBOLS)
    for pair in venue.default_symbols.values():
        assert venue.pair_pattern.fullmatch(pair), pair
    assert venue.pair_pattern.fullmatch(venue.pair_example)
    assert venue.default_url.startswith("wss://")
    keepalive = venue.keepalive
    assert keepalive.rule and (keepalive.every_s is None or 1 <= keepalive.every_s < 30)
