"""Sans-IO framing and validation of feed lines (contract: feed protocol).

`FeedParser.feed(chunk)` takes whatever bytes the socket gave and returns the valid ticks of every
line completed by them, counting each rejected line under its reason. It never raises on input.

Hot path: a chunk's complete lines are decoded in one `msgspec` call (`decode_lines`); only a
chunk holding a bad line falls back to line-by-line decoding to find and classify it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection

import msgspec

from marketflow.feeds.validation import INF, check_tick, time_window
from marketflow.models import Reject, Tick

EXCERPT_BYTES = 80


class FeedLine(msgspec.Struct, gc=False):
    symbol: str
    price: float
    timestamp: int


_decode_many = msgspec.json.Decoder(FeedLine).decode_lines
_decode_one = msgspec.json.Decoder(FeedLine).decode


class FeedParser:
    """Frames a byte stream into lines and turns them into validated ticks.

    One parser per connection: a partial line left at EOF belongs to that connection only.
    """

    def __init__(
        self,
        symbols: Collection[str],
        *,
        max_line_bytes: int = 65536,
        max_skew_ms: int = 120_000,
        max_future_ms: int = 5_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._symbols = frozenset(symbols)
        self._max_line = max_line_bytes
        self._max_skew_ms = max_skew_ms  # how far behind the wall clock a tick may be
        self._max_future_ms = max_future_ms  # and how far ahead (a future tick would win "newest")
        self._clock = clock
        self._pending = b""
        self._discarding = False  # inside an overlong line, dropping bytes until its newline
        self.accepted = 0
        self.rejected: dict[Reject, int] = dict.fromkeys(Reject, 0)
        self.last_rejected: tuple[Reject, bytes] | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def feed(self, data: bytes) -> list[Tick]:
        """Consume `data`; return the ticks of the lines it completes, in arrival order."""
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data = data[newline + 1 :]
            self._discarding = False
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            self._hold(self._pending + data if self._pending else data)
            return []
        chunk = (
            self._pending + data[: last_newline + 1] if self._pending else data[: last_newline + 1]
        )
        self._hold(data[last_newline + 1 :])
        if len(chunk) > self._max_line:
            return self._feed_checked(chunk)
        return self._parse(chunk)

    def _hold(self, rest: bytes) -> None:
        if len(rest) > self._max_line:
            # Too long already and no newline yet: count it once, keep nothing of it.
            self._reject(Reject.TOO_LONG, rest)
            self._pending = b""
            self._discarding = True
        else:
            self._pending = rest

    def _feed_checked(self, chunk: bytes) -> list[Tick]:
        """A chunk long enough to hide an overlong line: drop such lines, parse the rest."""
        lines = chunk.split(b"\n")
        if max(map(len, lines)) <= self._max_line:
            return self._parse(chunk)
        kept = []
        for line in lines:
            if len(line) > self._max_line:
                self._reject(Reject.TOO_LONG, line)
            else:
                kept.append(line)
        return self._parse(b"\n".join(kept))

    def _parse(self, chunk: bytes) -> list[Tick]:
        try:
            lines = _decode_many(chunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return self._parse_slowly(chunk)
        # `decode_lines` reads a stream of JSON values, newlines or not: `{..} {..}` on one line
        # would pass as two ticks here but as one malformed line in the slow path, so the result
        # would depend on the chunking. The fast path stands only when every line starts with `{`
        # and there are exactly as many objects as lines (two C-level counts per chunk).
        lines_in_chunk = chunk.count(b"\n")
        if len(lines) != lines_in_chunk or (
            chunk.count(b"\n{") + chunk.startswith(b"{") != lines_in_chunk
        ):
            return self._parse_slowly(chunk)
        lo, hi = time_window(self._clock, self._max_skew_ms, self._max_future_ms)
        symbols = self._symbols
        out: list[Tick] = []
        append = out.append
        for line in lines:
            symbol = line.symbol
            price = line.price
            ts = line.timestamp
            # The inline form of check_tick for the common valid line; the rest is classified.
            if symbol in symbols and 0.0 < price < INF and lo <= ts <= hi:
                append((symbol, price, ts))
            else:
                tick = self._classify(symbol, price, ts, lo, hi, line)
                if tick is not None:
                    append(tick)
        self.accepted += len(out)
        return out

    def _classify(
        self, symbol: str, price: float, ts: int, lo: int, hi: int, line: FeedLine | bytes
    ) -> Tick | None:
        """The slow path for a line that is well-typed but may be invalid. Returns it if valid."""
        if symbol not in self._symbols:
            upper = symbol.upper()
            # ASCII only, like the API's names: "btcu\u017fdt".upper() is "BTCUSDT" too.
            if upper not in self._symbols or not symbol.isascii():
                self._reject(Reject.UNKNOWN_SYMBOL, line)
                return None
            symbol = upper
        reason = check_tick(price, ts, lo, hi)
        if reason is not None:
            self._reject(reason, line)
            return None
        return (symbol, price, ts)

    def _parse_slowly(self, chunk: bytes) -> list[Tick]:
        lo, hi = time_window(self._clock, self._max_skew_ms, self._max_future_ms)
        out: list[Tick] = []
        for raw in chunk.split(b"\n"):
            if not raw.strip():
                continue  # blank lines (keep-alives) are neither data nor errors
            try:
                line = _decode_one(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                tick = self._classify_loose(raw, lo, hi)
            else:
                tick = self._classify(line.symbol, line.price, line.timestamp, lo, hi, raw)
            if tick is not None:
                out.append(tick)
        self.accepted += len(out)
        return out

    def _classify_loose(self, raw: bytes, lo: int, hi: int) -> Tick | None:
        """A line msgspec refused: NaN/Infinity literals and huge numbers are prices, not junk."""
        try:
            # Decode first: json.loads(bytes) would guess UTF-16/32 and accept what the
            # feed protocol calls malformed (not UTF-8); UnicodeDecodeError is a ValueError.
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            self._reject(Reject.MALFORMED, raw)
            return None
        if not isinstance(obj, dict):
            self._reject(Reject.MALFORMED, raw)
            return None
        symbol, price, ts = obj.get("symbol"), obj.get("price"), obj.get("timestamp")
        if (
            not isinstance(symbol, str)
            or not isinstance(price, int | float)
            or isinstance(price, bool)
            or not isinstance(ts, int)
            or isinstance(ts, bool)
        ):
            self._reject(Reject.MALFORMED, raw)
            return None
        try:
            value = float(price)
        except OverflowError:
            # An integer beyond any double (`1` and 400 zeros): not a finite price. Uncaught,
            # this ended the reader task and with it the whole service.
            self._reject(Reject.BAD_PRICE, raw)
            return None
        return self._classify(symbol, value, ts, lo, hi, raw)

    def _reject(self, reason: Reject, line: FeedLine | bytes) -> None:
        self.rejected[reason] += 1
        if isinstance(line, FeedLine):
            line = msgspec.json.encode(line)
        self.last_rejected = (reason, line[:EXCERPT_BYTES])
