"""The aggregator with injected time: Trio's MockClock for sleeps, a fake wall clock for minutes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

from marketflow.aggregation import REPLAY_CHUNK_ROWS, Aggregator
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
    tmp_path: Path,
    wall: Wall,
    batch: int = 2,
    *,
    store: MemoryAggregateStore | None = None,
    pending_rows_max: int = 1_000_000,
) -> tuple[MarketState, Aggregator, MemoryAggregateStore, FileJournal]:
    state = MarketState(window_seconds=300)
    found = store if store is not None else MemoryAggregateStore()
    journal = FileJournal(tmp_path / "journal.ndjson")
    agg = Aggregator(
        state,
        found,
        journal,
        StoreHealth("postgres"),
        Metrics(),
        grace_ms=2000,
        batch_size=batch,
        pending_rows_max=pending_rows_max,
        retry_cap_s=4,
        clock=wall,
    )
    return state, agg, found, journal


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


# --- exactly once at shutdown, bounded memory, a replay that respects the deadline ------------

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "TONUSDT", "DOGEUSDT", "XRPUSDT"]


class GatedStore(MemoryAggregateStore):
    """Holds its `gate_at`-th upsert in its thread until `release` is set: a slow batch in
    flight when a cancellation comes."""

    def __init__(self, gate_at: int) -> None:
        super().__init__()
        self.gate_at = gate_at
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        self.calls += 1
        if self.calls == self.gate_at:
            self.entered.set()
            self.release.wait(10)
        return super().upsert(rows)


class SlowStore(MemoryAggregateStore):
    """Every upsert takes `delay_s` (a slow or distant PostgreSQL)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        time.sleep(self.delay_s)
        return super().upsert(rows)


def broken_append(rows: object) -> None:
    raise OSError(28, "No space left on device")


async def test_a_write_cancelled_between_batches_puts_every_unwritten_row_back(
    tmp_path: Path,
) -> None:
    """Guards the shutdown loss: `take_minutes` clears the dirty flags before the write, so a
    write of more than `db_batch_size` rows cancelled between two batches dropped the batches
    after it. Now the batch in flight finishes and every row not confirmed is dirty again."""
    wall = Wall(M0 + 63_000)
    store = GatedStore(gate_at=2)
    state, agg, _, _ = make(tmp_path, wall, batch=2, store=store)
    for i, symbol in enumerate(SYMBOLS):
        fold(state, "ex", symbol, (10.0 + i, M0 + 1000))
    rows = state.take_minutes(None)
    assert len(rows) == 6 and state.oldest_dirty_minute() is None
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agg.write, rows)
            await trio.to_thread.run_sync(store.entered.wait)  # the second batch is in flight
            scope.cancel()
            store.release.set()
    assert scope.cancelled_caught
    written = {key[1] for key in store.data}
    dirty = {symbol for (_, symbol), st in state.keys.items() if st.minutes_dirty}
    assert len(written) == 4  # the first batch, and the second: it was in flight, it finished
    assert written | dirty == set(SYMBOLS)  # the third is dirty again: nothing dropped
    await agg.write(state.take_minutes(None))
    assert {key[1] for key in store.data} == set(SYMBOLS)


async def test_a_batch_neither_store_takes_comes_back_dirty_and_the_others_land(
    tmp_path: Path,
) -> None:
    """The second batch fails on PostgreSQL and on the journal (a full disk): its rows stay
    dirty in memory, counted as unwritable; the batches around it are committed."""

    class FailsSecond(MemoryAggregateStore):
        calls = 0

        def upsert(self, rows: Sequence[MinuteRow]) -> int:
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("server closed the connection unexpectedly")
            return super().upsert(rows)

    wall = Wall(M0 + 63_000)
    state, agg, store, journal = make(tmp_path, wall, batch=2, store=FailsSecond())
    journal.append = broken_append  # type: ignore[method-assign]
    for i, symbol in enumerate(SYMBOLS):
        fold(state, "ex", symbol, (10.0 + i, M0 + 1000))
    await agg.step()
    written = {key[1] for key in store.data}
    dirty = {symbol for (_, symbol), st in state.keys.items() if st.minutes_dirty}
    assert len(written) == 4 and len(dirty) == 2 and written | dirty == set(SYMBOLS)
    assert agg.unwritable_rows == 2 and agg.pending_rows == 0
    await agg.step()
    assert {key[1] for key in store.data} == set(SYMBOLS) and agg.unwritable_rows == 0


async def test_pending_rows_max_refuses_new_minutes_loudly_until_rows_are_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards `pending_rows_max`, which bounded nothing: while neither PostgreSQL nor the
    journal takes rows they stay in memory, and once that many are held, ticks that would open
    a new minute are refused (logged at ERROR) while held minutes still take theirs; once rows
    are written again, new minutes are accepted."""
    wall = Wall(M0 + 63_000)
    state, agg, store, journal = make(tmp_path, wall, batch=2, pending_rows_max=3)
    store.fail_with = ConnectionError("connection refused")
    journal.append = broken_append  # type: ignore[method-assign]
    for symbol in SYMBOLS[:2]:
        fold(state, "ex", symbol, (1.0, M0 + 1000))
    await agg.step()
    assert agg.unwritable_rows == 2 and not state.refuse_new_minutes  # under the bound
    fold(state, "ex", SYMBOLS[2], (1.0, M0 + 1000))
    with caplog.at_level(logging.INFO, "marketflow.aggregator"):
        await agg.step()
        assert agg.unwritable_rows == 3 and state.refuse_new_minutes
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any("pending_rows_max reached" in r.getMessage() for r in errors)
        btc = state.key("ex", "BTCUSDT")
        refuse = state.refuse_new_minutes
        assert btc.fold([("BTCUSDT", 2.0, M0 + 2000)], refuse) == (0, 0)  # a held minute
        assert btc.fold([("BTCUSDT", 3.0, M0 + 60_500)], refuse) == (0, 1)  # a new minute
        fresh = state.key("ex", "XRPUSDT")  # nothing held at all
        assert fresh.fold([("XRPUSDT", 4.0, M0 + 1000)], refuse) == (0, 1)
        assert M0 // 60_000 + 1 not in btc.held_minutes() and not fresh.buckets
        store.fail_with = None
        await agg.step()
        assert not state.refuse_new_minutes and agg.unwritable_rows == 0
        assert any("new minutes accepted" in r.getMessage() for r in caplog.records)
    assert store.data[("ex", "BTCUSDT", M0)].count == 2
    assert btc.fold([("BTCUSDT", 3.0, M0 + 60_500)], state.refuse_new_minutes) == (0, 0)


def journal_rows(journal: FileJournal, count: int, per_batch: int = 1000) -> None:
    """`count` distinct rows of an earlier outage, appended in batches."""
    for start in range(0, count, per_batch):
        journal.append(
            [
                MinuteRow(
                    "old", f"S{i % 50}", M0 - (i // 50 + 1) * 60_000, 1, 1.0, 1.0, 1.0, 1.0, 1.0
                )
                for i in range(start, min(count, start + per_batch))
            ]
        )


async def test_a_long_replay_stops_at_the_shutdown_deadline_and_the_rest_replays_at_the_next_start(
    tmp_path: Path,
) -> None:
    """Guards two shutdown defects: the journal was replayed in one go, holding a shutdown past
    `shutdown_timeout_s`; and the shutdown wrote its own rows (the open minutes) only after
    that replay, so a replay cut at the deadline lost them. Now the open minutes go first (to
    the journal, behind the older rows), the replay stops between chunks at the deadline, and
    the next start replays everything."""
    wall = Wall(M0 + 63_000)
    slow = SlowStore(0.5)  # per chunk of REPLAY_CHUNK_ROWS: the whole journal takes 3 s
    state, agg, _, journal = make(tmp_path, wall, store=slow)
    count = 6 * REPLAY_CHUNK_ROWS
    journal_rows(journal, count)
    await agg.open_journal()
    assert agg.pending_rows == count
    fold(state, "ex", "BTCUSDT", (7.0, M0 + 61_000))  # the open minute at shutdown
    started = time.monotonic()
    with trio.move_on_after(0.2):
        await agg.flush_all()
    took = time.monotonic() - started
    assert took < 2.0, f"shutdown held {took:.1f}s by the replay"
    assert 0 < len(slow.data) < count
    # The next start, on the same journal file.
    _, agg2, store2, _ = make(tmp_path, wall)
    await agg2.open_journal()
    assert await agg2.replay_if_due(force=True)
    assert len(store2.data) == count + 1
    assert store2.data[("ex", "BTCUSDT", M0 + 60_000)].count == 1
    assert agg2.pending_rows == 0 and len(agg2.journal) == 0


async def test_journaled_minutes_stay_unwritten_until_the_whole_replay_committed(
    tmp_path: Path,
) -> None:
    """Guards silent omissions: a journaled minute is pruned from memory after
    `window_seconds` and PostgreSQL does not hold it yet. The aggregator names, per key, the
    oldest journaled minute until the replay has committed every row — also while a replay of
    several chunks is half done and PostgreSQL already reports healthy — so reads can refuse
    (503) rather than answer without it."""
    wall = Wall(M0 + 63_000)
    slow = SlowStore(1.1)  # longer than one replay slice (1 s): two thread calls
    state, agg, _, _ = make(tmp_path, wall, batch=200, store=slow)
    slow.fail_with = ConnectionError("connection refused")
    symbols = [f"S{i}" for i in range(100)]
    for symbol in symbols:
        for back in range(60):
            fold(state, "ex", symbol, (1.0, M0 - back * 60_000 + 1000))
    await agg.step()
    assert agg.pending_rows == 6000 > REPLAY_CHUNK_ROWS
    assert agg.journaled_from == {("ex", s): M0 - 59 * 60_000 for s in symbols}
    slow.fail_with = None
    seen_half_done = False
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(agg.replay_if_due, force=True))
            while agg.pending_rows:
                if slow.data and agg.health.up:
                    seen_half_done = True
                    assert agg.journaled_from[("ex", "S0")] == M0 - 59 * 60_000
                await trio.sleep(0.01)
    assert seen_half_done
    assert agg.journaled_from == {} and len(slow.data) == 6000
