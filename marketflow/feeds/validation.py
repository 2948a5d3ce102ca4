"""The tick rules every source shares (contract: feed protocol): a price is a finite number above
zero, a timestamp lies between `max_skew_ms` behind and `max_future_ms` ahead of the wall clock.

Parsers on the hot path test `0.0 < price < inf and lo <= ts <= hi` inline for the common valid
tick and ask `check_tick` only about the rest, so the reason a tick is refused is decided here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from marketflow.models import Reject

INF = math.inf


def time_window(
    clock: Callable[[], float], max_skew_ms: int, max_future_ms: int
) -> tuple[int, int]:
    """The accepted timestamps, in ms, as (lowest, highest), for ticks read now."""
    now_ms = int(clock() * 1000)
    return now_ms - max_skew_ms, now_ms + max_future_ms


def check_tick(price: float, ts: int, lo: int, hi: int) -> Reject | None:
    """Why a tick with a known symbol is refused, or None when it is valid."""
    if not 0.0 < price < INF:
        return Reject.BAD_PRICE
    if not lo <= ts <= hi:
        return Reject.BAD_TIMESTAMP
    return None
