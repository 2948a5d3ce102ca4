"""Candles: intervals and UTC alignment, the request's parameters and range, and candles built
from memory and stored minutes equal to candles recomputed from the raw ticks."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketflow.candles import (
    INTERVALS,
    MINUTE_MS,
    CandleQuery,
    align,
    align_up,
    candle_answer,
    parse_candle_query,
    parse_time,
    plan_span,
)
from marketflow.config import build_config
from marketflow.health import StoreHealth
from marketflow.minute_reader import MinuteReader
from marketflow.models import MinuteRow
from marketflow.node import Node
from marketflow.queries import QueryError
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from tests.unit.node_fakes import fake_node, take_over_all

SYM = "BTCUSDT"
A, B, C = "test-exchange1", "test-exchange2", "test-exchange3"
H0 = 1_795_392_000_000  # Monday 2026-11-23 00:00:00 UTC: a week, day and hour start
WINDOW = 300
GRACE = 2000


def utc_ms(*args: int) -> int:
    return int(datetime.datetime(*args, tzinfo=datetime.UTC).timestamp() * 1000)  # type: ignore[misc]


# --- alignment ---------------------------------------------------------------------------------


def test_intervals_align_to_utc_and_weeks_start_on_monday() -> None:
    t = utc_ms(2026, 11, 26, 13, 47, 31) + 250  # a Thursday
    assert align(t, INTERVALS["1s"]) == t - 250
    assert align(t, INTERVALS["15s"]) == utc_ms(2026, 11, 26, 13, 47, 30)
    assert align(t, INTERVALS["5m"]) == utc_ms(2026, 11, 26, 13, 45)
    assert align(t, INTERVALS["4h"]) == utc_ms(2026, 11, 26, 12)
    assert align(t, INTERVALS["1d"]) == utc_ms(2026, 11, 26)
    week = align(t, INTERVALS["1w"])
    assert week == utc_ms(2026, 11, 23) == H0
    assert datetime.datetime.fromtimestamp(week / 1000, datetime.UTC).weekday() == 0
    assert align(H0, INTERVALS["1w"]) == H0
    assert align(H0 - 1, INTERVALS["1w"]) == H0 - INTERVALS["1w"]
    assert align(-1, INTERVALS["1m"]) == -MINUTE_MS  # before 1970 too
    assert align_up(H0 + 1, INTERVALS["1h"]) == H0 + 3_600_000
    assert align_up(H0, INTERVALS["1h"]) == H0


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1795646511826", 1795646511826),
        ("0", 0),
        ("2026-11-25T22:41:51.826Z", 1795646511826),
        ("2026-11-25t22:41:51.826z", 1795646511826),
        ("2026-11-25T22:41:51Z", 1795646511000),
        ("2026-11-25T22:41:51.8Z", 1795646511800),
        ("2026-11-25T22:41:51.826999Z", 1795646511826),  # finer than ms is cut
        ("2026-11-26T00:41:51.826+02:00", 1795646511826),
        ("2026-11-26T00:41:51.826 02:00", 1795646511826),  # a `+` the query string decoded
        ("2026-11-25T20:11:51.826-02:30", 1795646511826),
        ("2024-02-29T00:00:00Z", utc_ms(2024, 2, 29)),
    ],
)
def test_times_are_unix_ms_or_rfc3339(text: str, ms: int) -> None:
    assert parse_time(text, "start") == ms


@pytest.mark.parametrize(
    "text",
    [
        "-1",
        "1.5",
        "1e12",
        "\uff11\uff12\uff13",  # non-ASCII digits
        "99999999999999999",
        "2026-11-25",
        "2026-11-25T22:41:51",  # no offset
        "2026-11-25 22:41:51Z",
        "2026-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-25T24:00:00Z",
        "2026-11-25T23:60:00Z",
        "2026-11-25T23:59:60Z",
        "0000-01-01T00:00:00Z",
        "2026-11-25T22:41:51+24:00",
        "now",
    ],
)
def test_bad_times_are_400(text: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_time(text, "end")
    assert info.value.status == 400 and "end" in info.value.message


def query(**params: str | list[str]) -> CandleQuery:
    given = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
    return parse_candle_query(lambda name: given.get(name, []))


def test_query_defaults_and_values() -> None:
    assert query() == CandleQuery("1m", None, None, 500)
    q = query(interval="1w", start="1000", end="2026-11-25T22:41:51.826Z", limit="1000")
    assert q == CandleQuery("1w", 1000, 1795646511826, 1000)
    assert q.interval_ms == 7 * 86_400_000


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"interval": "2m"}, "interval"),
        ({"interval": "1M"}, "interval"),
        ({"interval": ""}, "interval"),
        ({"interval": ["1m", "5m"]}, "at most once"),
        ({"start": "10", "end": "10"}, "before end"),
        ({"start": "11", "end": "10"}, "before end"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "99999999999999999999"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"start": "yesterday"}, "start"),
    ],
)
def test_bad_queries_are_400(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(QueryError) as info:
        query(**params)
    assert info.value.status == 400 and needle in info.value.message


def test_span_rules() -> None:
    now = H0 + 30_500
    # Neither: the last `limit` up to the forming candle.
    span = plan_span(CandleQuery("1m"), now, WINDOW)
    assert (span.t_from, span.t_to, span.newest_first) == (None, H0 + MINUTE_MS, True)
    # End only: candles starting before it; an end inside an interval keeps that interval.
    span = plan_span(CandleQuery("1h", end=H0 - 1), now, WINDOW)
    assert (span.t_from, span.t_to, span.newest_first) == (None, H0, True)
    # Start only / both: the first `limit` from the first interval starting at or after it.
    span = plan_span(CandleQuery("1h", start=H0 - 1, end=H0 + 1), now, WINDOW)
    assert (span.t_from, span.t_to, span.newest_first) == (H0, H0 + 3_600_000, False)
    # No candle starts after now.
    span = plan_span(CandleQuery("1s", start=now - 10_000, end=now + 60_000), now, WINDOW)
    assert span.t_to == H0 + 31_000
    # Sub-minute ranges are trimmed to the window ...
    span = plan_span(CandleQuery("15s", start=0), now, WINDOW)
    assert span.t_from == align_up(now - (WINDOW - 1) * 1000 - 500, 15_000)
    # ... and one that ends before it is 400 naming the limit.
    with pytest.raises(QueryError) as info:
        plan_span(CandleQuery("5s", end=now - WINDOW * 1000), now, WINDOW)
    assert info.value.status == 400 and "window_seconds" in info.value.message


# --- candles from memory and stored minutes equal candles from the raw ticks --------------------

Arrival = tuple[str, float, int]  # (source, price, ts), in arrival order


def reference(ticks: Sequence[Arrival], interval: str) -> dict[int, dict[str, Any]]:
    """Candles computed straight from ticks: earliest open and latest close by timestamp, ties by
    source name (first in order), then by arrival."""
    iv = INTERVALS[interval]
    names = sorted({source for source, _, _ in ticks})
    out: dict[int, dict[str, Any]] = {}
    best: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
    for i, (source, price, ts) in enumerate(ticks):
        t = align(ts, iv)
        c = out.setdefault(t, {"t": t, "high": price, "low": price, "count": 0, "sum": 0.0})
        c["count"] += 1
        c["sum"] += price
        c["high"] = max(c["high"], price)
        c["low"] = min(c["low"], price)
        open_key = (ts, source, i)
        close_key = (ts, -names.index(source), i)
        got = best.get(t)
        if got is None:
            best[t] = (open_key, close_key)
            c["open"] = c["close"] = price
            continue
        if open_key < got[0]:
            c["open"] = price
            got = (open_key, got[1])
        if close_key > got[1]:
            c["close"] = price
            got = (got[0], close_key)
        best[t] = got
    for c in out.values():
        c["average"] = c.pop("sum") / c["count"]
    return out


def expected(
    ticks: Sequence[Arrival], q: CandleQuery, now_ms: int, exact_from_ms: int
) -> list[dict[str, Any]]:
    span = plan_span(q, now_ms, WINDOW)
    lo = span.t_from if span.t_from is not None else -(2**62)
    if q.interval_ms < MINUTE_MS:
        lo = max(lo, align_up(exact_from_ms, q.interval_ms))
    candles = [c for t, c in sorted(reference(ticks, q.interval).items()) if lo <= t < span.t_to]
    candles = candles[-q.limit :] if span.newest_first else candles[: q.limit]
    for c in candles:
        c["closed"] = now_ms >= c["t"] + q.interval_ms + GRACE
    return candles


def first_node(store: MemoryAggregateStore, now_ms: int) -> Node:
    """A process that has ingested since long before `now_ms` (its keys owned, no horizon)."""
    config = build_config({"app": {"window_seconds": WINDOW, "grace_ms": GRACE}})
    node = fake_node(config, store=store, clock=lambda: now_ms / 1000)
    node.state.owned_by_default = True
    return node


async def started_node(store: MemoryAggregateStore, now_ms: int) -> Node:
    """A process started at `now_ms` on `store`: every source taken over (restored)."""
    config = build_config({"app": {"window_seconds": WINDOW, "grace_ms": GRACE}})
    node = fake_node(config, store=store, clock=lambda: now_ms / 1000)
    await take_over_all(node)
    return node


async def answer(
    node: Node, sources: list[str], q: CandleQuery, now_ms: int
) -> list[dict[str, Any]]:
    body = await candle_answer(
        node,
        symbol=SYM,
        sources=sources,
        exchange_label=sources[0] if len(sources) == 1 else "all",
        interval=q.interval,
        start=q.start,
        end=q.end,
        limit=q.limit,
        now=now_ms / 1000,
        window_seconds=WINDOW,
        grace_ms=GRACE,
    )
    return list(body["candles"])


T2 = H0 + 100_500  # wall clock after the restart: 100.5 s into a new hour, day and week
SPAN_FROM = H0 - 3 * 3_600_000

HORIZON_MS = ((T2 // 1000 - WINDOW) // 60 + 1) * 60_000  # the first minute held after restart
timestamps = st.one_of(
    st.integers(SPAN_FROM, T2),
    st.integers(H0 - 5_000, H0 + 5_000),  # around the hour, day and week boundary
    st.integers(T2 - WINDOW * 1000, T2),  # inside the window
    st.integers(HORIZON_MS - 2_000, HORIZON_MS + 20_000),  # resumed after the restart
    st.integers(H0 - 3_600_000 - 3_000, H0 - 3_600_000 + 3_000),  # an earlier hour boundary
    # Equal tick times, across sources and within one: ties go by source name, then arrival.
    st.sampled_from([H0 - 1, H0, H0 + 1, HORIZON_MS + 500, T2 - 30_000, T2 - 1]),
)
arrivals = st.lists(
    st.tuples(
        st.sampled_from([A, B, C]),
        st.integers(2, 200).map(lambda n: n / 2),  # halves: sums stay exact
        timestamps,
        st.booleans(),  # arrives after the restart (if its time allows, before it)
    ),
    min_size=1,
    max_size=60,
)
times = st.one_of(st.none(), st.integers(SPAN_FROM - 3_600_000, T2 + 10_000))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ticks=arrivals,
    restart_before_s=st.integers(1, 250),
    interval=st.sampled_from(list(INTERVALS)),
    start=times,
    end=times,
    limit=st.one_of(st.integers(1, 12), st.just(1000)),
    sources=st.sampled_from([[A], [B], [A, B], [A, B, C], [C, A]]),
)
def test_candles_equal_candles_from_the_raw_ticks(
    ticks: list[tuple[str, float, int, bool]],
    restart_before_s: int,
    interval: str,
    start: int | None,
    end: int | None,
    limit: int,
    sources: list[str],
) -> None:
    """Ticks arrive in random order across sources; before a restart some minutes are written
    (and the older ones pruned), all are written at shutdown; the restarted process resumes
    the minutes in its window from their rows and folds more ticks, late ones included. Before
    and after the restart, every candle equals the one computed from the ticks themselves."""
    if start is not None and end is not None and start >= end:
        start, end = end, start + 1
    q = CandleQuery(interval, start, end, limit)
    t1 = T2 - restart_before_s * 1000
    before = [(s, p, ts) for s, p, ts, after in ticks if ts <= t1 and not after]
    later = [(s, p, ts) for s, p, ts, after in ticks if after or ts > t1]
    horizon_s = HORIZON_MS // 1000  # what the restart holds again

    async def scenario() -> None:
        store = MemoryAggregateStore()
        first = first_node(store, t1)
        for source, price, ts in before:
            first.state.key(source, SYM).fold([(SYM, price, ts)])
        store.upsert(first.state.take_minutes(t1 - GRACE))
        first.state.prune(t1 // 1000)
        await check(first, before, t1, 0)
        store.upsert(first.state.take_minutes(None))  # the shutdown flush

        second = await started_node(store, T2)
        for source, price, ts in later:
            second.state.key(source, SYM).fold([(SYM, price, ts)])
        folded = before + [a for a in later if a[2] // 1000 >= horizon_s]
        # Resumed minutes keep their ticks (up to the row's close time) in no second.
        exact_from = horizon_s * 1000
        for source, _, ts in before:
            if source in sources and ts >= horizon_s * 1000:
                exact_from = max(exact_from, ts + 1)
        await check(second, folded, T2, exact_from)

    async def check(node: Node, folded: list[Arrival], now_ms: int, exact_from: int) -> None:
        mine = [a for a in folded if a[0] in sources]
        try:
            want = expected(mine, q, now_ms, exact_from)
        except QueryError as exc:
            with pytest.raises(QueryError) as info:
                await answer(node, sources, q, now_ms)
            assert (info.value.status, info.value.message) == (exc.status, exc.message)
            return
        assert await answer(node, sources, q, now_ms) == want

    trio.run(scenario)


async def test_stored_minutes_unreachable_is_503_unless_memory_covers_the_range() -> None:
    store = MemoryAggregateStore()
    node = await started_node(store, T2)
    node.state.key(A, SYM).fold([(SYM, 10.0, T2 - 1000)])
    store.fail_with = OSError("connection refused")
    # Memory holds the last five minutes: 1m candles from start inside them need no store.
    q = CandleQuery("1m", start=T2 - 120_000)
    assert [c["count"] for c in await answer(node, [A], q, T2)] == [1]
    assert [c["count"] for c in await answer(node, [A], CandleQuery("15s"), T2)] == [1]
    with pytest.raises(QueryError) as info:
        await answer(node, [A], CandleQuery("1h"), T2)
    assert info.value.status == 503 and "PostgreSQL" in info.value.message


async def test_equal_tick_times_go_to_the_source_named_first_then_to_arrival() -> None:
    store = MemoryAggregateStore()
    node = await started_node(store, T2)
    t = T2 - 10_000
    fold = [
        (B, 2.0, t),  # B's open and close at t
        (C, 3.0, t),
        (A, 1.0, t),  # A sorts first: the candle's open and close, though it arrived last
        (A, 1.5, t),  # same source, same time: arrival decides (open 1.0, close 1.5)
        (C, 9.0, t - 1),  # earlier: the open after all, whatever its source
    ]
    for source, price, ts in fold:
        node.state.key(source, SYM).fold([(SYM, price, ts)])
    for interval in ("1s", "1m", "1h"):
        [across] = await answer(node, [C, B, A], CandleQuery(interval), T2)
        assert (across["open"], across["close"], across["count"]) == (9.0, 1.5, 5), interval
        [a_b] = await answer(node, [B, A], CandleQuery(interval), T2)
        assert (a_b["open"], a_b["close"], a_b["count"]) == (1.0, 1.5, 3), interval
        [b_c] = await answer(node, [C, B], CandleQuery(interval), T2)
        assert (b_c["open"], b_c["close"]) == (9.0, 2.0), interval


class FallbackView:
    """The read port of an api process whose Redis is unreachable: a mirror that may still hold
    old state, and the stored minutes."""

    fallback = True
    fresh_ms = 70_000

    def __init__(self, store: MemoryAggregateStore) -> None:
        self.state = MarketState(WINDOW, owned_by_default=False)
        self.stored = MinuteReader(store, StoreHealth("postgres"), ttl_s=0.0)

    def sources(self) -> list[str]:
        return [A, B]

    def now(self) -> float:
        return T2 / 1000


async def test_the_fallback_answers_from_stored_minutes_alone_and_says_so() -> None:
    store = MemoryAggregateStore()
    minute = H0 - 2 * MINUTE_MS  # two minutes of the 5m candle before H0
    store.upsert(
        [
            MinuteRow(A, SYM, minute, 2, 20.0, 9.0, 11.0, 9.0, 11.0),
            MinuteRow(B, SYM, minute + MINUTE_MS, 3, 36.0, 11.0, 13.0, 13.0, 11.0),
        ]
    )
    view = FallbackView(store)
    view.state.key(A, SYM).fold([(SYM, 500.0, T2 - 1000)])  # a stale mirror: not asked
    body = await candle_answer(
        view,
        symbol=SYM,
        sources=[A, B],
        exchange_label="all",
        interval="5m",
        start=None,
        end=None,
        limit=10,
        now=view.now(),
        window_seconds=WINDOW,
        grace_ms=GRACE,
    )
    assert body["fallback"] == "postgres"
    [candle] = body["candles"]
    assert (candle["count"], candle["open"], candle["close"], candle["high"]) == (
        5,
        9.0,
        11.0,
        13.0,
    )
    with pytest.raises(QueryError) as info:
        await candle_answer(
            view,
            symbol=SYM,
            sources=[A],
            exchange_label=A,
            interval="15s",
            start=None,
            end=None,
            limit=10,
            now=view.now(),
            window_seconds=WINDOW,
            grace_ms=GRACE,
        )
    assert info.value.status == 503 and "Redis" in info.value.message
