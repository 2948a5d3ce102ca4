"""`WS /ws/prices` against the real process: frames, pacing, errors and the 1001 on shutdown."""

from __future__ import annotations

import itertools
import signal
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.e2e.conftest import Factory

OLD_CLIENT_TYPES = {"snapshot", "prices", "error"}


async def frame(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame as a client written before protocol v1 sees it: it ignores the `seq`
    field and the frame types it does not know (ack, heartbeat, ...)."""
    while True:
        with trio.fail_after(5):
            message = orjson.loads(await ws.get_message())
        assert isinstance(message, dict) and isinstance(message.pop("seq"), int)
        if message["type"] in OLD_CLIENT_TYPES:
            return message


async def closed_code(ws: WebSocketConnection) -> int:
    """Read until the server closes; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        code = closed.reason.code
    finally:
        # trio-websocket 0.12 never closes the TCP stream when the server closed first.
        await ws._stream.aclose()
    assert isinstance(code, int)
    return code


async def test_stream_paces_frames_answers_messages_and_closes_1001(marketflow: Factory) -> None:
    mf = marketflow({"app": {"ws_min_interval_ms": 200}})
    url = f"ws://127.0.0.1:{mf.port}/ws/prices?symbols=btcusdt,ETHUSDT"
    with trio.fail_after(30):
        async with open_websocket_url(url) as ws:
            first = await frame(ws)
            assert first["type"] == "snapshot"
            arrivals: list[float] = []
            while len(arrivals) < 6:
                message = await frame(ws)
                assert message["type"] == "prices"
                arrivals.append(trio.current_time())
                for entry in message["data"]:
                    assert entry["symbol"] in ("BTCUSDT", "ETHUSDT")
                    assert entry["exchange"].startswith("test-exchange")
                    assert set(entry) == {"symbol", "exchange", "price", "timestamp"}
                # One frame per interval carries every changed key (latest wins), not one per tick.
                keys = [(e["exchange"], e["symbol"]) for e in message["data"]]
                assert len(keys) == len(set(keys))
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert min(gaps) > 0.1, gaps  # at most one frame per 200 ms (network jitter allowed)

            await ws.send_message('{"op":"subscribe","symbols":["NOPE"]}')
            while (message := await frame(ws))["type"] == "prices":
                pass
            assert message == {"type": "error", "error": "unknown symbol NOPE"}
            await ws.send_message('{"op":"unsubscribe","exchanges":["test-exchange1"]}')
            while (message := await frame(ws))["type"] == "prices":
                pass
            assert message["type"] == "snapshot"
            assert all(e["exchange"] != "test-exchange1" for e in message["data"])

            mf.signal(signal.SIGINT)
            assert await closed_code(ws) == 1001
    assert await trio.to_thread.run_sync(mf.wait, 20) == 0


async def test_bad_query_gets_an_error_then_1008(marketflow: Factory) -> None:
    mf = marketflow()
    url = f"ws://127.0.0.1:{mf.port}/ws/prices?exchanges=nowhere"
    with trio.fail_after(20):
        async with open_websocket_url(url) as ws:
            message = await frame(ws)
            assert message == {"type": "error", "error": "unknown exchange nowhere"}
            assert await closed_code(ws) == 1008


def stalled_client(port: int) -> Any:
    """A WebSocket client that completes the handshake and then never reads again."""
    import base64
    import os
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/prices HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b" 101 " in sock.recv(1024)
    return sock


async def test_a_stalled_client_is_dropped_and_others_keep_their_rate(marketflow: Factory) -> None:
    mf = marketflow({"app": {"ws_min_interval_ms": 20, "ws_max_lag_s": 1}, "test": {"rate": 20000}})
    url = f"ws://127.0.0.1:{mf.port}/ws/prices"

    async def frames_per_second(ws: WebSocketConnection, seconds: float) -> float:
        count = 0
        with trio.move_on_after(seconds):
            while True:
                await frame(ws)
                count += 1
        return count / seconds

    with trio.fail_after(60):
        async with open_websocket_url(url) as ws:
            assert (await frame(ws))["type"] == "snapshot"
            before = await frames_per_second(ws, 1.0)
            stalled = stalled_client(mf.port)
            try:
                during = []
                while not any("too slow" in line for line in mf.lines):
                    during.append(await frames_per_second(ws, 1.0))
                    assert len(during) < 40, "the stalled client was never dropped"
                after = await frames_per_second(ws, 1.0)
            finally:
                stalled.close()
            assert before > 20  # ~50 frames/s at a 20 ms interval
            assert min([*during, after]) > 0.6 * before, (before, during, after)
            await ws.aclose()
