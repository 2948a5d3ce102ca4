"""The mirror (role api) against a real Redis: the state an ingesting process flushes, mirrored
by full reads and `updates` messages, answers every question exactly as the ingesting state does
— a minute resumed from its stored row included."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.minute_reader import MinuteReader
from marketflow.mirror import Mirror
from marketflow.models import MinuteRow, Mode
from marketflow.queries import ALL_HISTORY, Period, latest_across, statistic
from marketflow.restore import merge_restored
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.redis import RedisPriceStore
from tests.procs import redis_prefix

NOW_S = 1_795_646_490  # 30 s into a minute
NOW_MS = NOW_S * 1000
MINUTE = NOW_S // 60
SOURCES = ["ex1", "ex2"]
SYMBOLS = ["BTCUSDT", "ETHUSDT"]
KEYS = [(s, y) for s in SOURCES for y in SYMBOLS]


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


def store(prefix: str) -> RedisPriceStore:
    return RedisPriceStore(
        RedisConfig(key_prefix=prefix, timeout_ms=1000), window_seconds=300, ttl_seconds=70
    )


class View:
    """A read port over one state and the shared stored minutes."""

    fallback = False
    fresh_ms = 70_000

    def __init__(self, state: MarketState, rows: MemoryAggregateStore) -> None:
        self.state = state
        self.stored = MinuteReader(rows, StoreHealth("postgres"), ttl_s=0.0)

    def sources(self) -> list[str]:
        return SOURCES

    def now(self) -> float:
        return NOW_S + 0.5


def random_ticks(rng: random.Random, n: int) -> list[tuple[str, str, float, int]]:
    """Ticks over the last four minutes, out of order, on every key."""
    out = []
    for _ in range(n):
        source, symbol = rng.choice(KEYS)
        ts = NOW_MS - rng.randrange(0, 4 * 60_000)
        out.append((source, symbol, round(rng.uniform(90, 110), 2), ts))
    return out


def fold(state: MarketState, ticks: list[tuple[str, str, float, int]]) -> None:
    for source, symbol, price, ts in ticks:
        state.key(source, symbol).fold([(symbol, price, ts)])


async def answers(view: View) -> list[Any]:
    out: list[Any] = [latest_across(view.state, SOURCES, s) for s in SYMBOLS]
    for period in (Period("10s", 10), Period("2m", 120), Period("10m", 600), ALL_HISTORY):
        for stat in ("highest", "lowest", "average"):
            for sources, label in ((SOURCES, "all"), (["ex2"], "ex2")):
                out.append(
                    await statistic(
                        view,
                        stat=stat,  # type: ignore[arg-type]
                        symbol="BTCUSDT",
                        sources=sources,
                        exchange_label=label,
                        period=period,
                        now=view.now(),
                        window_seconds=300,
                    )
                )
    return out


async def test_both_ways_of_filling_the_state_answer_identically(prefix: str) -> None:
    rng = random.Random(11)
    rows = MemoryAggregateStore()
    # An old minute only PostgreSQL holds, and a held minute resumed from its stored row.
    rows.upsert(
        [MinuteRow("ex2", "BTCUSDT", (MINUTE - 9) * 60_000, 3, 300.0, 99.0, 101.0, 99.0, 101.0)]
    )
    resumed = MinuteRow("ex1", "BTCUSDT", (MINUTE - 2) * 60_000, 7, 700.0, 50.0, 150.0, 60.0, 70.0)
    rows.upsert([resumed])
    ingesting = MarketState(window_seconds=300)
    horizon = (MINUTE - 4) * 60
    merge_restored(ingesting, KEYS, horizon, {}, {}, {("ex1", "BTCUSDT"): {MINUTE - 2: resumed}})
    writer = store(prefix)
    flusher = RedisFlusher(
        ingesting, writer, StoreHealth("redis"), Metrics(), interval_s=0.1, clock=lambda: NOW_S
    )
    fold(ingesting, random_ticks(rng, 300))
    assert await flusher.flush()  # the first flush after a restore: windows whole, resync

    mirrored = MarketState(window_seconds=300, owned_by_default=False)  # as in role api
    reader = store(prefix)
    mirror = Mirror(mirrored, reader, StoreHealth("redis"), KEYS, mode=Mode.TEST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        with trio.fail_after(10):
            while not mirror.current:
                await trio.sleep(0.01)
        # Now changes travel as `updates` messages: more ticks, late ones too, in a few flushes.
        for _ in range(5):
            fold(ingesting, random_ticks(rng, 100))
            assert await flusher.flush()
        want = flusher.seq
        with trio.fail_after(10):
            while mirror._last_seq.get(flusher.instance) != want:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert mirrored.keys[("ex1", "BTCUSDT")].minute_base == {
        MINUTE - 2: resumed.as_bucket()
    }  # the resumed row travelled as the key's meta
    assert await answers(View(mirrored, rows)) == await answers(View(ingesting, rows))
    assert mirror.reads >= 1


async def test_a_gap_in_seq_makes_the_mirror_read_everything_again(prefix: str) -> None:
    ingesting = MarketState(window_seconds=300)
    writer = store(prefix)
    flusher = RedisFlusher(
        ingesting, writer, StoreHealth("redis"), Metrics(), interval_s=0.1, clock=lambda: NOW_S
    )
    fold(ingesting, [("ex1", "BTCUSDT", 100.0, NOW_MS - 1000)])
    assert await flusher.flush()
    mirrored = MarketState(window_seconds=300, owned_by_default=False)  # as in role api
    mirror = Mirror(mirrored, store(prefix), StoreHealth("redis"), KEYS, mode=Mode.TEST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        with trio.fail_after(10):
            while not mirror.current:
                await trio.sleep(0.01)
        reads = mirror.reads
        fold(ingesting, [("ex1", "BTCUSDT", 101.0, NOW_MS - 900)])
        assert await flusher.flush()
        flusher.seq += 1  # a message the mirror never sees (as if lost on a reconnect)
        fold(ingesting, [("ex1", "BTCUSDT", 102.0, NOW_MS - 800)])
        assert await flusher.flush()
        with trio.fail_after(10):
            while mirror.reads == reads:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    st = mirrored.keys[("ex1", "BTCUSDT")]
    assert st.latest_price == 102.0 and sum(int(b[0]) for b in st.buckets.values()) == 3
