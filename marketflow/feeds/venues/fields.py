"""The venues' text fields, read exactly: decimal prices and timestamps floored to milliseconds.

Venues quote prices and times as text so that no precision is lost; so are they read here:
a price is `float(text)` (the nearest double to the decimal) once the text is known to be a
plain decimal, and a time is floored to the millisecond with integer arithmetic on its digits,
never through a float that could round `…59.9999` up into the next millisecond. Each function
returns None for text it does not accept, and never raises.
"""

from __future__ import annotations

import re
from datetime import date

_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SECONDS = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,9}))?")
_ISO = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:Z|([+-])([0-9]{2}):?([0-9]{2}))"
)
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_MAX_TEXT = 40  # longer texts are not prices or times; refusing them early bounds the work


def decimal_price(text: str) -> float | None:
    """`"58001.03000000"` -> 58001.03. None unless the text is a plain decimal number.

    float() alone would also take `" 1_0 "`, `"nan"`, `"infinity"` or other scripts' digits.
    The value may still be zero, negative or overflow to inf: the tick rules judge that.
    """
    if len(text) > _MAX_TEXT or _DECIMAL.fullmatch(text) is None:
        return None
    return float(text)


def ms_from_digits(text: str) -> int | None:
    """`"1652459235576"` (integer milliseconds as text) -> 1652459235576."""
    if not 0 < len(text) <= 19 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def ms_from_seconds(text: str) -> int | None:
    """`"1617666461.465618"` (decimal seconds) -> 1617666461465, floored."""
    match = _SECONDS.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        return None
    whole, fraction = match.groups()
    return int(whole) * 1000 + (int((fraction + "00")[:3]) if fraction else 0)


def ms_from_iso(text: str) -> int | None:
    """`"2026-08-09T21:06:02.876095Z"` -> epoch ms, floored; up to 9 fractional digits.

    A UTC offset (`+02:00`) is honoured; a time without a zone is refused (it is not a time).
    The common UTC shape takes a fast path: the minute (`2026-08-09T21:06`) is looked up in a
    small cache, only the seconds and the fraction are read per call.
    """
    size = len(text)
    if 20 <= size <= 30 and text[-1] == "Z" and text[16] == ":":
        start = _MINUTES.get(text[:16])
        if start is None:
            start = _minute_start(text[:16])
        second, fraction = text[17:19], text[20:-1]
        if (
            start is not None
            and second.isdigit()
            and second.isascii()
            and second < "60"
            and (size == 20 or (text[19] == "." and fraction.isdigit() and fraction.isascii()))
        ):
            return (start + int(second)) * 1000 + (int((fraction + "00")[:3]) if fraction else 0)
    return _ms_from_iso_slowly(text)


_MINUTE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2})")
_MINUTES: dict[str, int] = {}  # "2026-08-09T21:06" -> its epoch second; a venue's trades share few
_MINUTES_KEPT = 256


def _minute_start(prefix: str) -> int | None:
    match = _MINUTE.fullmatch(prefix)
    if match is None:
        return None
    year, month, day, hour, minute = map(int, match.groups())
    if hour > 23 or minute > 59:
        return None
    try:
        days = date(year, month, day).toordinal() - _EPOCH_DAY
    except ValueError:
        return None
    if len(_MINUTES) >= _MINUTES_KEPT:
        _MINUTES.clear()
    start = _MINUTES[prefix] = days * 86400 + hour * 3600 + minute * 60
    return start


def _ms_from_iso_slowly(text: str) -> int | None:
    match = _ISO.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    h, m, s = int(hour), int(minute), int(second)
    if h > 23 or m > 59 or s > 59:
        return None
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_DAY
    except ValueError:
        return None
    seconds = days * 86400 + h * 3600 + m * 60 + s
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            return None
        offset = oh * 3600 + om * 60
        seconds -= offset if sign == "+" else -offset
    return seconds * 1000 + (int((fraction + "00")[:3]) if fraction else 0)
