"""The venues' text fields: prices exactly as the decimal says, times floored to the ms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketflow.feeds.venues import fields
from marketflow.feeds.venues.fields import (
    decimal_price,
    ms_from_digits,
    ms_from_iso,
    ms_from_seconds,
)

decimals = st.decimals(
    min_value=Decimal("0.000000001"), max_value=Decimal("1e12"), allow_nan=False, places=9
)


@given(decimals)
def test_price_is_the_nearest_double_to_the_decimal(value: Decimal) -> None:
    text = format(value, "f")
    assert decimal_price(text) == float(value)  # float(Decimal) rounds correctly, independently


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("58001.03000000", 58001.03),
        ("0.000023750", 0.00002375),
        ("30236", 30236.0),
        ("0", 0.0),  # a number: the tick rules call it a bad price
        ("-1.5", -1.5),
        ("1e-5", 0.00001),
        ("1e400", float("inf")),  # a number too: not finite, a bad price
    ],
)
def test_price_accepts_plain_decimals(text: str, value: float) -> None:
    assert decimal_price(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "abc", "nan", "NaN", "inf", "Infinity", " 1.5", "1.5 ", "1_000", "+1", "1.", ".5",
     "0x10", "\u0661\u0662", "1.5.5", "1" * 41],
)  # fmt: skip
def test_price_refuses_what_is_not_a_plain_decimal(text: str) -> None:
    assert decimal_price(text) is None


def test_ms_from_digits() -> None:
    assert ms_from_digits("1652459235576") == 1652459235576
    for bad in ("", "-1", "1.5", "12a", "\u00b2", "1" * 20, " 1"):
        assert ms_from_digits(bad) is None


@given(st.integers(0, 4_000_000_000), st.text("0123456789", min_size=0, max_size=9))
def test_seconds_are_floored_to_the_ms(whole: int, fraction: str) -> None:
    text = f"{whole}.{fraction}" if fraction else str(whole)
    expected = int((Decimal(text) * 1000).to_integral_value(rounding=ROUND_FLOOR))
    assert ms_from_seconds(text) == expected


def test_seconds_never_round_up() -> None:
    # float("1617666461.9999999") * 1000 would round up into the next second
    assert ms_from_seconds("1617666461.9999999") == 1617666461999
    assert ms_from_seconds("1617666461.465618") == 1617666461465
    for bad in ("", "1.", ".5", "-1.5", "1e3", "1.1234567890", "abc"):
        assert ms_from_seconds(bad) is None


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.text("0123456789", min_size=1, max_size=9),
)
def test_iso_is_floored_to_the_ms(moment: datetime, fraction: str) -> None:
    whole = moment.replace(microsecond=0)
    text = whole.strftime("%Y-%m-%dT%H:%M:%S") + "." + fraction + "Z"
    expected = int(whole.timestamp()) * 1000 + int((fraction + "00")[:3])
    assert ms_from_iso(text) == expected


def test_iso_shapes() -> None:
    base = int(datetime(2026, 8, 9, 21, 6, 2, tzinfo=UTC).timestamp()) * 1000
    assert ms_from_iso("2026-08-09T21:06:02.876095Z") == base + 876
    assert ms_from_iso("2026-08-09T21:06:02.999999999Z") == base + 999
    assert ms_from_iso("2026-08-09T21:06:02Z") == base
    assert ms_from_iso("2026-08-09T23:06:02.5+02:00") == base + 500
    assert ms_from_iso("2026-08-09T20:06:02.5-01:00") == base + 500
    two_hours = int(timedelta(hours=2).total_seconds() * 1000)
    assert ms_from_iso("2026-08-09T21:06:02+0200") == base - two_hours
    for bad in (
        "2026-08-09T21:06:02.876095",  # no zone
        "2026-02-30T00:00:00Z",
        "2026-08-09T24:00:00Z",
        "2026-08-09T21:60:00Z",
        "2026-08-09T21:06:60Z",  # a leap second is not a time Python can count
        "2026-08-09T21:06:02.1234567890Z",
        "2026-08-09 21:05:48.854840045 +0000 UTC m=+41691.260485341",
        "0000-01-01T00:00:00Z",
        "",
    ):
        assert ms_from_iso(bad) is None, bad


@given(st.text(max_size=50))
def test_text_fields_never_raise(text: str) -> None:
    decimal_price(text)
    ms_from_digits(text)
    ms_from_seconds(text)
    ms_from_iso(text)


@given(
    st.lists(st.sampled_from(list("0123456789-T :.Z+\u0663x")), min_size=0, max_size=6),
    st.lists(st.integers(0, 29), min_size=0, max_size=6),
    st.sampled_from(
        ["2026-08-09T21:06:02.876095Z", "2026-08-09T21:06:02Z", "2024-02-29 23:59:59.999999999Z"]
    ),
)
def test_the_fast_iso_path_agrees_with_the_full_parser(
    chars: list[str], positions: list[int], base: str
) -> None:
    """The cached-minute shortcut answers exactly what the full parser answers."""
    text = list(base)
    for char, position in zip(chars, positions, strict=False):
        if position < len(text):
            text[position] = char
    mutated = "".join(text)
    assert ms_from_iso(mutated) == fields._ms_from_iso_slowly(mutated)
