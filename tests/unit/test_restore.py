"""Restore at start: it waits for PostgreSQL as long as it takes, and a minute resumed from its
stored row keeps that row's totals and tick times."""

from __future__ import annotations

from functools import partial

import trio

from marketflow.health import StoreHealth
from marketflow.models import MinuteRow
from marketflow.restore import merge_restored, prepare_postgres, restore
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from tests.unit.node_fakes import NullPriceStore

NOW_S = 1_795_646_430  # 30 s into a minute
M = (NOW_S // 60) * 60_000  # that minute, ms
KEY = ("ex", "BTCUSDT")
ROW = MinuteRow(
    "ex", "BTCUSDT", M, 3, 30.0, 9.0, 11.0, 10.0, 9.5, open_ms=M + 1_250, close_ms=M + 20_004
)


class UnreachableFor(MemoryAggregateStore):
    """Refuses `migrate` and reads the first `failures` times, as a PostgreSQL still starting
    would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _refuse(self) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection refused")

    def migrate(self) -> None:
        self._refuse()
        super().migrate()

    def rows(self, exchange: str, symbol: str, from_ms: int, to_ms: int) -> list[MinuteRow]:
        self._refuse()
        return super().rows(exchange, symbol, from_ms, to_ms)


async def test_prepare_waits_for_migrations_however_long(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Migrations run outside any deadline: retried with backoff until PostgreSQL answers,
    showing its error meanwhile (the node is `starting`, no source runs)."""
    store = UnreachableFor(failures=6)  # backoff 0.5, 1, 2, 4, 8, 10 s: ~25 s of waiting
    health = StoreHealth("postgres")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:  # no fail_after: see the test below
        nursery.start_soon(
            partial(
                prepare_postgres,
                store,
                replay_journal=partial(_true),
                postgres_health=health,
                limiter=trio.CapacityLimiter(1),
            )
        )
        for _ in range(10_000):
            if health.error == "ConnectionError: connection refused":
                break
            await trio.sleep(0.1)
        assert not health.up
    assert trio.current_time() - started > 20
    assert store.migrated and health.up


async def _true() -> bool:
    return True


async def test_restore_waits_for_postgres_however_long_then_resumes_the_stored_row(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Guards the restore cut short: it ran under a 5 s deadline, so a PostgreSQL (or a
    migration) slower than that skipped reading the open minutes' rows, and the minute was
    later overwritten by a row of the ticks after the restart alone. Now it retries, with no
    deadline, showing PostgreSQL's error meanwhile, until the rows are read and merged."""
    store = UnreachableFor(failures=6)  # backoff 0.5, 1, 2, 4, 8, 10 s: ~25 s of waiting
    store.upsert([ROW])
    state = MarketState(300)
    health = StoreHealth("postgres")
    replays = 0

    async def replay_journal() -> bool:
        nonlocal replays
        replays += 1
        return True

    async def run() -> None:
        await restore(
            state,
            [KEY],
            now_s=NOW_S,
            window_seconds=300,
            price_store=NullPriceStore(),
            aggregate_store=store,
            replay_journal=replay_journal,
            postgres_health=health,
            redis_limiter=trio.CapacityLimiter(1),
            postgres_limiter=trio.CapacityLimiter(1),
        )

    started = trio.current_time()
    # No fail_after: the autojump clock would jump to its deadline while a thread call runs.
    # The wait is bounded by the number of polls instead.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        for _ in range(10_000):
            if health.error == "ConnectionError: connection refused":
                break
            await trio.sleep(0.1)
        assert not health.up and not state.key(*KEY).minute_base  # waiting, nothing resumed
    assert trio.current_time() - started > 20
    assert replays >= 1 and health.up
    assert state.key(*KEY).minute_base == {M // 60_000: ROW.as_bucket()}


async def test_restore_waits_until_the_journal_of_the_previous_run_is_replayed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The stored rows are read only once the previous run's journal is in PostgreSQL: a
    journaled minute read from PostgreSQL before its replay would resume without its ticks."""
    store = MemoryAggregateStore()
    state = MarketState(300)
    health = StoreHealth("postgres")
    attempts = 0

    async def replay_journal() -> bool:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            health.write_failed(ConnectionError("server closed the connection"))
            return False
        store.upsert([ROW])  # the journaled row lands with the replay
        return True

    await restore(
        state,
        [KEY],
        now_s=NOW_S,
        window_seconds=300,
        price_store=NullPriceStore(),
        aggregate_store=store,
        replay_journal=replay_journal,
        postgres_health=health,
        redis_limiter=trio.CapacityLimiter(1),
        postgres_limiter=trio.CapacityLimiter(1),
    )
    assert attempts == 3 and health.up
    assert state.key(*KEY).minute_base == {M // 60_000: ROW.as_bucket()}


def test_a_minute_resumed_from_its_row_keeps_its_tick_times() -> None:
    """The row's first and last tick times survive the restart: a later tick after the row's
    close moves the close, an earlier one than its open moves the open, and neither is lost."""
    state = MarketState(300)
    merge_restored(state, [KEY], (NOW_S // 60 - 4) * 60, {}, {}, {KEY: {M // 60_000: ROW}})
    st = state.key(*KEY)
    row = st.minute_row(M // 60_000)
    assert row == ROW
    st.fold([("BTCUSDT", 12.0, M + 25_000)])
    row = st.minute_row(M // 60_000)
    assert row is not None
    assert (row.count, row.open, row.open_ms, row.close, row.close_ms) == (
        4,
        10.0,
        M + 1_250,
        12.0,
        M + 25_000,
    )
    st.fold([("BTCUSDT", 8.0, M + 1_000)])
    row = st.minute_row(M // 60_000)
    assert row is not None
    assert (row.count, row.low, row.open, row.open_ms, row.close_ms) == (
        5,
        8.0,
        8.0,
        M + 1_000,
        M + 25_000,
    )
