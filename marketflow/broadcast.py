"""Fan-out of latest prices to WebSocket clients (contract: WebSocket).

One hub task (`PriceHub.run`) wakes every `interval_s`, compares each key's latest price with
what it last published (keys are few) and hands each client the changed keys it subscribes to.
It never awaits a client: it only writes into the client's coalescing buffer, a dict key ->
newest entry, which can never hold more entries than there are keys. Each client has its own
sender task (`PriceHub.pump`) that empties that buffer into one `prices` frame at a time.

Frames are serialised once per subscription shape (same symbols, same exchanges) and shared by
every client of that shape whose buffer was empty; a lagging client merges into a private copy
and its sender serialises its own frame. A client whose buffer has waited for more than
`max_lag_s` is dropped (close 1008); on shutdown every client is closed with 1001.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import orjson
import trio

from marketflow.models import Key
from marketflow.state import MarketState

log = logging.getLogger("marketflow.ws")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CONTROL_MAX: Final = 16  # queued snapshot/error frames per client before its reader waits

Entry = dict[str, Any]  # {"symbol","exchange","price","timestamp"}: shared, never mutated
Shape = tuple[frozenset[str] | None, frozenset[str] | None]
SNAPSHOT: Final = None  # a control item: build a snapshot frame when it is sent


def entry(source: str, symbol: str, price: float, ts: int) -> Entry:
    return {"symbol": symbol, "exchange": source, "price": price, "timestamp": ts}


def frame(kind: str, data: Iterable[Entry]) -> str:
    return orjson.dumps({"type": kind, "data": list(data)}).decode()


def error_frame(message: str) -> str:
    return orjson.dumps({"type": "error", "error": message}).decode()


class Client:
    """One subscriber as the hub sees it: what it wants and what waits to be sent to it.

    `symbols` None means every configured symbol; `exchanges` None means the current mode's
    sources, whatever the mode is when a price changes.
    """

    __slots__ = (
        "_room",
        "_wake",
        "close_code",
        "close_reason",
        "closed",
        "control",
        "exchanges",
        "frame",
        "pending",
        "pending_since",
        "shared",
        "symbols",
    )

    def __init__(self, symbols: frozenset[str] | None, exchanges: frozenset[str] | None) -> None:
        self.symbols = symbols
        self.exchanges = exchanges
        self.pending: dict[Key, Entry] = {}
        self.shared = False  # `pending` is the hub's dict, shared with other clients
        self.frame: str | None = None  # `pending` already serialised, if it is shared
        self.pending_since: float | None = None  # when the oldest unsent item arrived
        self.control: deque[str | None] = deque()  # error frames and SNAPSHOT markers
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = trio.Event()
        self._wake: trio.Event | None = None
        self._room: trio.Event | None = None

    @property
    def shape(self) -> Shape:
        return (self.symbols, self.exchanges)

    def wants(self, key: Key, current: frozenset[str]) -> bool:
        exchanges = current if self.exchanges is None else self.exchanges
        return key[0] in exchanges and (self.symbols is None or key[1] in self.symbols)

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

    def take(self) -> tuple[dict[Key, Entry], str | None]:
        pending, text = self.pending, self.frame
        self.pending, self.shared, self.frame = {}, False, None
        return pending, text

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

    async def wait(self) -> None:
        """Until something is waiting to be sent, or the client is closed."""
        while not (self.control or self.pending or self.close_code is not None):
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
        symbols: Sequence[str],
        all_sources: Sequence[str],
        interval_s: float,
        max_lag_s: float,
        fresh_ms: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fresh_ms = fresh_ms  # a latest price older than this is left out of snapshots
        self.clock = clock
        self._wake = trio.Event()  # poked: the state changed (a mirror applied an update)
        self.state = state
        self.current_sources = current_sources
        self.symbols = list(symbols)
        self.all_sources = list(all_sources)
        self.interval_s = interval_s
        self.max_lag_s = max_lag_s
        self.clients: set[Client] = set()
        self.published: dict[Key, tuple[int, float]] = {}
        self.running = False
        self.stopped = False
        self._halt = trio.Event()
        self.frames_serialised = 0  # for tests and benchmarks: shared frames built

    # --- clients -----------------------------------------------------------------------------

    def add(self, symbols: frozenset[str] | None, exchanges: frozenset[str] | None) -> Client:
        """Register a client with a snapshot queued as its first frame."""
        client = Client(symbols, exchanges)
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

    def snapshot(self, client: Client) -> str:
        """A `snapshot` frame of every subscribed key that has a price, from state as it is."""
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
        return frame("snapshot", data)

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

        Returns the number of changed keys. Never awaits, so no client can slow it down.
        """
        changed = self.changes()
        if changed and self.clients:
            current = frozenset(self.current_sources())
            by_shape: dict[Shape, list[Client]] = {}
            for client in self.clients:
                by_shape.setdefault(client.shape, []).append(client)
            for clients in by_shape.values():
                wants = clients[0].wants
                mine = {key: e for key, e in changed.items() if wants(key, current)}
                if not mine:
                    continue
                text: str | None = None
                for client in clients:
                    if text is None and not client.pending:
                        text = frame("prices", mine.values())
                        self.frames_serialised += 1
                    client.deliver(mine, text, now)
        self.drop_lagging(now)
        return len(changed)

    def drop_lagging(self, now: float) -> None:
        for client in list(self.clients):
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
        """Publish every `interval_s` until `stopping` is set or `close_all()` is called; on
        `stopping`, close every client with 1001.

        Runs in the service's (or the ASGI lifespan's) nursery; cancelling it just stops the
        publishing. Publishing starts are at least `interval_s` apart, so no client gets more
        than one `prices` frame per interval.
        """
        if self.running:
            task_status.started()
            return
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_on, stopping)
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
        """Send `client`'s frames until it is closed: queued snapshots and errors first, then
        at most one `prices` frame per `interval_s`. Owned by the client's connection handler;
        `send` may block (a slow network) without affecting anyone else."""
        last_prices = -self.interval_s
        while True:
            await client.wait()
            if client.close_code is not None:
                return
            while client.control:
                item = client.pop_control()
                if item is SNAPSHOT:
                    client.take()  # the snapshot is newer than anything buffered
                    item = self.snapshot(client)
                if not client.control and not client.pending:
                    client.pending_since = None
                await send(item)
                if client.close_code is not None:
                    return
            if not client.pending:
                continue
            delay = last_prices + self.interval_s - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            pending, text = client.take()
            if not pending:
                continue
            if not client.control:
                client.pending_since = None
            if text is None:
                text = frame("prices", pending.values())
            last_prices = trio.current_time()
            await send(text)
