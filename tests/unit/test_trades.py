"""TradeParser: venue frames -> ticks, with the TCP parser's rules and replayed trades dropped."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from marketflow.feeds.trades import TradeIds, TradeParser
from marketflow.feeds.venues import VENUES
from marketflow.feeds.venues.base import NoteKind
from marketflow.models import Reject

NOW_MS = 1_786_310_849_846


def okx_frame(trade_id: str, px: str = "30227.6", ts: int = NOW_MS, inst: str = "BTC-USDT") -> str:
    trade = {"instId": inst, "tradeId": trade_id, "px": px, "sz": "1", "side": "buy", "ts": str(ts)}
    return json.dumps({"arg": {"channel": "trades", "instId": inst}, "data": [trade]})


def parser(**kw: int) -> TradeParser:
    return TradeParser(
        VENUES["okx"].parse,
        {"BTC-USDT": "BTCUSDT", "ETH-USDT": "ETHUSDT"},
        clock=lambda: NOW_MS / 1000,
        **kw,
    )


def test_trades_become_ticks_with_our_symbol() -> None:
    p = parser()
    ticks = p.feed([okx_frame("1"), okx_frame("2", "3050.5", NOW_MS - 5, "ETH-USDT")])
    assert ticks == [("BTCUSDT", 30227.6, NOW_MS), ("ETHUSDT", 3050.5, NOW_MS - 5)]
    assert p.accepted == 2 and sum(p.rejected.values()) == 0


def test_a_replayed_trade_is_dropped_not_counted() -> None:
    p = parser()
    assert len(p.feed([okx_frame("1"), okx_frame("2")])) == 2
    # reconnect: OKX sends the latest trade again, then new ones
    assert p.feed([okx_frame("2"), okx_frame("3")]) == [("BTCUSDT", 30227.6, NOW_MS)]
    assert p.duplicates == 1 and sum(p.rejected.values()) == 0
    # the same id on another pair is another trade
    assert len(p.feed([okx_frame("2", inst="ETH-USDT")])) == 1


def test_each_refusal_counted_under_the_tcp_reasons() -> None:
    p = parser()
    frames = [
        okx_frame("1", inst="DOGE-USDT"),  # a pair we did not map
        okx_frame("2", px="0"),
        okx_frame("3", px="-1"),
        okx_frame("4", px="1e400"),
        okx_frame("5", ts=NOW_MS - 121_000),
        okx_frame("6", ts=NOW_MS + 5_001),
        okx_frame("7", px="abc"),
        "not json",
        okx_frame("8"),
    ]
    assert p.feed(frames) == [("BTCUSDT", 30227.6, NOW_MS)]
    assert p.rejected == {
        Reject.TOO_LONG: 0,
        Reject.MALFORMED: 2,
        Reject.UNKNOWN_SYMBOL: 1,
        Reject.BAD_PRICE: 3,
        Reject.BAD_TIMESTAMP: 2,
    }
    assert p.last_rejected == (Reject.MALFORMED, b"not json")


def test_the_time_window_follows_the_parser_settings() -> None:
    p = parser(max_skew_ms=1_000, max_future_ms=0)
    assert p.feed([okx_frame("1", ts=NOW_MS - 1_000), okx_frame("2", ts=NOW_MS + 1)]) == [
        ("BTCUSDT", 30227.6, NOW_MS - 1_000)
    ]
    assert p.rejected[Reject.BAD_TIMESTAMP] == 1


def test_refusals_are_kept_for_the_loop_to_log() -> None:
    p = parser()
    p.feed(['{"event":"error","code":"60018","msg":"no such instrument","connId":"x"}'])
    assert [n.kind for n in p.refusals] == [NoteKind.REFUSED]
    assert "no such instrument" in p.refusals[0].detail
    assert sum(p.rejected.values()) == 0


def test_an_oversized_frame_is_too_long() -> None:
    p = parser()
    p.reject_oversized(1 << 20)
    assert p.rejected[Reject.TOO_LONG] == 1


def test_trade_ids_are_bounded_per_pair() -> None:
    ids = TradeIds(per_pair=3)
    for n in range(10):
        assert not ids.seen("A", n)
    assert len(ids) == 3
    assert ids.seen("A", 9) and not ids.seen("A", 0)  # 0 was forgotten
    assert not ids.seen("B", 9)


@given(st.lists(st.integers(0, 50), max_size=200))
def test_no_id_is_counted_twice_while_remembered(stream: list[int]) -> None:
    ids = TradeIds(per_pair=64)  # more than the distinct ids drawn: nothing is forgotten
    fresh = [n for n in stream if not ids.seen("A", n)]
    assert sorted(fresh) == sorted(set(stream))
