"""Fan-out of latest prices and live candles to WebSocket clients (contract: WebSocket).

One hub task (`PriceHub.run`) wakes every `interval_s` (or at once when a mirror applied an
update: `poke`), compares each key's latest price with what it last published (keys are few),
takes the candles that changed from its `CandleBook` (handed out at most once per
`candle_interval_s`: a frame's cost is mostly per frame, and the prices already carry every
tick's freshness), and hands each client the changes it subscribes to. It never awaits a
client: it only writes into the client's coalescing buffers, dicts key -> newest entry, which
can never hold more entries than there are keys (and open candles). Each client has its own
sender task (`PriceHub.pump`) that empties those buffers into at most one `prices` and one
`candles` frame per interval, and sends a `heartbeat` after `heartbeat_s` without any other
frame.

Frames are serialised once per subscription shape (same symbols, exchanges and candle
intervals) and shared by every client of that shape whose buffer was empty; a lagging client
merges into a private copy and its sender serialises its own frame. Every frame leaves with the
client's own `seq` spliced in front of the shared body (`with_seq`), never re-encoded. A client
whose buffers have waited for more than `max_lag_s` is dropped (close 1008); on shutdown every
client is closed with 1001.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import orjson
import trio

from marketflow.candles import INTERVALS
from marketflow.live_candles import CandleBook, CandleKey, Pair
from marketflow.models import Key
from marketflow.ports import StoredMinutes
from marketflow.state import MarketState

log = logging.getLogger("marketflow.ws")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CONTROL_MAX: Final = 16  # queued snapshot/error frames per client before its reader waits
HEARTBEAT_S: Final = 1.0  # a heartbeat after this long without another frame
CANDLE_FRAME_MIN_S: Final = 0.5  # candles frames at most this often (and ws_min_interval_ms)

Entry = dict[str, Any]  # {"symbol","exchange","price","timestamp"}: shared, never mutated
Shape = tuple[frozenset[str] | None, frozenset[str] | None, frozenset[str]]
SNAPSHOT: Final = None  # a control item: build a snapshot frame when it is sent
NO_ID: Final[Any] = object()  # a client message without an "id"


def entry(source: str, symbol: str, price: float, ts: int) -> Entry:
    return {"symbol": symbol, "exchange": source, "price": price, "timestamp": ts}


def frame(kind: str, data: Iterable[Entry]) -> str:
    return orjson.dumps({"type": kind, "data": list(data)}).decode()


def error_frame(message: str, id: Any = NO_ID) -> str:
    """An `error` frame; `id` echoes the refused message's id when it had one."""
    if id is NO_ID:
        return orjson.dumps({"type": "error", "error": message}).decode()
    return orjson.dumps({"type": "error", "id": id, "error": message}).decode()


def with_seq(seq: int, body: str) -> str:
    """`body` (a JSON object) with `"seq"` put first: the shared body is copied, not encoded."""
    return f'{{"seq":{seq},{body[1:]}' if len(body) > 2 else f'{{"seq":{seq}}}'


class Client:
    """One subscriber as the hub sees it: what it wants and what waits to be sent to it.

    `symbols` None means every configured symbol; `exchanges` None means the current mode's
    sources, whatever the mode is when a price changes; `candles` holds interval names.
    """

    __slots__ = (
        "_room",
        "_wake",
        "candle_frame",
        "candle_pairs",
        "candles",
        "candles_shared",
        "close_code",
        "close_reason",
        "closed",
        "control",
        "exchanges",
        "frame",
        "heartbeat_due",
        "last_sent",
        "pending",
        "pending_candles",
        "pending_since",
        "seq",
        "shared",
        "symbols",
    )

    def __init__(
        self,
        symbols: frozenset[str] | None,
        exchanges: frozenset[str] | None,
        candles: frozenset[str] = frozenset(),
    ) -> None:
        self.symbols = symbols
        self.exchanges = exchanges
        self.candles = candles
        self.candle_pairs: set[Pair] = set()  # the (symbol, interval) pairs it holds in the book
        self.pending: dict[Key, Entry] = {}
        self.shared = False  # `pending` is the hub's dict, shared with other clients
        self.frame: str | None = None  # `pending` already serialised, if it is shared
        self.pending_candles: dict[CandleKey, Entry] = {}
        self.candles_shared = False
        self.candle_frame: str | None = None
        self.pending_since: float | None = None  # when the oldest unsent item arrived
        self.seq = 0  # the last frame's
        self.last_sent = math.inf  # when its sender last sent a frame (Trio time)
        self.heartbeat_due = False  # set by the hub after heartbeat_s without a frame
        self.control: deque[str | None] = deque()  # error frames and SNAPSHOT markers
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = trio.Event()
        self._wake: trio.Event | None = None
        self._room: trio.Event | None = None

    @property
    def shape(self) -> Shape:
        return (self.symbols, self.exchanges, self.candles)

    def wants(self, key: Key, current: frozenset[str]) -> bool:
        exchanges = current if self.exchanges is None else self.exchanges
        return key[0] in exchanges and (self.symbols is None or key[1] in self.symbols)

    def wants_candle(self, key: CandleKey, current: frozenset[str]) -> bool:
        source, symbol, interval, _ = key
        if interval not in self.candles or (
            self.symbols is not None and symbol not in self.symbols
        ):
            return False
        return source == "all" or source in (current if self.exchanges is None else self.exchanges)

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def deliver(self, changes: dict[Key, Entry], text: str | None, now: float) -> None:
        """Coalesce `changes` into the buffer (latest wins); `text` is `changes` serialised."""
        if not self.pending:
            self.pending, self.shared, self.frame = changes, True, text
        else:
            if self.shared:
                self.pending, self.shared = dict(self.pending), False
            self.pending.update(changes)
            self.frame = None
        if self.pending_since is None:
            self.pending_since = now
        self.wake()

    def deliver_candles(
        self, changes: dict[CandleKey, Entry], text: str | None, now: float
    ) -> None:
        """As `deliver`, for candles (the newest value of each candle wins)."""
        if not self.pending_candles:
            self.pending_candles, self.candles_shared, self.candle_frame = changes, True, text
        else:
            if self.candles_shared:
                self.pending_candles, self.candles_shared = dict(self.pending_candles), False
            self.pending_candles.update(changes)
            self.candle_frame = None
        if self.pending_since is None:
            self.pending_since = now
        self.wake()

    def take(self) -> tuple[dict[Key, Entry], str | None]:
        pending, text = self.pending, self.frame
        self.pending, self.shared, self.frame = {}, False, None
        return pending, text

    def take_candles(self) -> tuple[dict[CandleKey, Entry], str | None]:
        pending, text = self.pending_candles, self.candle_frame
        self.pending_candles, self.candles_shared, self.candle_frame = {}, False, None
        return pending, text

    def before_snapshot(self) -> None:
        """A snapshot is about to go out: it is newer than every buffered price and open candle;
        buffered closings stay (a snapshot carries open candles only)."""
        self.take()
        if self.pending_candles:
            closed = {k: e for k, e in self.pending_candles.items() if e["closed"]}
            self.pending_candles, self.candles_shared, self.candle_frame = closed, False, None

    async def put_control(self, item: str | None, now: float) -> None:
        """Queue an error frame or a snapshot; waits while CONTROL_MAX are already queued, so
        a client flooding bad messages is read no faster than it is answered."""
        while len(self.control) >= CONTROL_MAX and self.close_code is None:
            self._room = trio.Event()
            await self._room.wait()
        if self.close_code is not None:
            return  # nobody will send it
        self.control.append(item)
        if self.pending_since is None:
            self.pending_since = now
        self.wake()

    def pop_control(self) -> str | None:
        item = self.control.popleft()
        if self._room is not None:
            self._room.set()
            self._room = None
        return item

    @property
    def idle(self) -> bool:
        return not (self.control or self.pending or self.pending_candles)

    async def wait(self) -> None:
        """Until something is waiting to be sent, a heartbeat is due, or the client is
        closed."""
        while self.idle and not self.heartbeat_due and self.close_code is None:
            self._wake = trio.Event()
            await self._wake.wait()
        self._wake = None

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.wake()
        if self._room is not None:
            self._room.set()
        self.closed.set()


class PriceHub:
    """Owns the set of clients and the last published price of every key."""

    def __init__(
        self,
        state: MarketState,
        current_sources: Callable[[], Sequence[str]],
        *,
        stored: StoredMinutes,
        symbols: Sequence[str],
        all_sources: Sequence[str],
        interval_s: float,
        max_lag_s: float,
        fresh_ms: int | None = None,
        grace_ms: int = 2000,
        heartbeat_s: float | None = None,
        candle_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fresh_ms = fresh_ms  # a latest price older than this is left out of snapshots
        self._wake = trio.Event()  # poked: the state changed (a mirror applied an update)
        self.state = state
        self.current_sources = current_sources
        self.symbols = list(symbols)
        self.all_sources = list(all_sources)
        self.interval_s = interval_s
        self.max_lag_s = max_lag_s
        self.heartbeat_s = heartbeat_s  # None: no heartbeats
        self.clock = clock  # wall time, for candle closings and heartbeat times
        self.book = CandleBook(
            state, stored, all_sources=all_sources, grace_ms=grace_ms, clock=clock
        )
        # Candle changes gather here and go out at most once per candle_interval_s (None: every
        # step); the latest value of each candle wins.
        self.candle_interval_s = interval_s if candle_interval_s is None else candle_interval_s
        self._candle_backlog: dict[CandleKey, Entry] = {}
        self._candles_at = -math.inf
        self.clients: set[Client] = set()
        self.published: dict[Key, tuple[int, float]] = {}
        self.running = False
        self.stopped = False
        self._halt = trio.Event()
        self.frames_serialised = 0  # for tests and benchmarks: shared frames built

    # --- clients -----------------------------------------------------------------------------

    def add(
        self,
        symbols: frozenset[str] | None,
        exchanges: frozenset[str] | None,
        candles: frozenset[str] = frozenset(),
    ) -> Client:
        """Register a client with a snapshot queued as its first frame (the book already
        follows its candle pairs: see `candle_pairs`)."""
        client = Client(symbols, exchanges, candles)
        client.control.append(SNAPSHOT)
        if self.stopped:
            client.close(CLOSE_GOING_AWAY, "server shutting down")
        else:
            self.clients.add(client)
        return client

    def remove(self, client: Client) -> None:
        self.clients.discard(client)

    def drop(self, client: Client, code: int, reason: str) -> None:
        self.clients.discard(client)
        client.close(code, reason)

    def poke(self) -> None:
        """Publish now rather than at the next interval: a mirror calls this when an update
        arrived, so frames leave as soon as the data does (each client still gets at most one
        `prices` frame per interval: its sender paces it)."""
        self._wake.set()

    def close_all(self, code: int, reason: str) -> None:
        """Close every client and end `run()`; clients added later are closed at once."""
        self.stopped = True
        self._halt.set()
        self._wake.set()
        for client in list(self.clients):
            self.drop(client, code, reason)

    def candle_pairs(self, symbols: frozenset[str] | None, candles: frozenset[str]) -> set[Pair]:
        """The (symbol, interval) pairs the book follows for a subscription."""
        if not candles:
            return set()
        names = self.symbols if symbols is None else symbols
        return {(symbol, INTERVALS[name]) for symbol in names for name in candles}

    def snapshot(self, client: Client) -> str:
        """A `snapshot` frame of every subscribed key that has a price, from state as it is,
        plus the open candles of its candle subscription."""
        current = self.current_sources()
        sources = (
            current
            if client.exchanges is None
            else [s for s in self.all_sources if s in client.exchanges]
        )
        symbols = (
            self.symbols
            if client.symbols is None
            else [s for s in self.symbols if s in client.symbols]
        )
        keys = self.state.keys
        oldest = -1 if self.fresh_ms is None else int(self.clock() * 1000) - self.fresh_ms
        data = [
            entry(source, symbol, st.latest_price, st.latest_ts)
            for source in sources
            for symbol in symbols
            if (st := keys.get((source, symbol))) is not None and st.latest_ts >= max(oldest, 0)
        ]
        if not client.candles:
            return frame("snapshot", data)
        intervals = [ms for name, ms in INTERVALS.items() if name in client.candles]
        now_ms = int(self.clock() * 1000)
        candles = self.book.snapshot(symbols, sources, intervals, current, now_ms)
        return orjson.dumps({"type": "snapshot", "data": data, "candles": candles}).decode()

    # --- the hub task ------------------------------------------------------------------------

    def mark_published(self) -> None:
        """Take the current prices as already published (clients get them in snapshots)."""
        for key, st in self.state.keys.items():
            if st.latest_ts >= 0:
                self.published[key] = (st.latest_ts, st.latest_price)

    def changes(self) -> dict[Key, Entry]:
        """Keys whose latest price changed since the last call, as frame entries."""
        published = self.published
        changed: dict[Key, Entry] = {}
        for key, st in self.state.keys.items():
            ts = st.latest_ts
            if ts < 0:
                continue
            price = st.latest_price
            last = published.get(key)
            if last is None or last[0] != ts or last[1] != price:
                published[key] = (ts, price)
                changed[key] = entry(key[0], key[1], price, ts)
        return changed

    def publish(self, now: float) -> int:
        """One hub step: deliver the changes to every client, then drop lagging clients.

        Returns the number of changed keys. Never awaits, so no client can slow it down. The
        work per client is constant; filtering the changes is done once per subscription shape.
        """
        changed = self.changes()
        current_list = self.current_sources()
        candles = self.book.step(int(self.clock() * 1000), current_list)
        if candles or self._candle_backlog:
            self._candle_backlog.update(candles)
            if now >= self._candles_at - 1e-9:  # a step may start a hair early
                candles, self._candle_backlog = self._candle_backlog, {}
                self._candles_at = now + self.candle_interval_s
            else:
                candles = {}
        if (changed or candles) and self.clients:
            current = frozenset(current_list)
            by_shape: dict[Shape, list[Client]] = {}
            for client in self.clients:
                by_shape.setdefault(client.shape, []).append(client)
            for clients in by_shape.values():
                first = clients[0]
                mine = {key: e for key, e in changed.items() if first.wants(key, current)}
                if mine:
                    text: str | None = None
                    for client in clients:
                        if text is None and not client.pending:
                            text = frame("prices", mine.values())
                            self.frames_serialised += 1
                        client.deliver(mine, text, now)
                if not candles or not first.candles:
                    continue
                ours = {k: e for k, e in candles.items() if first.wants_candle(k, current)}
                if ours:
                    text = None
                    for client in clients:
                        if text is None and not client.pending_candles:
                            text = frame("candles", ours.values())
                            self.frames_serialised += 1
                        client.deliver_candles(ours, text, now)
        self.check_clients(now)
        return len(changed)

    def check_clients(self, now: float) -> None:
        """Drop lagging clients; wake the senders of those due a heartbeat (one pass over the
        clients per step, instead of a timer per client)."""
        heartbeat = self.heartbeat_s
        for client in list(self.clients):
            if (
                heartbeat is not None
                and not client.heartbeat_due
                and now - client.last_sent >= heartbeat
                and client.idle
            ):
                client.heartbeat_due = True
                client.wake()
            since = client.pending_since
            if since is not None and now - since > self.max_lag_s:
                log.warning(
                    "websocket client dropped: too slow",
                    extra={"ctx": {"lag_s": round(now - since, 3)}},
                )
                self.drop(client, CLOSE_POLICY, f"too slow: nothing drained for {self.max_lag_s}s")

    async def run(
        self,
        stopping: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish every `interval_s` (sooner when poked) until `stopping` is set or
        `close_all()` is called; on `stopping`, close every client with 1001. Also runs the
        book's `keep_exact`.

        Runs in the node's nursery; cancelling it just stops the publishing. Each client's
        sender paces its frames, so no client gets more than one `prices` frame per interval.
        """
        if self.running:
            task_status.started()
            return
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_on, stopping)
                nursery.start_soon(self.book.keep_exact)
                self.mark_published()
                task_status.started()
                while not self.stopped:
                    started = trio.current_time()
                    self._wake = trio.Event()
                    self.publish(started)
                    with trio.move_on_at(started + self.interval_s):
                        await self._wake.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.running = False

    async def _close_on(self, stopping: trio.Event) -> None:
        await stopping.wait()
        self.close_all(CLOSE_GOING_AWAY, "server shutting down")

    # --- one client's sender -----------------------------------------------------------------

    async def pump(self, client: Client, send: Callable[[str], Awaitable[None]]) -> None:
        """Send `client`'s frames until it is closed: queued snapshots and answers first, then
        at most one `prices` and one `candles` frame per `interval_s`, and a `heartbeat` after
        `heartbeat_s` without any other frame. Every frame carries the client's next `seq`.
        Owned by the client's connection handler; `send` may block (a slow network) without
        affecting anyone else."""
        last_data = -self.interval_s

        async def send_frame(body: str) -> None:
            client.seq += 1
            client.heartbeat_due = False
            await send(with_seq(client.seq, body))
            client.last_sent = trio.current_time()

        client.last_sent = trio.current_time()
        while True:
            await client.wait()
            if client.close_code is not None:
                return
            if client.idle:  # woken for a heartbeat only
                time_ms = int(self.clock() * 1000)
                await send_frame(f'{{"type":"heartbeat","time":{time_ms}}}')
                continue
            while client.control:
                item = client.pop_control()
                if item is SNAPSHOT:
                    client.before_snapshot()
                    item = self.snapshot(client)
                if client.idle:
                    client.pending_since = None
                await send_frame(item)
                if client.close_code is not None:
                    return
            if not (client.pending or client.pending_candles):
                continue
            delay = last_data + self.interval_s - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            pending, text = client.take()
            pending_candles, candle_text = client.take_candles()
            if not client.control:
                client.pending_since = None
            last_data = trio.current_time()
            if pending:
                await send_frame(text or frame("prices", pending.values()))
            if pending_candles and client.close_code is None:
                await send_frame(candle_text or frame("candles", pending_candles.values()))
