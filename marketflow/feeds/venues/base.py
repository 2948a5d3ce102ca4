"""What a venue module provides, and what its parser hands back (contract: exchange connectors).

A venue is data plus three pure functions: the URL to open, the subscribe frames to send, and a
parser that reads one received frame. The shared connection loop (`feeds/websocket.py`) does
all the I/O; `feeds/trades.py` turns the parsed trades into validated, deduplicated ticks.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence

import attrs
import msgspec

# One trade as the venue reported it: (venue pair, price, timestamp in ms, trade id or None).
# The pair is the venue's own name (`BTC-USDT`); the symbol map turns it into ours.
Trade = tuple[str, float, int, str | int | None]


class NoteKind(enum.Enum):
    CONTROL = "control"  # an ack, heartbeat, pong, ticker or status event: nothing to count
    MALFORMED = "malformed"  # `count` frames or trades the parser could not understand
    REFUSED = "refused"  # the venue refused a subscription (`pair` when it says which)


@attrs.frozen
class Note:
    """What a frame was, when it was not (only) trades."""

    kind: NoteKind
    detail: str = ""
    pair: str = ""
    count: int = 1


# What decoding a frame may raise: bad JSON or shape (ValidationError is a DecodeError), a str
# holding a lone surrogate (not encodable), nesting deeper than the decoder goes.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeEncodeError, RecursionError)

CONTROL = Note(NoteKind.CONTROL)
MALFORMED = Note(NoteKind.MALFORMED)

# parse(frame, trades) appends the frame's good trades to `trades` and returns None for a frame
# of trades only, or a Note. It never raises on any input.
Parse = Callable[[str | bytes, list[Trade]], Note | None]


@attrs.frozen
class KeepAlive:
    """How a connection shows it is alive.

    `every_s` None: the venue sends something at least every second by itself (heartbeats).
    Otherwise the client sends `message` (a text frame; None means a WebSocket ping frame) at
    least every `every_s`, more often when `stale_after_s` asks for it, and the answer is the
    sign of life.
    """

    rule: str
    every_s: float | None = None
    message: str | None = None


@attrs.frozen
class Venue:
    kind: str
    default_url: str
    default_symbols: Mapping[str, str]  # our symbol -> the venue's pair, for the default pairs
    pair_pattern: re.Pattern[str]  # what a pair of this venue looks like (config validation)
    pair_example: str
    keepalive: KeepAlive
    url: Callable[[str, Sequence[str]], str]  # (base URL, pairs) -> the URL to open
    subscribe: Callable[[Sequence[str]], list[str]]  # pairs -> text frames to send, in order
    parse: Parse
    subscribe_pace_s: float = 0.0  # pause between subscribe frames (the venue's message rate)
