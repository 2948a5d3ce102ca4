"""Each venue's parser on its recording, its control and refusal frames, and fuzzed frames.

The expectations come from `recorded_trades` (Decimal prices, integer-only times), not from
the parsers under test.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketflow.feeds.venues import VENUES
from marketflow.feeds.venues.base import CONTROL, NoteKind, Trade
from tests.venue_server import VENUES as RECORDED
from tests.venue_server import load, recorded_trades


def parse_all(venue: str, frames: list[str | bytes]) -> tuple[list[Trade], Counter[str]]:
    trades: list[Trade] = []
    notes: Counter[str] = Counter()
    for frame in frames:
        note = VENUES[venue].parse(frame, trades)
        notes["trades" if note is None else note.kind.value] += 1
    return trades, notes


@pytest.mark.parametrize("venue", RECORDED)
def test_every_recorded_trade_is_parsed_exactly(venue: str) -> None:
    _, frames = load(venue)
    trades, notes = parse_all(venue, list(frames))
    expected = [
        (pair, float(price), ts, trade_id) for pair, price, ts, trade_id in recorded_trades(venue)
    ]
    got = [(pair, price, ts, None if tid is None else str(tid)) for pair, price, ts, tid in trades]
    assert got == expected
    assert notes["malformed"] == notes["refused"] == 0
    # bytes frames (a venue may send binary) read the same
    assert parse_all(venue, [f.encode() for f in frames])[0] == trades


CONTROL_COUNTS = {
    # frames that are neither trades nor rejects: acks, heartbeats, tickers, status events
    "binance": 0,
    "coinbase": 103 + 15 + 5,
    "kraken": 238 + 20 + 2 + 22,
    "okx": 18 + 28,
    "bybit": 7 + 56,
}


@pytest.mark.parametrize("venue", RECORDED)
def test_control_frames_are_neither_trades_nor_rejects(venue: str) -> None:
    _, frames = load(venue)
    _, notes = parse_all(venue, list(frames))
    assert notes["control"] == CONTROL_COUNTS[venue]
    assert notes["trades"] + notes["control"] == len(frames)


KEEPALIVE_ANSWERS = {
    "okx": "pong",
    "bybit": '{"success":true,"ret_msg":"pong","conn_id":"x","req_id":"","op":"ping"}',
    "kraken": '{"event":"pong","reqid":42}',
    "coinbase": '{"channel":"heartbeats","timestamp":"2026-08-09T21:05:48.856364007Z",'
    '"sequence_num":35,"events":[{"current_time":"x","heartbeat_counter":1}]}',
    "binance": '{"result":null,"id":1}',
}


@pytest.mark.parametrize("venue", RECORDED)
def test_keepalive_answers_are_control(venue: str) -> None:
    trades: list[Trade] = []
    assert VENUES[venue].parse(KEEPALIVE_ANSWERS[venue], trades) is CONTROL
    assert VENUES[venue].parse('{"op":"pong","args":["1"]}', trades) is not None
    assert trades == []


REFUSALS = {
    "binance": ('{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}', ""),
    "coinbase": (
        '{"type":"error","message":"Failed to subscribe","reason":"X-Y is not a valid product"}',
        "",
    ),
    "kraken": (
        '{"errorMessage":"Currency pair not supported","event":"subscriptionStatus",'
        '"pair":"XBT/EUH","status":"error","subscription":{"name":"trade"}}',
        "XBT/EUH",
    ),
    "okx": (
        '{"event":"error","code":"60018","msg":"Wrong URL or channel:trades,instId:X-Y '
        'doesn\'t exist.","connId":"a4d3ae55"}',
        "",
    ),
    "bybit": (
        '{"success":false,"ret_msg":"Invalid symbol :[publicTrade.XYZ]","conn_id":"c",'
        '"req_id":"XYZ","op":"subscribe"}',
        "XYZ",
    ),
}


@pytest.mark.parametrize("venue", RECORDED)
def test_refusals_say_what_was_refused(venue: str) -> None:
    frame, pair = REFUSALS[venue]
    note = VENUES[venue].parse(frame, [])
    assert note is not None and note.kind is NoteKind.REFUSED
    assert note.pair == pair and note.detail


GARBAGE = ["", "garbage", "[1,2,3]", '"text"', "null", "{}", "[[[[", "\ud800", b"\xff\xfe"]


@pytest.mark.parametrize("venue", RECORDED)
@pytest.mark.parametrize("frame", GARBAGE)
def test_frames_not_understood_are_malformed(venue: str, frame: str | bytes) -> None:
    trades: list[Trade] = []
    note = VENUES[venue].parse(frame, trades)
    assert note is not None and note.kind is NoteKind.MALFORMED and trades == []


def first_trade_frame(venue: str) -> Any:
    for raw in load(venue)[1]:
        trades: list[Trade] = []
        if VENUES[venue].parse(raw, trades) is None and trades:
            return json.loads(raw)
    raise AssertionError(venue)


def trade_entries(venue: str, message: Any) -> list[Any]:
    if venue == "binance":
        return [message["data"]]
    if venue == "coinbase":
        return list(message["events"][0]["trades"])
    if venue == "kraken":
        return list(message[1])
    return list(message["data"])


PRICE_FIELD = {"binance": "p", "coinbase": "price", "kraken": 0, "okx": "px", "bybit": "p"}


@pytest.mark.parametrize("venue", RECORDED)
def test_a_broken_trade_is_malformed_and_its_neighbours_kept(venue: str) -> None:
    message = first_trade_frame(venue)
    entries = trade_entries(venue, message)
    entries[0][PRICE_FIELD[venue]] = "not a price"
    trades: list[Trade] = []
    note = VENUES[venue].parse(json.dumps(message), trades)
    assert note is not None and note.kind is NoteKind.MALFORMED and note.count == 1
    assert len(trades) == len(entries) - 1


def mutations() -> st.SearchStrategy[Any]:
    """Values to put where a recorded value was: wrong types, odd numbers, odd texts."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
        st.sampled_from(["", "1e400", "-0", "NaN", "2026-13-01T00:00:00Z", "9" * 40]),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a decoded frame, leaves and containers."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += paths(item, (*prefix, index))
    return out


def put(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return value


FRAMES = {venue: [json.loads(raw) for raw in load(venue)[1][:200]] for venue in RECORDED}


@pytest.mark.parametrize("venue", RECORDED)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_recorded_frames_never_raise(venue: str, data: st.DataObject) -> None:
    frame = json.loads(json.dumps(data.draw(st.sampled_from(FRAMES[venue]))))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(frame)))
        frame = put(frame, path, data.draw(mutations()))
    text = json.dumps(frame)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.text(max_size=5)) + text[cut:]
    trades: list[Trade] = []
    VENUES[venue].parse(text, trades)
    VENUES[venue].parse(text.encode("utf-8", "surrogatepass"), trades)
    for pair, price, ts, _ in trades:  # whatever got through is typed as a trade
        assert isinstance(pair, str) and isinstance(price, float) and isinstance(ts, int)


@pytest.mark.parametrize("venue", RECORDED)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_frames_never_raise(venue: str, frame: str | bytes) -> None:
    VENUES[venue].parse(frame, [])
