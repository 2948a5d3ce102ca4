"""PriceWalk, encode_lines and the test-mode generator task (virtual time)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from marketflow.generator import (
    BASE_PRICES,
    LOG_CLAMP,
    PriceWalk,
    encode_lines,
    generate,
)
from marketflow.models import Tick

SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]
# Five seconds captured from each reference exchange simulator (tests/fixtures/reference-feed).
REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference-feed"
# The first round of exchange1.ndjson, byte for byte.
CAPTURE_HEAD = (
    b'{"symbol":"BTCUSDT","price":99850.22619241157,"timestamp":1795648325363}\n'
    b'{"symbol":"DOGEUSDT","price":0.2990316084082228,"timestamp":1795648325363}\n'
    b'{"symbol":"TONUSDT","price":3.8755132372635654,"timestamp":1795648325363}\n'
    b'{"symbol":"SOLUSDT","price":201.93795920731978,"timestamp":1795648325363}\n'
    b'{"symbol":"ETHUSDT","price":3034.936133295017,"timestamp":1795648325363}\n'
)


def _ticks_of(data: bytes) -> list[Tick]:
    return [(r["symbol"], r["price"], r["timestamp"]) for r in map(json.loads, data.splitlines())]


# --- PriceWalk -------------------------------------------------------------------------------


def test_step_returns_every_symbol_in_fixed_order() -> None:
    walk = PriceWalk(SYMBOLS, seed=1)
    for _ in range(20):
        assert [s for s, _ in walk.step()] == SYMBOLS


def test_starts_near_base_prices_and_unknown_symbols_at_100() -> None:
    walk = PriceWalk([*SYMBOLS, "FOOBAR"], seed=2)
    first = dict(walk.step())
    for symbol, base in BASE_PRICES.items():
        assert first[symbol] == pytest.approx(base, rel=0.011)
    assert first["FOOBAR"] == pytest.approx(100.0, rel=0.011)


def test_start_steps_spreads_the_start_within_bounds() -> None:
    firsts = [dict(PriceWalk(SYMBOLS, seed=s, start_steps=5).step()) for s in range(200)]
    btc = [f["BTCUSDT"] / 100_000 - 1 for f in firsts]
    doge = [f["DOGEUSDT"] / 0.30 - 1 for f in firsts]
    assert max(map(abs, btc)) <= 6 * 0.0025
    assert max(map(abs, doge)) <= 6 * 0.01
    assert max(doge) - min(doge) > 0.05  # actually spread, not all at the base


def test_same_seed_same_walk_other_seed_other_walk() -> None:
    a, b, c = (PriceWalk(SYMBOLS, seed=s) for s in (7, 7, 8))
    run_a = [a.step() for _ in range(100)]
    assert run_a == [b.step() for _ in range(100)]
    assert run_a != [c.step() for _ in range(100)]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(), steps=st.integers(min_value=1, max_value=3000))
def test_prices_stay_positive_and_finite(seed: int, steps: int) -> None:
    walk = PriceWalk([*SYMBOLS, "XRPUSDT"], seed=seed, start_steps=5)
    for _ in range(steps):
        for _, price in walk.step():
            assert math.isfinite(price) and price > 0


def test_clamp_holds_whatever_the_state() -> None:
    walk = PriceWalk(SYMBOLS, seed=3)
    walk._log = [1e6, -1e6, 50.0, -50.0, 0.0]  # far outside anything a walk reaches
    for (symbol, price), base in zip(walk.step(), BASE_PRICES.values(), strict=True):
        assert math.isfinite(price) and price > 0, symbol
        assert base * math.exp(-LOG_CLAMP) <= price <= base * math.exp(LOG_CLAMP)


def test_step_sizes_match_the_reference_captures() -> None:
    """Uniform relative steps: BTC up to ±0.25 %, others ±1 % (sd = max / sqrt 3)."""
    walk = PriceWalk(SYMBOLS, seed=4)
    rounds = [dict(walk.step()) for _ in range(6000)]
    for symbol, max_step in [("BTCUSDT", 0.0025), ("DOGEUSDT", 0.01), ("ETHUSDT", 0.01)]:
        prices = [r[symbol] for r in rounds]
        rel = [b / a - 1 for a, b in itertools.pairwise(prices)]
        assert max(map(abs, rel)) <= max_step * 1.05
        assert statistics.pstdev(rel) == pytest.approx(max_step / math.sqrt(3), rel=0.1)


def test_walk_stays_near_its_base_over_a_long_run() -> None:
    walk = PriceWalk(SYMBOLS, seed=5)
    for _ in range(100_000):  # ~3 hours of the reference cadence
        last = dict(walk.step())
    for symbol, base in BASE_PRICES.items():
        assert base / 20 < last[symbol] < base * 20


# --- encode_lines ----------------------------------------------------------------------------


def test_encode_lines_reproduces_the_reference_bytes() -> None:
    assert encode_lines(_ticks_of(CAPTURE_HEAD)) == CAPTURE_HEAD


@pytest.mark.parametrize("name", ["exchange1", "exchange2", "exchange3"])
def test_encode_lines_reproduces_whole_captures(name: str) -> None:
    data = (REFERENCE / f"{name}.ndjson").read_bytes()
    assert encode_lines(_ticks_of(data)) == data


def test_encoded_walk_parses_back_with_the_reference_shape() -> None:
    walk = PriceWalk(SYMBOLS, seed=6)
    ticks = [(s, p, 1795648325363 + i) for i in range(50) for s, p in walk.step()]
    data = encode_lines(ticks)
    assert data.endswith(b"\n") and data.count(b"\n") == len(ticks)
    for line, (symbol, price, ts) in zip(data.splitlines(), ticks, strict=True):
        record = json.loads(line)
        assert list(record) == ["symbol", "price", "timestamp"]
        assert record == {"symbol": symbol, "price": price, "timestamp": ts}
        assert type(record["price"]) is float and type(record["timestamp"]) is int
        assert b" " not in line


@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_any_positive_price_encodes_as_a_round_tripping_json_number(price: float) -> None:
    (record,) = map(json.loads, encode_lines([("BTCUSDT", price, 1)]).splitlines())
    assert record["price"] == price


def test_encode_lines_of_nothing_is_empty() -> None:
    assert encode_lines([]) == b""


# --- generate (virtual time) -----------------------------------------------------------------

WALL_OFFSET = 1_795_648_325.0  # a fake wall clock: virtual time plus this


class Collector:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[float, str, list[Tick]]] = []
        self.delay = delay

    async def __call__(self, source: str, ticks: list[Tick]) -> None:
        self.batches.append((trio.current_time(), source, ticks))
        if self.delay:
            delay, self.delay = self.delay, 0.0
            await trio.sleep(delay)


async def _run_generator(collector: Collector, rate: float, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: generate(
                "test-exchange1",
                SYMBOLS,
                rate,
                collector,
                seed=1,
                clock=lambda: trio.current_time() + WALL_OFFSET,
                task_status=task_status,
            )
        )
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_default_rate_sends_one_round_per_100ms(autojump_clock: trio.abc.Clock) -> None:
    collector = Collector()
    start = trio.current_time()
    await _run_generator(collector, 50, 0.95)
    assert len(collector.batches) == 10
    for n, (at, source, ticks) in enumerate(collector.batches):
        assert source == "test-exchange1"
        assert at - start == pytest.approx(n * 0.1)
        assert [s for s, _, _ in ticks] == SYMBOLS
        assert {ts for _, _, ts in ticks} == {int((at + WALL_OFFSET) * 1000)}


@pytest.mark.parametrize(("rate", "seconds"), [(7, 10.0), (50, 3.0), (333, 2.0), (100_000, 1.0)])
async def test_rate_is_lines_per_second_in_batches(
    autojump_clock: trio.abc.Clock, rate: float, seconds: float
) -> None:
    collector = Collector()
    await _run_generator(collector, rate, seconds - 1e-6)
    ticks = [t for _, _, batch in collector.batches for t in batch]
    assert len(ticks) == pytest.approx(rate * seconds, abs=max(5, rate * 0.01))
    # Symbols cycle in the fixed order across batch boundaries.
    assert [s for s, _, _ in ticks] == [SYMBOLS[i % 5] for i in range(len(ticks))]
    # Batches, never single ticks, and never more than one per period.
    period = 0.1 if rate <= 10_000 else 0.01
    assert len(collector.batches) <= seconds / period + 1
    assert all(batch for _, _, batch in collector.batches)


async def test_backpressure_skips_periods_instead_of_bursting(
    autojump_clock: trio.abc.Clock,
) -> None:
    collector = Collector(delay=0.35)  # the first send blocks for 3.5 periods
    await _run_generator(collector, 50, 1.0)
    assert [len(batch) for _, _, batch in collector.batches] == [5] * len(collector.batches)
    times = [at for at, _, _ in collector.batches]
    assert times[1] - times[0] == pytest.approx(0.35)
    assert all(b - a == pytest.approx(0.1) for a, b in itertools.pairwise(times[1:]))


async def test_bad_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        await generate("s", SYMBOLS, 0, Collector(), seed=None)
