"""A local WebSocket server that replays a venue recording and speaks that venue's rules.

`VenueServer("okx")` listens on a free port of 127.0.0.1 (on wsproto directly, so a test can
make it fall silent down to the WebSocket ping). Each connection:

- learns what the client subscribes to as the venue would: Binance from the URL's `streams=`,
  the others from their subscribe frames; it answers each with the venue's ack, or with the
  venue's refusal for a pair in `refuse` (Binance, which takes pairs in the URL and names no
  refused pair, gets the error frame Binance sends for an invalid stream);
- once subscriptions have settled, replays the recording from where the previous connection
  stopped, skipping the data frames of pairs not subscribed, with every venue timestamp shifted
  by the same whole number of seconds (`delta_s`) so that the last trade lies just before now;
- replays what the venue replays on (re)subscribe: on a later connection, Coinbase's snapshot
  of the product's last trades (newest first) and OKX's last trade per instrument;
- keeps the venue's keep-alive: Binance pings every 20 s and answers pings, Coinbase sends a
  heartbeat a second once the recording is exhausted (when subscribed), Kraken a heartbeat
  event a second, OKX answers `ping` with `pong` and closes a connection that sends it nothing
  for 30 s, Bybit answers `{"op":"ping"}` with its JSON pong.

Faults, per connection (index 0 is the first): `close_after[i]` frames then a close by the
server, `stall_after[i]` frames then total silence (no data, no pong) with the socket open;
`inject` puts extra raw frames before a recorded frame index; `frames_per_write` sends frames
in groups of one TCP write each, like a busy venue's.

`recorded_trades(venue)` reads the trades of a recording independently of the code under test
(Decimal prices, integer-only timestamps) for the tests' expectations.
"""

from __future__ import annotations

import json
import math
import ssl
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

RECORDINGS = Path(__file__).resolve().parent / "fixtures" / "exchange-recordings"
VENUES = ("binance", "coinbase", "kraken", "okx", "bybit")
SETTLE_S = 1.0  # no new subscribe frame for this long: the client has subscribed to all it wants
SNAPSHOT_TRADES = 100  # Coinbase's snapshot: the product's last 100 trades


def load(venue: str) -> tuple[dict[str, Any], list[str]]:
    """(header, raw frames) of a recording."""
    lines = (RECORDINGS / f"{venue}.ndjson").read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line)["msg"] for line in lines[1:]]


# --- reading a recording independently: the expectations ----------------------------------


def _iso_ms(text: str) -> int:
    """ISO-8601 UTC (`…:02.876095Z`) -> epoch ms, floored, from its digits."""
    whole, _, rest = text.partition(".")
    digits = rest.rstrip("Z")
    seconds = int(datetime.fromisoformat(whole.rstrip("Z") + "+00:00").timestamp())
    return seconds * 1000 + int((digits + "000")[:3])


def _seconds_ms(text: str) -> int:
    return int((Decimal(text) * 1000).to_integral_value(rounding=ROUND_FLOOR))


def recorded_trades(venue: str) -> list[tuple[str, Decimal, int, str | None]]:
    """Every trade of the recording in arrival order: (pair, price, ms, trade id)."""
    out: list[tuple[str, Decimal, int, str | None]] = []
    for raw in load(venue)[1]:
        m = json.loads(raw)
        if venue == "binance":
            d = m["data"]
            out.append((d["s"], Decimal(d["p"]), d["T"], str(d["a"])))
        elif venue == "coinbase" and m["channel"] == "market_trades":
            for event in m["events"]:
                for t in event["trades"]:
                    out.append(
                        (t["product_id"], Decimal(t["price"]), _iso_ms(t["time"]), t["trade_id"])
                    )
        elif venue == "kraken" and isinstance(m, list) and m[-2] == "trade":
            for t in m[1]:
                out.append((m[-1], Decimal(t[0]), _seconds_ms(t[2]), None))
        elif venue == "okx" and m.get("arg", {}).get("channel") == "trades" and "data" in m:
            for t in m["data"]:
                out.append((t["instId"], Decimal(t["px"]), int(t["ts"]), t["tradeId"]))
        elif venue == "bybit" and m.get("topic", "").startswith("publicTrade."):
            for t in m["data"]:
                out.append((t["s"], Decimal(t["p"]), t["T"], t["i"]))
    return out


def shift_for_now(venue: str) -> int:
    """Whole seconds that move the recording's last trade to about one second before now."""
    last_ms = max(ts for _, _, ts, _ in recorded_trades(venue))
    return int(time.time()) - math.ceil(last_ms / 1000) - 1


# --- shifting a frame's venue timestamps by whole seconds ---------------------------------


def _shift_iso(text: str, delta_s: int) -> str:
    whole, dot, rest = text.partition(".")
    moved = datetime.fromisoformat(whole.rstrip("Z") + "+00:00") + timedelta(seconds=delta_s)
    tail = dot + rest if dot else ("Z" if whole.endswith("Z") else "")
    return moved.strftime("%Y-%m-%dT%H:%M:%S") + tail


def _shift_seconds(text: str, delta_s: int) -> str:
    whole, dot, fraction = text.partition(".")
    return f"{int(whole) + delta_s}{dot}{fraction}"


def shift_frame(venue: str, message: Any, delta_s: int) -> Any:
    ms = delta_s * 1000
    if venue == "binance" and isinstance(message.get("data"), dict):
        data = message["data"]
        for key in ("E", "T"):
            if isinstance(data.get(key), int):
                data[key] += ms
    elif venue == "coinbase":
        if isinstance(message.get("timestamp"), str):
            message["timestamp"] = _shift_iso(message["timestamp"], delta_s)
        for event in message.get("events", []):
            for trade in event.get("trades", []):
                trade["time"] = _shift_iso(trade["time"], delta_s)
    elif venue == "kraken" and isinstance(message, list) and message[-2] == "trade":
        for trade in message[1]:
            trade[2] = _shift_seconds(trade[2], delta_s)
    elif venue == "okx":
        for entry in message.get("data", []):
            if isinstance(entry.get("ts"), str):
                entry["ts"] = str(int(entry["ts"]) + ms)
    elif venue == "bybit":
        if isinstance(message.get("ts"), int):
            message["ts"] += ms
        data = message.get("data")
        for entry in data if isinstance(data, list) else []:
            entry["T"] += ms
    return message


def data_pair(venue: str, message: Any) -> str | None:
    """The pair a data frame is about; None for control frames (acks, heartbeats, status)."""
    if venue == "binance":
        return str(message["data"]["s"]) if isinstance(message.get("data"), dict) else None
    if venue == "coinbase":
        for event in message.get("events", []):
            for item in event.get("trades", []) + event.get("tickers", []):
                return str(item["product_id"])
        return None
    if venue == "kraken":
        return str(message[-1]) if isinstance(message, list) else None
    if venue == "okx":
        return str(message["arg"]["instId"]) if "data" in message else None
    if venue == "bybit":
        topic = message.get("topic", "")
        return str(topic.rsplit(".", 1)[-1]) if topic else None
    raise ValueError(venue)


# --- the server ------------------------------------------------------------------------------


class _Connection:
    """One accepted WebSocket on wsproto: serialised sends, fragmented texts joined."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.lock = trio.Lock()
        self.target = ""
        self._text: list[str] = []
        self._ready: deque[str | Ping] = deque()
        self._done = False

    async def accept(self) -> bool:
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Request):
                    self.target = event.target
                    await self._write(self.ws.send(AcceptConnection()))
                    return True

    async def _write(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    @property
    def open(self) -> bool:
        return self.ws.state is ConnectionState.OPEN

    async def send(self, text: str) -> None:
        if self.open:
            await self._write(self.ws.send(TextMessage(data=text)))

    async def send_many(self, texts: list[str]) -> None:
        """Several frames in one write, as a busy venue's frames share TCP segments."""
        if self.open and texts:
            await self._write(b"".join(self.ws.send(TextMessage(data=t)) for t in texts))

    async def ping(self) -> None:
        if self.open:
            await self._write(self.ws.send(Ping(payload=b"srv")))

    async def pong(self, ping: Ping) -> None:
        if self.open:
            await self._write(self.ws.send(ping.response()))

    async def close(self, code: int = 1000) -> None:
        if self.open:
            await self._write(self.ws.send(CloseConnection(code=code)))

    async def next_event(self) -> str | Ping | None:
        """The client's next text or ping; None once it closed."""
        while not self._ready:
            if self._done:
                return None
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    part = event.data if isinstance(event.data, str) else event.data.decode()
                    self._text.append(part)
                    if event.message_finished:
                        self._ready.append("".join(self._text))
                        self._text.clear()
                elif isinstance(event, Ping):
                    self._ready.append(event)
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self._write(self.ws.send(event.response()))
                    self._done = True
                    break
        return self._ready.popleft()


class VenueServer:
    """See the module docstring. Counters are for the tests: `connections`, `pings`,
    `subscribe_frames`."""

    def __init__(
        self,
        venue: str,
        *,
        refuse: tuple[str, ...] = (),
        close_after: dict[int, int] | None = None,
        stall_after: dict[int, int] | None = None,
        inject: dict[int, list[str]] | None = None,
        pace_s: float = 0.0,
        frames_per_write: int = 1,
        delta_s: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.venue = venue
        header, self.frames = load(venue)
        self.header = header
        self.refuse = set(refuse)
        self.close_after = close_after or {}
        self.stall_after = stall_after or {}
        self.inject = inject or {}
        self.pace_s = pace_s
        self.frames_per_write = frames_per_write
        self.tls = tls  # serve wss:// with this context
        self.delta_s = shift_for_now(venue) if delta_s is None else delta_s
        self.port = 0
        self.cursor = 0  # the next recorded frame to replay, across connections
        self.connections = 0
        self.pings = 0  # keep-alive pings received (WebSocket or text)
        self.subscribe_frames: list[str] = []
        self.connected_at: list[float] = []  # trio.current_time() of each accepted connection
        self.ended_at: list[float] = []  # when the server closed a connection or fell silent
        self.replayed_trades = 0  # trades sent again on a resubscription (Coinbase, OKX)
        self.sent_trades: dict[str, list[dict[str, Any]]] = defaultdict(list)  # coinbase
        self.last_trade_frame: dict[str, str] = {}  # okx
        self.exhausted = trio.Event()  # the whole recording was sent
        self._channel_ids: dict[str, int] = {}

    @property
    def url(self) -> str:
        path = "/stream" if self.venue == "binance" else "/"
        scheme = "ws" if self.tls is None else "wss"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; each connection runs in this task's nursery."""
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if self.tls is not None:
            listeners = [trio.SSLListener(t, self.tls, https_compatible=True) for t in tcp]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        conn = _Connection(stream)
        index = self.connections
        self.connections += 1
        try:
            async with stream:
                if await conn.accept():
                    self.connected_at.append(trio.current_time())
                    await _Session(self, conn, index).run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (or failed the TLS handshake): its business

    # venue rules shared by the sessions

    def ack(self, pair: str, request: dict[str, Any]) -> str:
        venue = self.venue
        if venue == "coinbase":
            return json.dumps(
                {
                    "channel": "subscriptions",
                    "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "sequence_num": 0,
                    "events": [{"subscriptions": {request["channel"]: request["product_ids"]}}],
                }
            )
        if venue == "kraken":
            channel_id = self._channel_ids.setdefault(pair, 900 + len(self._channel_ids))
            return json.dumps(
                {
                    "channelID": channel_id,
                    "channelName": "trade",
                    "event": "subscriptionStatus",
                    "pair": pair,
                    "status": "subscribed",
                    "subscription": {"name": "trade"},
                }
            )
        if venue == "okx":
            arg = {"channel": "trades", "instId": pair}
            return json.dumps({"event": "subscribe", "arg": arg, "connId": "a1b2c3d4"})
        if venue == "bybit":
            return json.dumps(
                {
                    "success": True,
                    "ret_msg": "subscribe",
                    "conn_id": "test-conn",
                    "req_id": request.get("req_id", ""),
                    "op": "subscribe",
                }
            )
        raise ValueError(venue)

    def refusal(self, pair: str, request: dict[str, Any]) -> str:
        venue = self.venue
        if venue == "binance":
            return json.dumps(
                {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": None}
            )
        if venue == "coinbase":
            return json.dumps(
                {
                    "type": "error",
                    "message": "Failed to subscribe",
                    "reason": f"{pair} is not a valid product",
                }
            )
        if venue == "kraken":
            return json.dumps(
                {
                    "errorMessage": "Currency pair not supported",
                    "event": "subscriptionStatus",
                    "pair": pair,
                    "status": "error",
                    "subscription": {"name": "trade"},
                }
            )
        if venue == "okx":
            return json.dumps(
                {
                    "event": "error",
                    "code": "60018",
                    "msg": f"Wrong URL or channel:trades,instId:{pair} doesn't exist.",
                    "connId": "a1b2c3d4",
                }
            )
        if venue == "bybit":
            return json.dumps(
                {
                    "success": False,
                    "ret_msg": f"Invalid symbol :[publicTrade.{pair}]",
                    "conn_id": "test-conn",
                    "req_id": request.get("req_id", ""),
                    "op": "subscribe",
                }
            )
        raise ValueError(venue)

    def requested_pairs(self, text: str) -> tuple[list[str], dict[str, Any]] | None:
        """The trade pairs a client frame subscribes to, or None if it is not a subscribe."""
        try:
            message = json.loads(text)
        except ValueError:
            return None
        if not isinstance(message, dict):
            return None
        venue = self.venue
        if venue == "coinbase" and message.get("type") == "subscribe":
            if message.get("channel") == "market_trades":
                return list(message["product_ids"]), message
            return [], message
        if venue == "kraken" and message.get("event") == "subscribe":
            return list(message["pair"]), message
        if venue == "okx" and message.get("op") == "subscribe":
            return [a["instId"] for a in message["args"] if a.get("channel") == "trades"], message
        if venue == "bybit" and message.get("op") == "subscribe":
            return [
                t.split(".", 1)[1] for t in message["args"] if t.startswith("publicTrade.")
            ], message
        return None


class _Session:
    """One connection's life."""

    def __init__(self, server: VenueServer, conn: _Connection, index: int) -> None:
        self.server = server
        self.conn = conn
        self.index = index
        self.venue = server.venue
        self.pairs: set[str] = set()
        self.heartbeats = False
        self.last_subscribe = trio.current_time()
        self.subscribed_once = trio.Event()
        self.stalled = False
        self.last_client_frame = trio.current_time()

    async def run(self) -> None:
        if self.venue == "binance":
            query = urllib.parse.urlsplit(self.conn.target).query
            streams = urllib.parse.parse_qs(query).get("streams", [""])[0]
            for stream in filter(None, streams.split("/")):
                pair = stream.split("@", 1)[0].upper()
                if pair in self.server.refuse:
                    await self.conn.send(self.server.refusal(pair, {}))
                else:
                    self.pairs.add(pair)
            self.subscribed_once.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._replay)
            nursery.start_soon(self._keep_alive)
            while (event := await self.conn.next_event()) is not None:
                if self.stalled:
                    continue  # silence: not even a pong
                self.last_client_frame = trio.current_time()
                if isinstance(event, Ping):
                    self.server.pings += 1
                    await self.conn.pong(event)
                else:
                    await self._client_text(event)
            nursery.cancel_scope.cancel()

    async def _client_text(self, text: str) -> None:
        server = self.server
        if self.venue == "okx" and text == "ping":
            server.pings += 1
            await self.conn.send("pong")
            return
        try:
            message = json.loads(text)
        except ValueError:
            return
        if self.venue == "bybit" and isinstance(message, dict) and message.get("op") == "ping":
            server.pings += 1
            pong = {
                "success": True,
                "ret_msg": "pong",
                "conn_id": "test-conn",
                "req_id": "",
                "op": "ping",
            }
            await self.conn.send(json.dumps(pong))
            return
        if self.venue == "kraken" and isinstance(message, dict) and message.get("event") == "ping":
            server.pings += 1
            await self.conn.send(json.dumps({"event": "pong", "reqid": message.get("reqid")}))
            return
        requested = server.requested_pairs(text)
        if requested is None:
            return
        server.subscribe_frames.append(text)
        pairs, request = requested
        if self.venue == "coinbase" and request.get("channel") == "heartbeats":
            self.heartbeats = True
        for pair in pairs:
            if pair in server.refuse:
                await self.conn.send(server.refusal(pair, request))
                continue
            self.pairs.add(pair)
            await self.conn.send(server.ack(pair, request))
            if self.index > 0:
                await self._replay_on_subscribe(pair)
        if self.venue == "coinbase" and not pairs:
            await self.conn.send(server.ack("", request))
        self.last_subscribe = trio.current_time()
        self.subscribed_once.set()

    async def _replay_on_subscribe(self, pair: str) -> None:
        """What the venue sends again on a new subscription: the trades a client may have."""
        server = self.server
        if self.venue == "coinbase" and server.sent_trades[pair]:
            recent = server.sent_trades[pair][-SNAPSHOT_TRADES:][::-1]
            snapshot = {
                "channel": "market_trades",
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "sequence_num": 0,
                "events": [{"type": "snapshot", "trades": recent}],
            }
            server.replayed_trades += len(recent)
            await self.conn.send(json.dumps(snapshot))
        elif self.venue == "okx" and pair in server.last_trade_frame:
            server.replayed_trades += 1
            await self.conn.send(server.last_trade_frame[pair])

    async def _replay(self) -> None:
        server = self.server
        await self.subscribed_once.wait()
        while trio.current_time() < self.last_subscribe + SETTLE_S:  # moved by new subscribes
            await trio.sleep_until(self.last_subscribe + SETTLE_S)
        sent = 0
        close_after = server.close_after.get(self.index)
        stall_after = server.stall_after.get(self.index)
        pending: list[str] = []  # frames for one write: `frames_per_write` of them
        while server.cursor < len(server.frames):
            if close_after is not None and sent >= close_after:
                await self.conn.send_many(pending)
                server.ended_at.append(trio.current_time())
                await self.conn.close(1001)
                return
            if stall_after is not None and sent >= stall_after:
                await self.conn.send_many(pending)
                server.ended_at.append(trio.current_time())
                self.stalled = True
                await trio.sleep_forever()
            pending += server.inject.pop(server.cursor, [])
            raw = server.frames[server.cursor]
            server.cursor += 1
            message = json.loads(raw)
            pair = data_pair(self.venue, message)
            if pair is not None and pair not in self.pairs:
                continue
            message = shift_frame(self.venue, message, server.delta_s)
            text = json.dumps(message, separators=(",", ":"))
            self._remember(message, pair, text)
            pending.append(text)
            sent += 1
            if len(pending) >= server.frames_per_write:
                await self.conn.send_many(pending)
                pending = []
            if server.pace_s:
                await trio.sleep(server.pace_s)
        await self.conn.send_many(pending)
        server.exhausted.set()

    def _remember(self, message: Any, pair: str | None, text: str) -> None:
        if pair is None:
            return
        if self.venue == "coinbase" and message["channel"] == "market_trades":
            for event in message["events"]:
                self.server.sent_trades[pair].extend(event["trades"])
        elif self.venue == "okx" and message["arg"]["channel"] == "trades":
            self.server.last_trade_frame[pair] = text

    async def _keep_alive(self) -> None:
        """The server side of the venue's keep-alive, while the connection is not stalled."""
        venue = self.venue
        while not self.stalled:
            if venue == "binance":
                await trio.sleep(20)
                if not self.stalled:
                    await self.conn.ping()
            elif venue in ("coinbase", "kraken"):
                await trio.sleep(1)
                if self.stalled or not self.server.exhausted.is_set():
                    continue
                if venue == "kraken":
                    await self.conn.send('{"event":"heartbeat"}')
                elif self.heartbeats:
                    beat = {
                        "channel": "heartbeats",
                        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                        "sequence_num": 0,
                        "events": [{"current_time": "now", "heartbeat_counter": 1}],
                    }
                    await self.conn.send(json.dumps(beat))
            elif venue == "okx":
                await trio.sleep(1)
                if not self.stalled and trio.current_time() - self.last_client_frame > 30:
                    await self.conn.close(4004)  # OKX: no data for 30 s
                    return
            else:
                await trio.sleep_forever()


@asynccontextmanager
async def venue_server(venue: str, **options: Any) -> AsyncIterator[VenueServer]:
    """A running `VenueServer` for the length of the block."""
    server = VenueServer(venue, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


@contextmanager
def venue_server_thread(venue: str, **options: Any) -> Iterator[VenueServer]:
    """A `VenueServer` on its own Trio loop in a thread, for tests driving real processes."""
    server = VenueServer(venue, **options)
    ready = threading.Event()
    stop: Callable[[], None] | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            token = trio.lowlevel.current_trio_token()
            stop = lambda: token.run_sync_soon(nursery.cancel_scope.cancel)  # noqa: E731
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10) or failure:
        raise AssertionError(f"venue server did not start: {failure!r}")
    try:
        yield server
    finally:
        assert stop is not None
        stop()
        thread.join(10)
