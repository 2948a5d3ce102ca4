"""Trio clients the benchmarks measure with: a keep-alive HTTP poller and a WebSocket follower.

Both take their time from the wall clock (`time.time()`), as the blaster stamps its ticks, so
`now - timestamp` is a tick's age when the client sees it: the feed's send, marketflow's read,
fold and answer (or hub interval and frame), and the client's own receive.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import trio
from trio_websocket import ConnectionClosed, open_websocket_url


def now_ms() -> float:
    return time.time() * 1000


class HttpClient:
    """A minimal HTTP/1.1 keep-alive client for GETs against one server (`Content-Length` or
    chunked bodies).

    Hypercorn closes a keep-alive connection after `keep_alive_max_requests` (1,000) requests;
    like wrk and browsers, the client then opens a new one and repeats the request.
    """

    def __init__(self, stream: trio.SocketStream, host: str, port: int) -> None:
        self.stream = stream
        self.host = host
        self.port = port
        self.buffer = bytearray()
        self.connections = 1

    @classmethod
    async def connect(cls, host: str, port: int) -> HttpClient:
        return cls(await trio.open_tcp_stream(host, port), host, port)

    async def get(self, path: str) -> tuple[int, bytes]:
        try:
            return await self._get(path)
        except (ConnectionError, trio.BrokenResourceError):
            if self.buffer:
                raise  # closed in the middle of an answer
            await self.stream.aclose()
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.connections += 1
            return await self._get(path)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    async def _get(self, path: str) -> tuple[int, bytes]:
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        await self.stream.send_all(request)
        head = (await self._until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int((await self._until(b"\r\n")).split(b";")[0], 16):
                body += await self._exactly(size)
                await self._until(b"\r\n")
            await self._until(b"\r\n")  # the end of the (empty) trailer
            return status, bytes(body)
        return status, await self._exactly(int(headers.get("content-length", "0")))

    async def _until(self, marker: bytes) -> bytes:
        """The buffered bytes up to `marker` (consumed with it)."""
        while (end := self.buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(marker)]
        return data

    async def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def poll_latest(
    host: str, port: int, path: str, *, until: float, interval_s: float, lags: list[float]
) -> int:
    """GET `path` every `interval_s` until trio time `until`; append now - timestamp to `lags`
    each time the answer's timestamp changed. Returns the number of requests made."""
    client = await HttpClient.connect(host, port)
    last_ts = None
    requests = 0
    try:
        while trio.current_time() < until:
            status, body = await client.get(path)
            seen = now_ms()
            requests += 1
            if status == 200:
                ts = orjson.loads(body)["timestamp"]
                if ts != last_ts:
                    if last_ts is not None:  # the first answer may be old news
                        lags.append(seen - ts)
                    last_ts = ts
            await trio.sleep(interval_s)
    finally:
        await client.aclose()
    return requests


class FrameStats:
    """What one WebSocket client saw: frames, the gaps between them and each price's age."""

    __slots__ = ("frames", "lags", "last", "max_gap_ms", "prices", "snapshots")

    def __init__(self) -> None:
        self.frames = 0
        self.prices = 0
        self.snapshots = 0
        self.last: float | None = None
        self.max_gap_ms = 0.0
        self.lags: list[float] = []

    def see(self, message: str | bytes, measuring: bool, keep_lag: Callable[[int], bool]) -> None:
        seen = now_ms()
        frame = orjson.loads(message)
        if frame.get("type") != "prices":
            self.snapshots += frame.get("type") == "snapshot"
            self.last = seen
            return
        if measuring:
            self.frames += 1
            data = frame["data"]
            self.prices += len(data)
            if self.last is not None:
                self.max_gap_ms = max(self.max_gap_ms, seen - self.last)
            if keep_lag(self.frames):
                self.lags.extend(seen - e["timestamp"] for e in data)
        self.last = seen


async def follow_ws(
    url: str,
    stats: FrameStats,
    *,
    measuring: Callable[[], bool],
    until: float,
    keep_lag: Callable[[int], bool] = lambda _: True,
    connected: trio.Event | None = None,
) -> None:
    """Read frames from `url` until trio time `until`, recording them in `stats`."""
    with trio.move_on_at(until):
        async with open_websocket_url(url) as ws:
            if connected is not None:
                connected.set()
            try:
                while True:
                    stats.see(await ws.get_message(), measuring(), keep_lag)
            except ConnectionClosed:
                return
