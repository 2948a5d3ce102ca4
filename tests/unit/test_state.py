"""Bucket arithmetic and minute rows, computed by hand."""

from __future__ import annotations

from marketflow.models import (
    COUNT,
    FIRST,
    LAST,
    MAX,
    MIN,
    SUM,
    MinuteRow,
    decode_bucket,
    encode_bucket,
)
from marketflow.state import KeyState, MarketState

T0 = 1_795_646_400_000  # a minute start (ms)


def test_bucket_contents_by_hand() -> None:
    st = KeyState("ex", "BTCUSDT")
    ticks = [
        ("BTCUSDT", 10.0, T0 + 500),
        ("BTCUSDT", 12.0, T0 + 100),
        ("BTCUSDT", 8.0, T0 + 900),
        ("BTCUSDT", 11.0, T0 + 900),
        ("BTCUSDT", 20.0, T0 + 1000),
    ]
    assert st.fold(ticks) == (0, 0)
    b0 = st.buckets[T0 // 1000]
    assert b0[COUNT] == 4 and b0[SUM] == 41.0 and b0[MIN] == 8.0 and b0[MAX] == 12.0
    assert b0[FIRST] == 12.0  # earliest timestamp
    assert b0[LAST] == 11.0  # latest timestamp, tie broken by arrival
    b1 = st.buckets[T0 // 1000 + 1]
    assert b1[COUNT] == 1 and b1[FIRST] == b1[LAST] == 20.0
    assert (st.latest_price, st.latest_ts) == (20.0, T0 + 1000)


def test_latest_is_newest_timestamp_not_last_arrival() -> None:
    st = KeyState("ex", "BTCUSDT")
    st.fold([("BTCUSDT", 1.0, T0 + 5000), ("BTCUSDT", 2.0, T0 + 1000)])
    assert st.latest_price == 1.0
    st.fold([("BTCUSDT", 3.0, T0 + 5000)])
    assert st.latest_price == 3.0  # tie: the later arrival wins


def test_minute_row_by_hand() -> None:
    st = KeyState("ex", "BTCUSDT")
    st.fold(
        [
            ("BTCUSDT", 4.0, T0 + 59_999),
            ("BTCUSDT", 2.0, T0),
            ("BTCUSDT", 6.0, T0 + 30_000),
            ("BTCUSDT", 100.0, T0 + 60_000),
        ]
    )
    row = st.minute_row(T0 // 60_000)
    assert row == MinuteRow("ex", "BTCUSDT", T0, 3, 12.0, 2.0, 6.0, 2.0, 4.0)
    assert row.average == 4.0


def test_take_minutes_waits_for_grace_and_returns_each_once() -> None:
    ms = MarketState(window_seconds=300)
    ms.key("ex", "BTCUSDT").fold([("BTCUSDT", 1.0, T0 + 10), ("BTCUSDT", 3.0, T0 + 61_000)])
    assert ms.take_minutes(T0 + 59_000) == []
    rows = ms.take_minutes(T0 + 60_000)
    assert [r.minute for r in rows] == [T0]
    assert ms.take_minutes(T0 + 60_000) == []
    # A late tick for the written minute makes it dirty again, with the full total.
    ms.key("ex", "BTCUSDT").fold([("BTCUSDT", 5.0, T0 + 20)])
    rows = ms.take_minutes(T0 + 60_000)
    assert rows[0].count == 2 and rows[0].total == 6.0
    assert [r.minute for r in ms.take_minutes(None)] == [T0 + 60_000]


def test_pruned_minutes_make_older_ticks_late() -> None:
    ms = MarketState(window_seconds=60)
    st = ms.key("ex", "BTCUSDT")
    st.fold([("BTCUSDT", 1.0, T0)])
    ms.prune(T0 // 1000 + 200)  # dirty minute: never pruned before it is written
    assert T0 // 1000 in st.buckets
    ms.take_minutes(None)
    ms.prune(T0 // 1000 + 200)
    assert not st.buckets
    assert st.fold([("BTCUSDT", 1.0, T0 + 5)]) == (1, 0)


def test_flush_plan_has_changed_seconds_only_then_everything_after_rewrite() -> None:
    ms = MarketState(window_seconds=300)
    st = ms.key("ex", "BTCUSDT")
    st.rewrite = False
    st.fold([("BTCUSDT", 1.0, T0), ("BTCUSDT", 2.0, T0 + 1000)])
    plan = ms.take_flush(T0 // 1000 + 2)
    assert plan is not None and len(plan.buckets[("ex", "BTCUSDT")]) == 2
    assert ms.take_flush(T0 // 1000 + 2) is None
    st.fold([("BTCUSDT", 3.0, T0 + 1500)])
    plan = ms.take_flush(T0 // 1000 + 2)
    assert plan is not None and [s for s, _ in plan.buckets[("ex", "BTCUSDT")]] == [T0 // 1000 + 1]
    ms.rewrite_all()  # Redis was down: every owned key's window replaced whole
    plan = ms.take_flush(T0 // 1000 + 2)
    assert plan is not None and len(plan.buckets[("ex", "BTCUSDT")]) == 2 and len(plan.latest) == 1
    assert plan.rewritten == [("ex", "BTCUSDT")] and plan.rewrite


def test_keys_another_instance_owns_are_never_flushed_written_or_pruned() -> None:
    ms = MarketState(window_seconds=300, owned_by_default=False)
    mirrored = ms.key("ex", "BTCUSDT")
    mirrored.fold([("BTCUSDT", 1.0, T0)])
    mirrored.meta_dirty = True
    assert not mirrored.owned
    assert ms.take_flush(T0 // 1000 + 2) is None
    assert ms.take_minutes(None) == []
    ms.prune(T0 // 1000 + 10_000)
    assert mirrored.buckets  # its owner's horizon decides, not ours


def test_bucket_encoding_round_trips_floats_exactly() -> None:
    b = [3, 0.1 + 0.2, 0.1, 100152.53531348541, 1e-300, 5e300, 0, 0]
    second, back = decode_bucket(encode_bucket(1795646400, b))
    assert second == 1795646400
    assert back[:6] == b[:6]
    assert encode_bucket(1, b).split("|")[2] == "0.30000000000000004"
