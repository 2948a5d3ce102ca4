"""The read side of the API: names, periods, resolution, and how stores are combined."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from marketflow.config import Config, build_config
from marketflow.health import StoreHealth
from marketflow.minute_reader import MinuteReader
from marketflow.models import MinuteRow, StoreRange, Tick
from marketflow.ports import AggregateStore
from marketflow.queries import (
    ALL_HISTORY,
    Catalog,
    Period,
    QueryError,
    Stat,
    latest_across,
    latest_for_source,
    plan_range,
    rfc3339,
    statistic,
)
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore

SYM = "BTCUSDT"
A, B, C = "test-exchange1", "test-exchange2", "test-exchange3"
# A wall-clock "now" 30.5 s into a minute.
MINUTE = 29_927_441  # a minute number (ms = MINUTE * 60_000)
NOW = MINUTE * 60 + 30.5
NOW_MS = int(NOW * 1000)
NOW_S = int(NOW)


def config(**app: Any) -> Config:
    return build_config({"app": app})


class Ctx:
    """A read port (`ports.MarketView`) over a state and a store."""

    def __init__(self, state: MarketState, store: AggregateStore | None = None) -> None:
        self.state = state
        self.postgres_health = StoreHealth("postgres")
        # ttl 0: every question reaches the store here
        self.stored = MinuteReader(store or MemoryAggregateStore(), self.postgres_health, ttl_s=0.0)

    fallback = False
    fresh_ms = 70_000

    def sources(self) -> list[str]:
        return [A, B]

    def now(self) -> float:
        return NOW


def fold(state: MarketState, source: str, ticks: list[tuple[float, int]]) -> None:
    state.late += state.key(source, SYM).fold([(SYM, p, ts) for p, ts in ticks])[0]


async def ask(
    ctx: Ctx,
    stat: Stat,
    period: Period = ALL_HISTORY,
    sources: tuple[str, ...] = (A,),
    now: float = NOW,
    window: int = 300,
) -> dict[str, Any]:
    label = sources[0] if len(sources) == 1 else "all"
    return await statistic(
        ctx,
        stat=stat,
        symbol=SYM,
        sources=list(sources),
        exchange_label=label,
        period=period,
        now=now,
        window_seconds=window,
    )


# --- periods and names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "why"),
    [
        (["abc"], "expected whole numbers"),
        (["-1m"], "expected whole numbers"),
        (["0s"], "greater than zero"),
        (["0h0m"], "greater than zero"),
        (["1.5m"], "expected whole numbers"),
        (["10y"], "expected whole numbers"),
        (["1M"], "expected whole numbers"),
        (["5"], "expected whole numbers"),
        (["m"], "expected whole numbers"),
        ([" 1m"], "expected whole numbers"),
        (["1m "], "expected whole numbers"),
        (["1m\n"], "expected whole numbers"),
        (["\u0661m"], "expected whole numbers"),  # an Arabic-Indic 1 is not a period digit
        (["1m1m"], "each unit at most once"),
        (["99999999999d"], "longer than the maximum"),
        (["3651d"], "longer than the maximum"),
        (["9" * 70 + "s"], "expected whole numbers"),
        ([""], "empty"),
        (["1m", "2m"], "at most once"),
        (["1m", "1m"], "at most once"),
    ],
)
def test_bad_periods_are_400(values: list[str], why: str) -> None:
    with pytest.raises(QueryError) as info:
        Catalog(config()).period(values)
    assert info.value.status == 400
    assert why in info.value.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("30m1h", 5400),
        ("7d", 7 * 86400),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4),
        ("3650d", 3650 * 86400),
    ],
)
def test_good_periods(text: str, seconds: int) -> None:
    assert Catalog(config()).period([text]) == Period(text, seconds)


def test_no_period_is_all_history() -> None:
    assert Catalog(config()).period([]) == ALL_HISTORY == Period("all", None)


def test_max_period_is_configurable() -> None:
    catalog = Catalog(config(max_period="1h"))
    assert catalog.period(["60m"]).seconds == 3600
    with pytest.raises(QueryError, match="maximum \\(1h\\)"):
        catalog.period(["61m"])


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("btcusdt", None),
        ("BtcUsdt", None),
        ("BTCUSDT", None),
        ("XRPUSDT", 404),
        ("B", 400),
        ("A" * 21, 400),
        ("BTC-USDT", 400),
        ("BTC USDT", 400),
        ("BTCUSDT\n", 400),
        ("\uff22\uff34\uff23", 400),  # fullwidth BTC
        ("..", 400),
        ("", 400),
    ],
)
def test_symbol_names(raw: str, status: int | None) -> None:
    catalog = Catalog(config())
    if status is None:
        assert catalog.symbol(raw) == "BTCUSDT"
        return
    with pytest.raises(QueryError) as info:
        catalog.symbol(raw)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("exchange1", None),
        ("test-exchange3", None),
        ("exchange9", 404),
        ("Exchange1", 404),  # source names are case-sensitive, as configured
        ("a" * 33, 400),
        ("../..", 400),
        ("ex change", 400),
        ("exchange1\x00", 400),
        ("", 400),
    ],
)
def test_source_names(raw: str, status: int | None) -> None:
    catalog = Catalog(config())
    if status is None:
        assert catalog.source(raw) == raw
        return
    with pytest.raises(QueryError) as info:
        catalog.source(raw)
    assert info.value.status == status


def test_error_messages_do_not_echo_long_input() -> None:
    with pytest.raises(QueryError) as info:
        Catalog(config()).symbol("x" * 10_000)
    assert len(info.value.message) < 120


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_795_646_511_826) == "2026-11-25T22:41:51.826Z"
    assert rfc3339(1_700_000_000_007) == "2023-11-14T22:13:20.007Z"


# --- resolution ----------------------------------------------------------------------------


def test_period_up_to_the_window_reads_seconds() -> None:
    plan = plan_range(NOW, Period("5m", 300), window_seconds=300)
    assert plan.resolution == "1s"
    assert (plan.from_s, plan.to_s, plan.now_ms) == (NOW_S - 299, NOW_S, NOW_MS)


def test_longer_period_reads_minutes_from_the_one_holding_now_minus_p() -> None:
    plan = plan_range(NOW, Period("301s", 301), window_seconds=300)
    assert plan.resolution == "1m"
    assert plan.from_minute == (NOW_S - 301) // 60 == MINUTE - 5
    assert plan.to_minute == MINUTE


def test_all_history_reads_minutes() -> None:
    plan = plan_range(NOW, ALL_HISTORY, window_seconds=300)
    assert plan.resolution == "1m"
    assert plan.from_minute is None


# --- latest --------------------------------------------------------------------------------


def test_latest_is_the_newest_timestamp_not_the_last_arrival() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 100), (2.0, NOW_MS - 500)])
    assert latest_for_source(state, A, SYM)["price"] == 1.0


def test_latest_across_picks_the_freshest_and_lists_each_source() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 300)])
    fold(state, B, [(2.0, NOW_MS - 100)])
    fold(state, "exchange1", [(3.0, NOW_MS)])  # not a current-mode source
    answer = latest_across(state, [A, B, C], SYM)
    assert answer["exchange"] == B
    assert answer["price"] == 2.0
    assert answer["time"] == rfc3339(NOW_MS - 100)
    assert [s["exchange"] for s in answer["sources"]] == [A, B]


def test_latest_ties_go_to_the_first_source() -> None:
    state = MarketState(300)
    fold(state, B, [(2.0, NOW_MS)])
    fold(state, A, [(1.0, NOW_MS)])
    assert latest_across(state, [A, B], SYM)["exchange"] == A


def test_latest_without_a_price_is_404() -> None:
    state = MarketState(300)
    with pytest.raises(QueryError) as info:
        latest_across(state, [A, B], SYM)
    assert info.value.status == 404
    with pytest.raises(QueryError):
        latest_for_source(state, A, SYM)


# --- statistics from seconds ---------------------------------------------------------------


async def test_average_is_tick_weighted_across_sources() -> None:
    state = MarketState(300)
    fold(state, A, [(10.0, NOW_MS - 2000 + i) for i in range(10)])
    fold(state, B, [(20.0, NOW_MS - 2000)])
    answer = await ask(Ctx(state), "average", Period("1m", 60), sources=(A, B))
    assert answer["count"] == 11
    assert answer["price"] == pytest.approx(120 / 11)  # not (10 + 20) / 2
    assert answer["exchange"] == "all"


async def test_average_is_tick_weighted_across_seconds_and_minutes() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 70_000), (1.0, NOW_MS - 69_999), (1.0, NOW_MS - 69_998)])
    fold(state, A, [(5.0, NOW_MS - 1000)])
    for period in (Period("2m", 120), Period("1h", 3600), ALL_HISTORY):
        answer = await ask(Ctx(state), "average", period)
        assert answer["count"] == 4
        assert answer["price"] == 2.0  # not (1 + 5) / 2 = 3


async def test_seconds_answer_shape() -> None:
    state = MarketState(300)
    fold(state, A, [(100.0, NOW_MS - 10_000), (105.0, NOW_MS - 5_000), (99.0, NOW_MS - 3_000)])
    answer = await ask(Ctx(state), "highest", Period("30s", 30))
    assert answer == {
        "symbol": SYM,
        "exchange": A,
        "stat": "highest",
        "period": "30s",
        "from": rfc3339((NOW_S - 29) * 1000),
        "to": rfc3339(NOW_MS),
        "price": 105.0,
        "count": 3,
        "resolution": "1s",
        "at": (NOW_MS - 5_000) // 1000 * 1000,
        "at_exchange": A,
    }


async def test_seconds_count_the_current_partial_second_and_stop_at_now_minus_p_plus_1() -> None:
    state = MarketState(300)
    now_sec_start = NOW_S * 1000
    fold(state, A, [(1.0, now_sec_start + 1)])  # the current, partial second
    fold(state, A, [(2.0, (NOW_S - 9) * 1000)])  # second now-9: inside a 10 s period
    fold(state, A, [(3.0, (NOW_S - 10) * 1000 + 999)])  # second now-10: outside
    answer = await ask(Ctx(state), "average", Period("10s", 10))
    assert answer["count"] == 2
    assert answer["from"] == rfc3339((NOW_S - 9) * 1000)


async def test_highest_and_lowest_report_the_bucket_and_exchange() -> None:
    state = MarketState(300)
    fold(state, A, [(100.0, NOW_MS - 20_000), (90.0, NOW_MS - 10_000)])
    fold(state, B, [(110.0, NOW_MS - 15_000), (95.0, NOW_MS - 5_000)])
    high = await ask(Ctx(state), "highest", Period("1m", 60), sources=(A, B))
    low = await ask(Ctx(state), "lowest", Period("1m", 60), sources=(A, B))
    assert (high["price"], high["at"], high["at_exchange"]) == (
        110.0,
        (NOW_MS - 15_000) // 1000 * 1000,
        B,
    )
    assert (low["price"], low["at"], low["at_exchange"]) == (
        90.0,
        (NOW_MS - 10_000) // 1000 * 1000,
        A,
    )
    avg = await ask(Ctx(state), "average", Period("1m", 60), sources=(A, B))
    assert "at" not in avg and "at_exchange" not in avg


async def test_equal_extremes_go_to_the_earliest_bucket() -> None:
    state = MarketState(300)
    fold(state, B, [(7.0, NOW_MS - 3_000)])
    fold(state, A, [(7.0, NOW_MS - 9_000)])
    high = await ask(Ctx(state), "highest", Period("1m", 60), sources=(A, B))
    assert (high["at"], high["at_exchange"]) == ((NOW_MS - 9_000) // 1000 * 1000, A)


async def test_no_data_in_range_is_404() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 100_000)])
    with pytest.raises(QueryError) as info:
        await ask(Ctx(state), "highest", Period("1m", 60))
    assert info.value.status == 404
    assert "the last 1m" in info.value.message
    with pytest.raises(QueryError):
        await ask(Ctx(state), "highest", Period("1m", 60), sources=(B,))


async def test_seconds_after_a_restart_start_at_the_restored_horizon() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 1000)])
    horizon = (NOW_S - 100) // 60 * 60
    state.keys[(A, SYM)].horizon_s = horizon
    answer = await ask(Ctx(state), "average", Period("5m", 300))
    assert answer["from"] == rfc3339(horizon * 1000)


# --- statistics from minutes: PostgreSQL + memory ------------------------------------------


def ticks_per_minute(minutes: range, per_minute: int, base: float) -> list[Tick]:
    """`per_minute` ticks in each minute of `minutes` (minute numbers), prices rising."""
    out: list[Tick] = []
    for m in minutes:
        for i in range(per_minute):
            out.append((SYM, base + m - MINUTE + i / 100, m * 60_000 + i * 1000))
    return out


def aggregate(
    state: MarketState, store: MemoryAggregateStore, now: float, window_seconds: int
) -> None:
    """What the aggregator does: write closed minutes, then prune what memory holds."""
    store.upsert(state.take_minutes(int(now * 1000) - 2000))
    state.prune(int(now))


@pytest.fixture
def written() -> tuple[MarketState, MemoryAggregateStore, list[Tick]]:
    """Ticks over 20 minutes of source A; the closed minutes written, memory pruned to the
    last ~2 minutes, and some minutes written *and* still held (both records of them)."""
    state = MarketState(120)
    store = MemoryAggregateStore()
    ticks = ticks_per_minute(range(MINUTE - 20, MINUTE + 1), 3, 100.0)
    past = [t for t in ticks if t[2] <= NOW_MS]
    state.key(A, SYM).fold(past)
    aggregate(state, store, NOW, 120)
    return state, store, past


def count_between(ticks: list[Tick], from_ms: int, to_ms: int) -> int:
    return sum(1 for t in ticks if from_ms <= t[2] <= to_ms)


async def test_fixture_holds_minutes_in_both_stores(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]],
) -> None:
    state, store, _ = written
    held = state.keys[(A, SYM)].held_minutes()
    stored = {minute // 60_000 for (_, _, minute) in store.data}
    assert held[0] <= MINUTE - 2  # memory holds more than the current minute
    assert set(held) & stored  # some minutes are in both: they must count once
    assert min(stored) == MINUTE - 20


@pytest.mark.parametrize("period", [Period("10m", 600), Period("1h", 3600), ALL_HISTORY])
async def test_minutes_combine_postgres_and_memory_without_double_counting(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]], period: Period
) -> None:
    state, store, ticks = written
    answer = await ask(Ctx(state, store), "average", period, window=120)
    if period.seconds is None:
        from_ms = (MINUTE - 20) * 60_000
    else:
        from_ms = (NOW_S - period.seconds) // 60 * 60_000
    expected = [t for t in ticks if from_ms <= t[2] <= NOW_MS]
    assert answer["count"] == len(expected) == count_between(ticks, from_ms, NOW_MS)
    assert answer["price"] == pytest.approx(sum(t[1] for t in expected) / len(expected))
    assert answer["resolution"] == "1m"
    assert answer["from"] == rfc3339(from_ms)
    assert answer["to"] == rfc3339(NOW_MS)


async def test_minute_extremes_from_postgres_and_memory(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]],
) -> None:
    state, store, ticks = written
    high = await ask(Ctx(state, store), "highest", Period("1h", 3600), window=120)
    low = await ask(Ctx(state, store), "lowest", Period("1h", 3600), window=120)
    top = max(ticks, key=lambda t: t[1])
    bottom = min(ticks, key=lambda t: t[1])
    assert (high["price"], high["at"]) == (top[1], top[2] // 60_000 * 60_000)  # from memory
    assert (low["price"], low["at"]) == (bottom[1], bottom[2] // 60_000 * 60_000)  # from PG
    assert low["at_exchange"] == high["at_exchange"] == A


async def test_a_memory_minute_wins_over_its_stale_row(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]],
) -> None:
    """A held minute whose row was written before a late tick counts from memory only."""
    state, store, ticks = written
    held = state.keys[(A, SYM)].held_minutes()[0]
    state.key(A, SYM).fold([(SYM, 1.0, held * 60_000 + 59_999)])  # late tick, still held
    answer = await ask(Ctx(state, store), "lowest", Period("1h", 3600), window=120)
    assert answer["price"] == 1.0
    assert answer["count"] == len(ticks) + 1


async def test_postgres_down_and_needed_is_503(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]],
) -> None:
    state, store, _ = written
    store.fail_with = OSError("connection refused")
    for period in (Period("1h", 3600), ALL_HISTORY):
        with pytest.raises(QueryError) as info:
            await ask(Ctx(state, store), "average", period, window=120)
        assert info.value.status == 503
        assert "PostgreSQL" in info.value.message


async def test_postgres_marked_down_fails_fast_without_a_call() -> None:
    state = MarketState(120)
    calls: list[object] = []

    class Refusing(MemoryAggregateStore):
        def range_stats(self, *args: Any) -> Any:
            calls.append(args)
            raise AssertionError("not expected")

    ctx = Ctx(state, Refusing())
    ctx.postgres_health.down(OSError("down"))
    with pytest.raises(QueryError) as info:
        await ask(ctx, "average", Period("1h", 3600), window=120)
    assert info.value.status == 503
    assert calls == []


async def test_memory_covering_a_minute_range_answers_while_postgres_is_down(
    written: tuple[MarketState, MemoryAggregateStore, list[Tick]],
) -> None:
    state, store, ticks = written
    store.fail_with = OSError("connection refused")
    st = state.keys[(A, SYM)]
    covered_s = NOW_S - st.horizon_s  # the longest period memory covers from its horizon on
    assert covered_s > 120  # longer than the window: minute resolution
    answer = await ask(Ctx(state, store), "average", Period(f"{covered_s}s", covered_s), window=120)
    from_ms = st.horizon_s * 1000
    assert answer["resolution"] == "1m"
    assert answer["count"] == count_between(ticks, from_ms, NOW_MS)


async def test_seconds_never_need_postgres() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, NOW_MS - 1000)])
    store = MemoryAggregateStore()
    store.fail_with = OSError("down")
    answer = await ask(Ctx(state, store), "average", Period("5m", 300))
    assert answer["count"] == 1


async def test_a_key_never_held_in_memory_is_read_from_postgres_only() -> None:
    state = MarketState(300)
    store = MemoryAggregateStore()
    store.upsert([MinuteRow(B, SYM, (MINUTE - 30) * 60_000, 4, 40.0, 9.0, 11.0, 10.0, 10.0)])
    fold(state, A, [(20.0, NOW_MS - 1000)])
    answer = await ask(Ctx(state, store), "average", Period("1h", 3600), sources=(A, B))
    assert answer["count"] == 5
    assert answer["price"] == pytest.approx(60 / 5)
    low = await ask(Ctx(state, store), "lowest", ALL_HISTORY, sources=(A, B))
    assert (low["price"], low["at"], low["at_exchange"]) == (9.0, (MINUTE - 30) * 60_000, B)
    assert low["from"] == rfc3339((MINUTE - 30) * 60_000)


async def test_minutes_include_the_current_partial_minute_and_not_the_future() -> None:
    state = MarketState(300)
    fold(state, A, [(1.0, MINUTE * 60_000 + 1)])  # current minute
    fold(state, A, [(2.0, (MINUTE + 1) * 60_000 + 1)])  # a future minute (clock skew)
    answer = await ask(Ctx(state), "average", Period("1h", 3600))
    assert answer["count"] == 1


class CountingStore(MemoryAggregateStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def range_stats(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return super().range_stats(*args, **kwargs)


async def test_identical_concurrent_range_reads_share_one_store_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore()
    store.upsert([MinuteRow("ex", SYM, 0, 2, 3.0, 1.0, 2.0, 1.0, 2.0)])
    reader = MinuteReader(store, StoreHealth("postgres"), ttl_s=1.0)
    ranges = [StoreRange("ex", SYM, None, 60_000)]
    answers: list[Any] = []

    async def ask_store() -> None:
        answers.append(await reader.range_stats(ranges))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask_store)
    assert store.calls == 1
    assert len(answers) == 20 and all(a == answers[0] for a in answers)
    assert answers[0][0].count == 2
    await trio.sleep(1.5)  # past the time to live: asked again
    await reader.range_stats(ranges)
    assert store.calls == 2


async def test_shared_reads_in_flight_only_and_bounded_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = MinuteReader(MemoryAggregateStore(), StoreHealth("postgres"), max_entries=3)
    reads: list[str] = []

    async def read(key: str) -> str:
        reads.append(key)
        await trio.sleep(0.1)
        return key.upper()

    got: list[str] = []

    async def ask() -> None:
        got.append(await reader._shared("a", lambda: read("a"), keep=False))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert got == ["A"] * 5 and reads == ["a"]  # one read shared in flight
    assert await reader._shared("a", lambda: read("a"), keep=False) == "A"
    assert reads == ["a", "a"]  # not kept once read

    for key in "bcde":  # kept, but never more than max_entries, oldest leaving first
        await reader._shared(key, lambda key=key: read(key))  # type: ignore[misc]
    assert list(reader._answers) == ["c", "d", "e"]
    await reader._shared("c", lambda: read("c"))
    assert reads.count("c") == 1  # still fresh
    await trio.sleep(1.0)
    await reader._shared("f", lambda: read("f"))  # the expired ones leave as it arrives
    assert list(reader._answers) == ["f"]
