"""Synthetic price updates: the test-mode generator and the simulator's price source (contract: feed
protocol, modes).

`PriceWalk` and `encode_lines` are pure; `generate` is the only task here and does no I/O itself:
it hands batches to a callback the pipeline gives it.

The walk matches the reference captures (`tests/fixtures/reference-feed/`): each step moves a
price by a uniform relative amount, up to ±0.25 % for BTCUSDT and ±1 % for the others. A weak
pull towards the start price (in log space, half-life of about 3,500 steps) keeps the walk near
its start for days and prevents the slow drift towards zero of a plain multiplicative walk. A
hard clamp keeps every price finite and > 0 whatever the state.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from marketflow.models import Tick

BASE_PRICES: dict[str, float] = {
    "BTCUSDT": 100_000.0,
    "DOGEUSDT": 0.30,
    "TONUSDT": 3.9,
    "SOLUSDT": 200.0,
    "ETHUSDT": 3050.0,
}
UNKNOWN_BASE_PRICE = 100.0
# Largest relative step per update, read off the reference captures.
MAX_STEP: dict[str, float] = {"BTCUSDT": 0.0025}
DEFAULT_MAX_STEP = 0.01
REVERSION = 2e-4  # share of the log-distance from the start price undone per step
LOG_CLAMP = 5.0  # prices stay within start * e^±5 whatever happens

SendBatch = Callable[[str, list[Tick]], Awaitable[None]]


class PriceWalk:
    """One independent random walk per symbol; repeatable for a given seed.

    `start_steps` spreads the starting prices uniformly over ± that many of the symbol's maximal
    steps (0: start exactly at the base price), so that several walks do not start identically.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int | str | None = None,
        start_steps: float = 0.0,
    ) -> None:
        if not symbols:
            raise ValueError("PriceWalk needs at least one symbol")
        self.symbols = list(symbols)
        self._rng = random.Random(seed)
        self._base = [BASE_PRICES.get(s, UNKNOWN_BASE_PRICE) for s in self.symbols]
        self._width = [2.0 * MAX_STEP.get(s, DEFAULT_MAX_STEP) for s in self.symbols]
        # State is the log of price / base; a step adds uniform(-max, +max) to it.
        self._log = [start_steps * (self._rng.random() - 0.5) * width for width in self._width]

    def step(self) -> list[tuple[str, float]]:
        """Advance every symbol by one step; (symbol, price) in the fixed symbol order."""
        rand = self._rng.random
        exp = math.exp
        out: list[tuple[str, float]] = []
        state = self._log
        for i, symbol in enumerate(self.symbols):
            x = state[i]
            x += (rand() - 0.5) * self._width[i] - REVERSION * x
            x = min(LOG_CLAMP, max(-LOG_CLAMP, x))
            state[i] = x
            out.append((symbol, self._base[i] * exp(x)))
        return out


def encode_lines(ticks: Sequence[Tick]) -> bytes:
    """Newline-delimited JSON exactly as the reference feed writes it.

    Keys in the order symbol, price, timestamp; no spaces; the price as repr() (the shortest
    decimal that reads back to the same double, valid JSON for every finite float); every line
    ends with a newline.
    """
    return "".join(
        [f'{{"symbol":"{s}","price":{p!r},"timestamp":{ts}}}\n' for s, p, ts in ticks]
    ).encode()


def _period_for(rate: float) -> float:
    """100 ms as the reference feeds, 10 ms when a 100 ms batch would be big."""
    return 0.1 if rate <= 10_000 else 0.01


async def generate(
    source: str,
    symbols: list[str],
    rate: float,
    send_batch: SendBatch,
    *,
    seed: int | None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Produce `rate` updates per second for `source` until cancelled (test mode, contract: modes).

    Every period (100 ms; 10 ms above 10,000 lines/s) it awaits `send_batch(source, ticks)`
    once with that period's ticks: symbols cycle in the fixed order, all ticks of a batch share
    one timestamp (`clock()` in ms). A period with no tick due sends nothing. Periods follow a
    fixed schedule (`trio.sleep_until`), so the rate does not drift; if `send_batch` blocks for
    longer than a period (backpressure), the missed periods are skipped, not sent as a burst.

    The task owns only its walk. On cancellation it just stops: a batch is handed over whole or
    not at all, as `send_batch` allows; nothing needs closing.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    walk = PriceWalk(symbols, seed=seed)
    period = _period_for(rate)
    pending: list[tuple[str, float]] = []
    anchor = trio.current_time()
    tick_no = 0  # periods elapsed since `anchor`
    sent = 0  # lines sent since `anchor`
    task_status.started()
    while True:
        due = math.floor((tick_no + 1) * period * rate + 1e-9) - sent
        if due > 0:
            while len(pending) < due:
                pending.extend(walk.step())
            ts = int(clock() * 1000)
            batch: list[Tick] = [(s, p, ts) for s, p in pending[:due]]
            del pending[:due]
            sent += due
            await send_batch(source, batch)
        tick_no += 1
        deadline = anchor + tick_no * period
        now = trio.current_time()
        if now > deadline + period:
            anchor, tick_no, sent = now, 0, 0  # fell behind: skip, do not burst
            deadline = now
        await trio.sleep_until(deadline)
