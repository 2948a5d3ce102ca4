"""The live candle book: a client that applies the snapshot and then every step's changes holds,
at every step, exactly the candles `GET /prices/candles/...` answers."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketflow.candles import INTERVALS, MINUTE_MS, align_up, candle_answer
from marketflow.config import build_config
from marketflow.live_candles import CandleKey
from marketflow.models import MinuteRow
from marketflow.node import Node
from marketflow.queries import QueryError
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from tests.unit.node_fakes import fake_node, take_over_all

SYM = "BTCUSDT"
A, B, X = "test-exchange1", "test-exchange2", "exchange1"  # X is not in the current mode
H0 = 1_795_392_000_000  # Monday 2026-11-23 00:00:00 UTC
WINDOW = 60
GRACE = 2000
START = H0 - 100_000  # the process starts 100 s before an hour, day and week boundary


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def make_node(store: MemoryAggregateStore, clock: Clock) -> Node:
    config = build_config({"app": {"window_seconds": WINDOW, "grace_ms": GRACE}})
    return fake_node(config, store=store, clock=clock)


async def rest(node: Node, sources: list[str], interval: str, start: int) -> list[Any]:
    now = node.clock()
    try:
        body = await candle_answer(
            node,
            symbol=SYM,
            sources=sources,
            exchange_label="all" if len(sources) > 1 else sources[0],
            interval=interval,
            start=start,
            end=None,
            limit=1000,
            now=now,
            window_seconds=WINDOW,
            grace_ms=GRACE,
        )
    except QueryError as exc:  # a sub-minute range now wholly before the window
        assert exc.status == 400
        return []
    return list(body["candles"])


Tick = tuple[str, int, int]  # (source, price in halves, ms before "now")
ticks_now = st.lists(
    st.tuples(
        st.sampled_from([A, B, X]),
        st.integers(2, 400),
        # mostly fresh, some a few seconds late, some about as old as the window (in a minute
        # being written and pruned right now), some older (refused: late)
        st.one_of(
            st.integers(0, 1500),
            st.integers(0, 8000),
            st.integers(WINDOW * 1000, (WINDOW + 60) * 1000),
            st.integers(0, 150_000),
        ),
    ),
    max_size=8,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(
        st.tuples(
            st.sampled_from([A, B, X]),
            st.integers(2, 400),
            st.one_of(st.integers(0, 3_600_000), st.integers(0, 5000)),
        ),
        max_size=40,
    ),
    intervals=st.sets(st.sampled_from(list(INTERVALS)), min_size=1, max_size=4),
    steps=st.lists(st.tuples(st.integers(50, 12_000), ticks_now), min_size=1, max_size=30),
)
def test_a_client_following_the_changes_holds_the_rest_candles(
    history: list[Tick], intervals: set[str], steps: list[tuple[int, list[Tick]]]
) -> None:
    """History from an earlier run is in PostgreSQL (the minutes inside the window are resumed
    from their rows); the client subscribes; then time passes in steps, ticks arrive (in and
    out of order, some too late), minutes are written and pruned as the aggregator does. After
    every step the client's candles, for each source and across the current mode's, equal the
    REST answer: values, counts and `closed`."""

    async def scenario() -> None:
        store = MemoryAggregateStore()
        before = MarketState(WINDOW)
        for source, halves, ago in history:
            before.key(source, SYM).fold([(SYM, halves / 2, START - ago)])
        store.upsert(before.take_minutes(None))

        clock = Clock(START)
        node = make_node(store, clock)
        await take_over_all(node)
        book = node.hub.book
        pairs = [(SYM, INTERVALS[name]) for name in intervals]
        await book.acquire(pairs)
        current = node.sources()
        view: dict[CandleKey, dict[str, Any]] = {}

        def apply(entries: list[dict[str, Any]]) -> None:
            for e in entries:
                key = (e["exchange"], e["symbol"], e["interval"], e["t"])
                assert view.get(key) != e, f"sent again unchanged: {e}"  # only what changed
                view[key] = e

        ivs = [INTERVALS[n] for n in INTERVALS if n in intervals]
        apply(book.snapshot([SYM], [A, B, X], ivs, current, clock.ms))
        apply(list(book.step(clock.ms, current).values()))
        for advance, arriving in steps:
            clock.ms += advance
            for source, halves, ago in arriving:
                node.state.key(source, SYM).fold([(SYM, halves / 2, clock.ms - ago)])
            store.upsert(node.state.take_minutes(clock.ms - GRACE))
            node.state.prune(clock.ms // 1000)
            apply(list(book.step(clock.ms, current).values()))
            await compare(node, view, clock.ms)

    async def compare(node: Node, view: dict[CandleKey, Any], now_ms: int) -> None:
        book = node.hub.book
        for (symbol, iv), series in book.series.items():
            name = series.name
            lowest = series.first_t
            if iv < MINUTE_MS:  # REST answers sub-minute candles inside the window only
                lowest = max(lowest, align_up((now_ms // 1000 - WINDOW + 1) * 1000, iv))
            for label, sources in ((A, [A]), (B, [B]), (X, [X]), ("all", [A, B, "test-exchange3"])):
                want = {c["t"]: c for c in await rest(node, sources, name, lowest)}
                have = {
                    t: {k: v for k, v in e.items() if k not in ("symbol", "exchange", "interval")}
                    for (ex, sym, n, t), e in view.items()
                    if ex == label and sym == symbol and n == name and t >= lowest
                }
                assert have == want, (label, name, now_ms)

    trio.run(scenario)


async def test_release_forgets_the_series_and_stops_recording_changes() -> None:
    store = MemoryAggregateStore()
    clock = Clock(START)
    node = make_node(store, clock)
    await take_over_all(node)
    book = node.hub.book
    await book.acquire([(SYM, MINUTE_MS)])
    await book.acquire([(SYM, MINUTE_MS), (SYM, 1000)])
    st = node.state.keys[(A, SYM)]
    assert st.live_dirty == set()
    book.release([(SYM, MINUTE_MS), (SYM, 1000)])
    assert (SYM, MINUTE_MS) in book.series and st.live_dirty is not None
    book.release([(SYM, MINUTE_MS)])
    assert not book.series and not book.mirrors and st.live_dirty is None
    assert node.state.keys[("test-exchange3", "ETHUSDT")].live_dirty is None


async def test_a_store_that_cannot_answer_follows_nothing() -> None:
    store = MemoryAggregateStore()
    clock = Clock(START)
    node = make_node(store, clock)
    await take_over_all(node)
    store.upsert([MinuteRow(A, SYM, H0 - 3_600_000, 1, 5.0, 5.0, 5.0, 5.0, 5.0)])
    store.fail_with = OSError("connection refused")
    book = node.hub.book
    await book.acquire([(SYM, MINUTE_MS)])  # inside memory: no read needed
    with pytest.raises(QueryError) as info:
        await book.acquire([(SYM, MINUTE_MS), (SYM, 3_600_000)])
    assert info.value.status == 503
    assert set(book.series) == {(SYM, MINUTE_MS)} and book.series[(SYM, MINUTE_MS)].refs == 1


class Following:
    """A node, its book following some intervals, and a client view built from the snapshot
    and every step's changes."""

    def __init__(self, start_ms: int) -> None:
        self.store = MemoryAggregateStore()
        self.clock = Clock(start_ms)
        self.node = make_node(self.store, self.clock)
        self.book = self.node.hub.book
        self.view: dict[CandleKey, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []

    async def start(self, *intervals: str) -> None:
        if self.node.state.keys.get((A, SYM)) is None:
            await take_over_all(self.node)
        self.book.step(self.clock.ms, self.current)
        await self.book.acquire([(SYM, INTERVALS[n]) for n in intervals])
        ivs = [INTERVALS[n] for n in intervals]
        self.apply(self.book.snapshot([SYM], [A, B, X], ivs, self.current, self.clock.ms))

    @property
    def current(self) -> list[str]:
        return list(self.node.sources())

    def apply(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            self.view[(e["exchange"], e["symbol"], e["interval"], e["t"])] = e
        self.sent += entries

    def fold(self, source: str, price: float, ts: int) -> None:
        self.node.state.key(source, SYM).fold([(SYM, price, ts)])

    def step(self, advance_ms: int) -> None:
        """Time passes; the aggregator writes and prunes; the hub steps."""
        self.clock.ms += advance_ms
        state = self.node.state
        self.store.upsert(state.take_minutes(self.clock.ms - GRACE))
        state.prune(self.clock.ms // 1000)
        self.sent = []
        self.apply(list(self.book.step(self.clock.ms, self.current).values()))

    async def check(self, interval: str, t: int, source: str = A) -> dict[str, Any]:
        [want] = [c for c in await rest(self.node, [source], interval, t) if c["t"] == t]
        have = self.view[(source, SYM, interval, t)]
        assert {k: v for k, v in have.items() if k in want} == want
        return have


async def test_a_candle_longer_than_the_window_stays_exact_while_its_minutes_are_pruned() -> None:
    f = Following(H0 + 30_000)
    await f.start("1h", "5m")
    for i in range(40):  # ten minutes, a tick every 15 s; the window is one minute
        f.fold(A, 100.0 + i, f.clock.ms)
        f.step(15_000)
    assert f.node.state.keys[(A, SYM)].horizon_s * 1000 > H0 + 5 * MINUTE_MS  # pruned
    candle = await f.check("1h", H0)
    assert candle["count"] == 40 and candle["open"] == 100.0 and candle["close"] == 139.0
    assert (await f.check("5m", H0 + 5 * MINUTE_MS))["count"] == 20


async def test_a_late_tick_in_a_minute_pruned_in_the_same_step_is_counted() -> None:
    f = Following(H0 + 30_000)
    await f.start("1m", "1h")
    for _ in range(8):
        f.fold(A, 1.0, f.clock.ms)
        f.step(10_000)
    st = f.node.state.keys[(A, SYM)]
    minute = st.horizon_s // 60  # the oldest held minute, pruned by the next whole minute
    f.fold(A, 50.0, minute * MINUTE_MS + 59_999)  # late, but still held: folded
    f.step(60_000)  # the minute is written and due for pruning before the hub looks
    f.step(100)
    assert st.horizon_s // 60 > minute
    assert (await f.check("1m", minute * MINUTE_MS))["high"] == 50.0
    assert (await f.check("1h", H0))["high"] == 50.0


async def test_the_snapshot_holds_the_previous_candle_in_its_grace_then_its_closing() -> None:
    f = Following(H0 + 30_000)
    await take_over_all(f.node)
    f.fold(A, 7.0, H0 + 59_000)
    f.fold(B, 8.0, H0 + 60_100)
    f.clock.ms = H0 + 60_500  # 0.5 s into a minute: the previous one closes at +2 s
    await f.start("1m")
    keys = {(k[0], k[3]) for k in f.view}
    assert keys == {(A, H0), ("all", H0), (B, H0 + 60_000), ("all", H0 + 60_000)}
    assert not any(e["closed"] for e in f.view.values())
    f.step(1000)
    assert f.sent == []  # nothing changed
    f.step(1000)  # H0 + 62.5 s: the first minute's end + grace has passed
    assert {(e["exchange"], e["t"], e["closed"]) for e in f.sent} == {
        (A, H0, True),
        ("all", H0, True),
    }
    f.fold(A, 9.0, H0 + 59_500)  # a late tick changes the closed candle: sent again
    f.step(100)
    assert {(e["exchange"], e["count"], e["closed"]) for e in f.sent} == {
        (A, 2, True),
        ("all", 2, True),
    }
    await f.check("1m", H0)


async def test_a_closed_candle_changed_by_a_late_tick_keeps_its_older_minutes() -> None:
    hour = H0 - 3_600_000
    f = Following(H0 - 90_000)
    f.store.upsert([MinuteRow(A, SYM, hour, 3, 30.0, 10.0, 10.0, 10.0, 10.0)])  # an earlier run
    await f.start("1h")
    f.fold(A, 11.0, H0 - 80_000)
    f.step(83_000)  # H0 - 7 s
    f.step(10_000)  # H0 + 3 s: the hour is closed
    assert [(e["t"], e["closed"]) for e in f.sent if e["exchange"] == A] == [(hour, True)]
    f.fold(A, 12.0, H0 - 500)  # late, into the hour's last (still held) minute
    f.step(100)
    candle = await f.check("1h", hour)
    assert (candle["count"], candle["close"], candle["closed"]) == (5, 12.0, True)


async def test_a_key_restored_afresh_by_a_take_over_is_followed_again() -> None:
    """The source is given up and taken over again (as after another holder's turn): its keys'
    states are new objects, restored from the stored rows. The book follows the new ones and
    reads the pairs again; the candles stay equal to REST's."""
    f = Following(H0 + 30_000)
    await f.start("15s", "1m", "1h")
    for i in range(6):
        f.fold(A, 10.0 + i, f.clock.ms)
        f.step(10_000)
    node = f.node
    assert node.ingest is not None
    f.store.upsert(node.state.take_minutes(None))  # written, as before a source is let go
    before = node.state.keys[(A, SYM)]
    node.ingest.give_up(A)
    await node.ingest.take_over(A, 0)
    assert node.state.keys[(A, SYM)] is not before
    f.fold(A, 50.0, f.clock.ms)  # into the restored state
    reloads = f.book.reloads
    async with trio.open_nursery() as nursery:
        nursery.start_soon(f.book.keep_exact)
        f.step(100)  # the book notices the new state
        with trio.fail_after(5):
            while f.book.reloads < reloads + 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    f.step(100)
    minute = f.clock.ms // MINUTE_MS * MINUTE_MS
    assert (await f.check("1m", minute))["high"] == 50.0
    hour = await f.check("1h", H0)
    assert (hour["count"], hour["high"]) == (7, 50.0)
