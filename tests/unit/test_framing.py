"""The feed parser: every valid line becomes a tick, every bad one is counted under its reason."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.feeds.framing import FeedParser
from marketflow.models import Reject

NOW_MS = 1_795_646_511_826
SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def parser(**kw: object) -> FeedParser:
    return FeedParser(SYMBOLS, clock=lambda: NOW_MS / 1000, **kw)  # type: ignore[arg-type]


def line(symbol: object = "BTCUSDT", price: object = 1.5, ts: object = NOW_MS) -> bytes:
    return json.dumps({"symbol": symbol, "price": price, "timestamp": ts}).encode() + b"\n"


def test_accepts_protocol_lines_and_reference_shape() -> None:
    p = parser()
    data = b'{"symbol":"BTCUSDT","price":100152.53531348541,"timestamp":%d}\n' % NOW_MS
    data += line("ETHUSDT", 3050, NOW_MS + 1)
    assert p.feed(data) == [
        ("BTCUSDT", 100152.53531348541, NOW_MS),
        ("ETHUSDT", 3050.0, NOW_MS + 1),
    ]
    assert p.accepted == 2 and p.rejected_total == 0


def test_lower_case_symbol_is_normalised() -> None:
    assert parser().feed(line("btcusdt")) == [("BTCUSDT", 1.5, NOW_MS)]


BAD = [
    (b"garbage\n", Reject.MALFORMED),
    (b"[1,2,3]\n", Reject.MALFORMED),
    (b'"just a string"\n', Reject.MALFORMED),
    (b"\xff\xfe\xfd\n", Reject.MALFORMED),
    (line(price=True), Reject.MALFORMED),
    (line(price="1.5"), Reject.MALFORMED),
    (line(ts=1.5), Reject.MALFORMED),
    (line(ts="1795646511826"), Reject.MALFORMED),
    (line(symbol=5), Reject.MALFORMED),
    (b'{"symbol":"BTCUSDT","price":1.5}\n', Reject.MALFORMED),
    (line(symbol="DOGEUSDT"), Reject.UNKNOWN_SYMBOL),
    (b'{"symbol":"BTCUSDT","price":NaN,"timestamp":%d}\n' % NOW_MS, Reject.BAD_PRICE),
    (b'{"symbol":"BTCUSDT","price":Infinity,"timestamp":%d}\n' % NOW_MS, Reject.BAD_PRICE),
    (b'{"symbol":"BTCUSDT","price":1e400,"timestamp":%d}\n' % NOW_MS, Reject.BAD_PRICE),
    (line(price=-1), Reject.BAD_PRICE),
    (line(price=0), Reject.BAD_PRICE),
    (line(ts=NOW_MS - 121_000), Reject.BAD_TIMESTAMP),
    (line(ts=NOW_MS + 121_000), Reject.BAD_TIMESTAMP),
    (line(ts=NOW_MS + 5_001), Reject.BAD_TIMESTAMP),  # ahead of max_future_skew_ms
]


def test_a_tick_from_the_future_is_refused_beyond_its_own_limit() -> None:
    """A tick stamped two minutes ahead would win "newest" for two minutes: the future limit
    (`max_future_skew_ms`, 5 s) is much tighter than the past one (`max_clock_skew_s`)."""
    p = parser(max_skew_ms=120_000, max_future_ms=5_000)
    ticks = p.feed(line(ts=NOW_MS + 5_000) + line(ts=NOW_MS + 119_000) + line(ts=NOW_MS - 119_000))
    assert [t[2] for t in ticks] == [NOW_MS + 5_000, NOW_MS - 119_000]
    assert p.rejected[Reject.BAD_TIMESTAMP] == 1


def test_each_bad_form_is_counted_under_its_reason_and_good_lines_survive() -> None:
    for bad, reason in BAD:
        p = parser()
        ticks = p.feed(line(price=1.0) + bad + line(price=2.0))
        assert [t[1] for t in ticks] == [1.0, 2.0], bad
        assert p.rejected[reason] == 1, (bad, p.rejected)
        assert p.rejected_total == 1, bad
        assert p.last_rejected is not None and p.last_rejected[0] is reason


def test_blank_lines_are_skipped_silently() -> None:
    p = parser()
    assert len(p.feed(line() + b"\n\r\n" + line())) == 2
    assert p.rejected_total == 0


def test_overlong_line_is_discarded_without_buffering_it() -> None:
    p = parser(max_line_bytes=100)
    assert p.feed(line(price=1.0)) == [("BTCUSDT", 1.0, NOW_MS)]
    for _ in range(1000):  # 1 MB with no newline: held bytes stay bounded
        assert p.feed(b"x" * 1000) == []
        assert len(p._pending) <= 100
    assert p.feed(b"tail\n" + line(price=2.0)) == [("BTCUSDT", 2.0, NOW_MS)]
    assert p.rejected[Reject.TOO_LONG] == 1
    assert p.rejected_total == 1


def test_overlong_line_inside_one_chunk() -> None:
    p = parser(max_line_bytes=100)
    long_line = b'{"symbol":"BTCUSDT","pad":"' + b"a" * 200 + b'"}\n'
    assert len(p.feed(line(price=1.0) + long_line + line(price=2.0))) == 2
    assert p.rejected[Reject.TOO_LONG] == 1


@settings(max_examples=200, deadline=None)
@given(
    prices=st.lists(st.floats(min_value=1e-9, max_value=1e12), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_any_chunking_gives_the_same_ticks(prices: list[float], cuts: list[int]) -> None:
    data = b"".join(line(price=p) for p in prices)
    expected = [("BTCUSDT", p, NOW_MS) for p in prices]
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    p = parser()
    got = []
    for a, b in itertools.pairwise(bounds):
        got += p.feed(data[a:b])
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_arbitrary_bytes_never_raise(chunks: list[bytes]) -> None:
    p = parser(max_line_bytes=128)
    good = line(price=7.0)
    total = 0
    for chunk in chunks:
        total += len(p.feed(chunk))
    # Whatever came before, a fresh line after a newline is still read.
    ticks = p.feed(b"\n" + good)
    assert ("BTCUSDT", 7.0, NOW_MS) in ticks
    assert p.accepted == total + len(ticks)
