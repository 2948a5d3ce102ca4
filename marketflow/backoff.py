"""Capped exponential backoff with jitter: 1 s, 2 s, 4 s ... up to a cap, forever (contract: feed
protocol)."""

from __future__ import annotations

import random


class Backoff:
    """Delays for successive retries. `reset()` after a success starts again from `base`."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 30.0,
        *,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < base <= cap and 0 <= jitter < 1")
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def nominal(self, attempt: int) -> float:
        """The delay before jitter for the given attempt (0-based)."""
        return min(self.cap, self.base * 2.0 ** min(attempt, 62))

    def next(self) -> float:
        """The next delay: nominal x [1 - jitter, 1 + jitter], never above the cap."""
        delay = self.nominal(self.attempt)
        self.attempt += 1
        spread = self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return min(self.cap, delay * spread)

    def reset(self) -> None:
        self.attempt = 0
