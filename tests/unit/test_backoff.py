from __future__ import annotations

import random

import pytest

from marketflow.backoff import Backoff


def test_schedule_doubles_to_the_cap_with_bounded_jitter() -> None:
    b = Backoff(1.0, 30.0, jitter=0.2, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    nominal = [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    for got, want in zip(delays, nominal, strict=True):
        assert want * 0.8 <= got <= min(30.0, want * 1.2)
    assert len(set(delays)) > 5  # jittered, not a fixed schedule


def test_reset_starts_over() -> None:
    b = Backoff(1.0, 8.0, jitter=0.0)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 8, 8]
    b.reset()
    assert b.next() == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
