"""The aggregator with injected time: Trio's MockClock for sleeps, a fake wall clock for minutes."""

from __future__ import annotations

from pathlib import Path

import trio

from marketflow.aggregation import Aggregator
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.models import MinuteRow
from marketflow.state import MarketState
from marketflow.store.journal import FileJournal
from marketflow.store.memory import MemoryAggregateStore

M0 = 1_795_646_400_000  # a minute start, ms


class Wall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def make(
    tmp_path: Path, wall: Wall, batch: int = 2
) -> tuple[MarketState, Aggregator, MemoryAggregateStore, FileJournal]:
    state = MarketState(window_seconds=300)
    store = MemoryAggregateStore()
    journal = FileJournal(tmp_path / "journal.ndjson")
    agg = Aggregator(
        state,
        store,
        journal,
        StoreHealth("postgres"),
        Metrics(),
        grace_ms=2000,
        batch_size=batch,
        retry_cap_s=4,
        clock=wall,
    )
    return state, agg, store, journal


def fold(state: MarketState, source: str, symbol: str, *ticks: tuple[float, int]) -> None:
    state.key(source, symbol).fold([(symbol, p, ts) for p, ts in ticks])


async def test_minute_written_after_grace_in_batches(tmp_path: Path) -> None:
    wall = Wall(M0 + 60_000 + 1999)
    state, agg, store, _ = make(tmp_path, wall)
    for i, symbol in enumerate(["BTCUSDT", "ETHUSDT", "SOLUSDT"]):
        fold(state, "ex", symbol, (10.0 + i, M0 + 1000), (20.0 + i, M0 + 59_000))
    fold(state, "ex", "BTCUSDT", (99.0, M0 + 60_500))  # the next minute: still open
    await agg.step()
    assert store.data == {}  # grace not yet passed
    wall.ms += 1
    await agg.step()
    assert sorted(k[1] for k in store.data) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert [len(b) for b in store.batches] == [2, 1]  # db_batch_size = 2
    assert store.data[("ex", "BTCUSDT", M0)] == MinuteRow(
        "ex",
        "BTCUSDT",
        M0,
        2,
        30.0,
        10.0,
        20.0,
        10.0,
        20.0,
        open_ms=M0 + 1000,
        close_ms=M0 + 59_000,
    )
    await agg.flush_all()  # shutdown: the open minute too
    assert store.data[("ex", "BTCUSDT", M0 + 60_000)].count == 1


async def test_outage_journals_then_replays_in_order(
    tmp_path: Path, autojump_clock: object
) -> None:
    wall = Wall(M0 + 63_000)
    state, agg, store, journal = make(tmp_path, wall)
    store.fail_with = ConnectionError("down")
    fold(state, "ex", "BTCUSDT", (1.0, M0 + 1000))
    await agg.step()
    assert len(journal) == 1 and agg.pending_rows == 1 and not agg.health.up
    # The same minute again (a tick within the held buckets), still down: journaled after.
    fold(state, "ex", "BTCUSDT", (3.0, M0 + 2000))
    await agg.step()
    assert len(journal) == 2
    store.fail_with = None
    await agg.step()  # before the backoff delay: nothing retried yet
    assert store.data == {}
    await trio.sleep(5)
    await agg.step()
    assert len(journal) == 0 and agg.pending_rows == 0 and agg.health.up
    # Replayed in order: the later, fuller row is the one that stays.
    assert store.data[("ex", "BTCUSDT", M0)].count == 2
    assert store.data[("ex", "BTCUSDT", M0)].total == 4.0


async def test_new_rows_wait_behind_the_journal(tmp_path: Path, autojump_clock: object) -> None:
    wall = Wall(M0 + 63_000)
    state, agg, store, journal = make(tmp_path, wall)
    store.fail_with = ConnectionError("down")
    fold(state, "ex", "BTCUSDT", (1.0, M0))
    await agg.step()
    store.fail_with = None
    fold(state, "ex", "BTCUSDT", (5.0, M0 + 70_000))
    wall.ms = M0 + 123_000
    await agg.step()  # retry not yet due: the newer row is journaled too, behind the older
    assert len(journal) == 2 and store.data == {}
    await trio.sleep(5)
    await agg.step()
    assert {k[2] for k in store.data} == {M0, M0 + 60_000}


async def test_run_loop_uses_trio_time(tmp_path: Path, autojump_clock: object) -> None:
    wall = Wall(M0 + 30_000)
    state, agg, store, _ = make(tmp_path, wall)
    fold(state, "ex", "BTCUSDT", (1.0, M0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agg.run)
        await trio.sleep(10)
        assert store.data == {}
        wall.ms = M0 + 62_000
        # The write runs in a worker thread, which virtual time does not wait for: poll.
        for _ in range(100_000):
            if store.data:
                break
            await trio.sleep(0.01)
        assert list(store.data) == [("ex", "BTCUSDT", M0)]
        nursery.cancel_scope.cancel()


async def test_unwritable_journal_keeps_minutes_in_memory(tmp_path: Path) -> None:
    wall = Wall(M0 + 63_000)
    state, agg, store, journal = make(tmp_path, wall)
    store.fail_with = ConnectionError("down")

    def broken(rows: object) -> None:
        raise OSError("disk full")

    journal.append = broken  # type: ignore[method-assign]
    fold(state, "ex", "BTCUSDT", (1.0, M0))
    await agg.step()
    assert state.key("ex", "BTCUSDT").minutes_dirty == {M0 // 60_000}
