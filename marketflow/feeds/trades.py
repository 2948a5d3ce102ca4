"""Sans-IO: a venue's received frames -> validated, deduplicated ticks (contract: exchange
connectors).

`TradeParser.feed(frames)` parses each frame with the venue's parser, maps the venue's pair to
our symbol, drops trades already seen (by trade id, in bounded memory per pair), applies the tick
rules shared with the TCP feed parser and counts every refused trade or frame under its reason,
like `FeedParser`. It never raises on input. One parser per source, kept across reconnects: the
trades a venue replays when a connection (re)subscribes are the ones to recognise.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping

from marketflow.feeds.validation import INF, check_tick, time_window
from marketflow.feeds.venues.base import Note, NoteKind, Parse, Trade
from marketflow.models import Reject, Tick

EXCERPT_CHARS = 80
IDS_PER_PAIR = 2048  # > Coinbase's snapshot (the last 100 trades) with room for a busy second


class TradeIds:
    """The last `per_pair` trade ids of each pair: enough to recognise a replay, never more."""

    def __init__(self, per_pair: int = IDS_PER_PAIR) -> None:
        self._per_pair = per_pair
        self._sets: dict[str, set[Hashable]] = {}
        self._orders: dict[str, deque[Hashable]] = {}

    def seen(self, pair: str, trade_id: Hashable) -> bool:
        """True when `trade_id` was seen before for `pair`; otherwise remember it."""
        ids = self._sets.get(pair)
        if ids is None:
            ids = self._sets[pair] = set()
            self._orders[pair] = deque()
        elif trade_id in ids:
            return True
        ids.add(trade_id)
        order = self._orders[pair]
        order.append(trade_id)
        if len(order) > self._per_pair:
            ids.discard(order.popleft())
        return False

    def __len__(self) -> int:
        return sum(map(len, self._sets.values()))


class TradeParser:
    """Frames of one venue in, ticks out; refusals counted in `rejected` like `FeedParser`."""

    def __init__(
        self,
        parse: Parse,
        pairs: Mapping[str, str],
        *,
        max_skew_ms: int = 120_000,
        max_future_ms: int = 5_000,
        clock: Callable[[], float] = time.time,
        ids_per_pair: int = IDS_PER_PAIR,
    ) -> None:
        """`pairs` maps the venue's pair to our symbol (the inverse of the config's map)."""
        self._parse = parse
        self._symbols = dict(pairs)
        self._max_skew_ms = max_skew_ms
        self._max_future_ms = max_future_ms
        self._clock = clock
        self._ids = TradeIds(ids_per_pair)
        self._trades: list[Trade] = []
        self.accepted = 0
        self.duplicates = 0  # replayed trades dropped
        self.rejected: dict[Reject, int] = dict.fromkeys(Reject, 0)
        self.last_rejected: tuple[Reject, bytes] | None = None
        self.refusals: list[Note] = []  # subscriptions the venue refused, for the loop to log

    def feed(self, frames: list[str | bytes]) -> list[Tick]:
        """Parse `frames` (in arrival order); return their valid, new trades as ticks."""
        lo, hi = time_window(self._clock, self._max_skew_ms, self._max_future_ms)
        symbols = self._symbols
        ids = self._ids
        trades = self._trades
        out: list[Tick] = []
        append = out.append
        for frame in frames:
            note = self._parse(frame, trades)
            if note is not None:
                self._note(note, frame)
            if not trades:
                continue
            for pair, price, ts, trade_id in trades:
                symbol = symbols.get(pair)
                if symbol is None:
                    self._reject(Reject.UNKNOWN_SYMBOL, frame)
                elif trade_id is not None and ids.seen(pair, trade_id):
                    self.duplicates += 1
                elif 0.0 < price < INF and lo <= ts <= hi:  # the inline form of check_tick
                    append((symbol, price, ts))
                else:
                    reason = check_tick(price, ts, lo, hi)
                    assert reason is not None
                    self._reject(reason, frame)
            trades.clear()
        self.accepted += len(out)
        return out

    def reject_oversized(self, limit: int) -> None:
        """The connection refused a frame over `limit` characters (it closes with 1009)."""
        self._reject(Reject.TOO_LONG, f"<frame over {limit} characters>")

    def _note(self, note: Note, frame: str | bytes) -> None:
        if note.kind is NoteKind.MALFORMED:
            self._reject(Reject.MALFORMED, frame, note.count)
        elif note.kind is NoteKind.REFUSED:
            self.refusals.append(note)

    def _reject(self, reason: Reject, frame: str | bytes, count: int = 1) -> None:
        self.rejected[reason] += count
        excerpt = frame[:EXCERPT_CHARS]
        self.last_rejected = (
            reason,
            excerpt.encode("utf-8", "replace") if isinstance(excerpt, str) else excerpt,
        )
