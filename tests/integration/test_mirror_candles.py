"""Live candles on a mirror (role api) against a real Redis: the candle book follows the state a
mirror fills from `updates` messages and full reads, and a client applying its snapshot and
every step's changes holds, at every step, the candles the mirror's REST answers — which are
the ingesting state's own. Across a lost subscription (the mirror misses minutes that are
written and pruned meanwhile, then reads everything again) too."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from marketflow.candles import INTERVALS, MINUTE_MS, align_up, candle_answer
from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.live import KeyMeta, encode_update
from marketflow.live_candles import CandleBook, CandleKey
from marketflow.metrics import Metrics
from marketflow.minute_reader import MinuteReader
from marketflow.mirror import Mirror
from marketflow.models import MinuteRow, Mode
from marketflow.queries import QueryError
from marketflow.restore import merge_restored
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.redis import RedisPriceStore
from tests.procs import redis_prefix

SYM = "BTCUSDT"
A, B = "ex1", "ex2"
SOURCES = [A, B]
KEYS = [(s, SYM) for s in SOURCES]
WINDOW = 120
GRACE = 2000
H0 = 1_795_392_000_000  # Monday 2026-11-23 00:00:00 UTC
START = H0 + 20 * MINUTE_MS + 30_000  # 20.5 minutes into an hour
LABELS = ((A, [A]), (B, [B]), ("all", SOURCES))


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


def redis(prefix: str) -> RedisPriceStore:
    return RedisPriceStore(
        RedisConfig(key_prefix=prefix, timeout_ms=1000), window_seconds=WINDOW, ttl_seconds=70
    )


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


class View:
    """A read port over one state, the shared stored minutes and the test's clock."""

    fallback = False
    fresh_ms = 70_000

    def __init__(self, state: MarketState, rows: MemoryAggregateStore, clock: Clock) -> None:
        self.state = state
        self.stored = MinuteReader(rows, StoreHealth("postgres"), ttl_s=0.0)
        self.clock = clock

    def sources(self) -> list[str]:
        return SOURCES

    def now(self) -> float:
        return self.clock()


async def rest(view: View, sources: list[str], interval: str, start: int) -> dict[int, Any]:
    try:
        body = await candle_answer(
            view,
            symbol=SYM,
            sources=sources,
            exchange_label="all" if len(sources) > 1 else sources[0],
            interval=interval,
            start=start,
            end=None,
            limit=1000,
            now=view.now(),
            window_seconds=WINDOW,
            grace_ms=GRACE,
        )
    except QueryError as exc:  # a sub-minute range now wholly before the window
        assert exc.status == 400
        return {}
    return {c["t"]: c for c in body["candles"]}


class Rig:
    """An ingesting state flushed to Redis, a mirror of it, and a book following the mirror."""

    def __init__(self, prefix: str) -> None:
        self.clock = Clock(START)
        self.rows = MemoryAggregateStore()
        self.owner = MarketState(WINDOW)
        self.flusher = RedisFlusher(
            self.owner,
            redis(prefix),
            StoreHealth("redis"),
            Metrics(),
            interval_s=0.1,
            clock=self.clock,
        )
        self.mirrored = MarketState(WINDOW, owned_by_default=False)  # as in role api
        self.mirror = Mirror(
            self.mirrored, redis(prefix), StoreHealth("redis"), KEYS, mode=Mode.TEST
        )
        mirror_view = View(self.mirrored, self.rows, self.clock)
        self.book = CandleBook(
            self.mirrored,
            mirror_view.stored,
            all_sources=SOURCES,
            grace_ms=GRACE,
            clock=self.clock,
        )
        self.mirror.on_reload = self.book.reload
        self.views = (mirror_view, View(self.owner, self.rows, self.clock))
        self.client: dict[CandleKey, dict[str, Any]] = {}
        self.rng = random.Random(7)

    def apply(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            self.client[(e["exchange"], e["symbol"], e["interval"], e["t"])] = e

    def ticks(self, n: int) -> None:
        """`n` ticks on both sources, up to 30 s old (well within the clock skew a feed may
        have), some in the same second."""
        for _ in range(n):
            source = self.rng.choice(SOURCES)
            ts = self.clock.ms - self.rng.choice([0, 0, 250, 1_000, 5_000, 30_000])
            self.owner.key(source, SYM).fold([(SYM, self.rng.randrange(180, 220) / 2, ts)])

    async def advance(self, ms: int) -> None:
        """Time passes: the aggregator writes and prunes, the flusher flushes."""
        self.clock.ms += ms
        self.rows.upsert(self.owner.take_minutes(self.clock.ms - GRACE))
        self.owner.prune(self.clock.ms // 1000)
        assert await self.flusher.flush()

    async def mirrored_all(self) -> None:
        with trio.fail_after(10):
            while self.mirror._last_seq.get(self.flusher.instance) != self.flusher.seq:
                await trio.sleep(0.01)

    async def check(self) -> None:
        """The client's candles equal the mirror's REST, which equals the owner's."""
        now_ms = self.clock.ms
        for (symbol, iv), series in self.book.series.items():
            name = series.name
            lowest = series.first_t
            if iv < MINUTE_MS:  # REST answers sub-minute candles inside the window only
                lowest = max(lowest, align_up((now_ms // 1000 - WINDOW + 1) * 1000, iv))
            for label, sources in LABELS:
                want, owners = [await rest(v, sources, name, lowest) for v in self.views]
                assert want == owners, (label, name, now_ms)
                have = {
                    t: {k: v for k, v in e.items() if k not in ("symbol", "exchange", "interval")}
                    for (ex, sym, n, t), e in self.client.items()
                    if ex == label and sym == symbol and n == name and t >= lowest
                }
                assert have == want, (label, name, now_ms)


async def test_a_client_of_a_mirror_holds_the_mirrors_rest_candles(prefix: str) -> None:
    rig = Rig(prefix)
    # An earlier run's minutes of this hour, only PostgreSQL holds them.
    for minute in (5, 12):
        m = H0 + minute * MINUTE_MS
        rig.rows.upsert([MinuteRow(A, SYM, m, 2, 200.0, 99.0, 101.0, 99.0, 101.0)])
    horizon = (START // 1000 - WINDOW) // 60 * 60 + 60
    merge_restored(rig.owner, KEYS, horizon, {}, {}, {})
    rig.ticks(20)
    assert await rig.flusher.flush()  # the first after a restore: windows whole, resync
    pairs = [(SYM, INTERVALS[name]) for name in ("15s", "1m", "1h")]
    async with trio.open_nursery() as nursery:

        async def mirror_run(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as own:
                task_status.started(own)
                await rig.mirror.run()

        scope = await nursery.start(mirror_run)
        nursery.start_soon(rig.book.keep_exact)
        with trio.fail_after(10):
            while not rig.mirror.current:
                await trio.sleep(0.01)
        await rig.book.acquire(pairs)
        ivs = [iv for _, iv in pairs]
        rig.apply(rig.book.snapshot([SYM], SOURCES, ivs, SOURCES, rig.clock.ms))
        rig.apply(list(rig.book.step(rig.clock.ms, SOURCES).values()))
        await rig.check()

        # Three minutes of steps: minutes close, are written, and leave memory (here and on the
        # mirror, by the owner's horizon in its meta).
        for _ in range(20):
            rig.ticks(rig.rng.randrange(0, 8))
            await rig.advance(rig.rng.randrange(2_000, 15_000))
            await rig.mirrored_all()
            rig.apply(list(rig.book.step(rig.clock.ms, SOURCES).values()))
            await rig.check()
        assert rig.mirrored.keys[(A, SYM)].horizon_s > horizon  # the mirror followed the prunes

        # The mirror loses its subscription for four minutes: the ticks of those minutes are
        # written and pruned before it reads everything again.
        scope.cancel()
        missed = rig.clock.ms
        for _ in range(16):
            rig.ticks(5)
            await rig.advance(15_000)
            rig.apply(list(rig.book.step(rig.clock.ms, SOURCES).values()))
        assert rig.owner.keys[(A, SYM)].horizon_s * 1000 > missed  # pruned meanwhile
        reloads = rig.book.reloads
        await nursery.start(mirror_run)
        with trio.fail_after(10):
            while rig.book.reloads < reloads + len(pairs):  # read again, every pair
                await trio.sleep(0.01)
        rig.apply(list(rig.book.step(rig.clock.ms, SOURCES).values()))
        await rig.check()
        for _ in range(4):
            rig.ticks(4)
            await rig.advance(5_000)
            await rig.mirrored_all()
            rig.apply(list(rig.book.step(rig.clock.ms, SOURCES).values()))
            await rig.check()
        nursery.cancel_scope.cancel()


def test_a_mirror_keeps_seconds_the_book_has_not_taken_below_a_new_horizon() -> None:
    """The owner's horizon arrives while the book has not yet taken a second's change below it:
    the mirror keeps that minute (and its resumed row) until the book has, then follows."""
    state = MarketState(WINDOW, owned_by_default=False)
    mirror = Mirror(state, None, StoreHealth("redis"), KEYS, mode=Mode.TEST)  # type: ignore[arg-type]
    m0 = START // MINUTE_MS  # a minute number
    base = [3, 30.0, 9.0, 11.0, 9.0, 11.0, m0 * MINUTE_MS + 1, m0 * MINUTE_MS + 2]
    st = state.key(A, SYM)
    st.live_dirty = set()  # the book follows this key
    second = m0 * 60 + 5
    mirror.apply_messages(
        [
            encode_update(
                instance="i",
                seq=1,
                mode="test",
                buckets=[((A, SYM), second, [1, 10.0, 10.0, 10.0, 10.0, 10.0, 0, 0])],
                meta=[KeyMeta(A, SYM, m0 * MINUTE_MS, ((m0 * MINUTE_MS, base),))],
            )
        ]
    )
    assert st.live_dirty == {second, m0 * 60}  # the bucket, and the resumed minute
    # The owner pruned minute m0: its horizon is the next minute. The book has not stepped.
    pruned = KeyMeta(A, SYM, (m0 + 1) * MINUTE_MS, ())
    mirror.apply_messages([encode_update(instance="i", seq=2, mode="test", meta=[pruned])])
    assert st.horizon_s == m0 * 60 and second in st.buckets and m0 in st.minute_base
    st.live_dirty = set()  # the book took the changes
    mirror.apply_messages([encode_update(instance="i", seq=3, mode="test")])  # any later update
    assert st.horizon_s == (m0 + 1) * 60 and not st.buckets and not st.minute_base
    assert st.live_dirty == set()  # dropping what the book has seen is no change to it
