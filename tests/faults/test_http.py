"""The HTTP side under abuse: a thousand WebSocket clients coming and going, slow clients holding
sockets, a flood of malformed requests. Ingest must not notice."""

from __future__ import annotations

import base64
import contextlib
import os
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import trio
from trio_websocket import open_websocket_url

from tests.faults.conftest import (
    Rig,
    assert_healthy_process,
    feeds_connected,
    messages,
    peak_mb,
    stop,
    wait_accepted,
)
from tests.procs import open_fds, rss_mb, wait_for

NORMAL = 50


def quiet_fds(pid: int, baseline: int, slack: int = 10) -> bool:
    return open_fds(pid) <= baseline + slack


# --- 1,000 WebSocket clients ----------------------------------------------------------------------

WS_CLIENTS = 1000
WS_ROUNDS = 3
HANDSHAKES_AT_ONCE = 100


async def ws_clean_client(
    url: str, gate: trio.Semaphore, everyone_in: trio.Event, tally: dict[str, int]
) -> None:
    """trio-websocket: snapshot, keep reading until everyone is connected, close cleanly."""
    await gate.acquire()
    released = False
    try:
        async with open_websocket_url(url, connect_timeout=30, disconnect_timeout=5) as ws:
            first = orjson.loads(await ws.get_message())
            assert first["type"] == "snapshot", first
            gate.release()
            released = True
            tally["in"] += 1
            if tally["in"] == WS_CLIENTS:
                everyone_in.set()
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    while True:
                        message = orjson.loads(await ws.get_message())
                        if message["type"] == "heartbeat":  # protocol v1: after a quiet second
                            continue
                        assert message["type"] == "prices", message
                        tally["frames"] += 1

                nursery.start_soon(read)
                await everyone_in.wait()
                nursery.cancel_scope.cancel()
    finally:
        if not released:
            gate.release()


async def ws_abrupt_client(
    host: str, port: int, gate: trio.Semaphore, everyone_in: trio.Event, tally: dict[str, int]
) -> None:
    """A raw socket: handshake, read the snapshot frame's first bytes, then vanish (no close)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/prices?symbols=BTCUSDT HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    async with gate:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        while len(rest) < 16:
            chunk = await stream.receive_some(4096)
            assert chunk
            rest += chunk
        assert b"snapshot" in rest or rest[0] == 0x81, rest[:40]
    tally["in"] += 1
    if tally["in"] == WS_CLIENTS:
        everyone_in.set()
    await everyone_in.wait()
    await stream.aclose()


async def ws_round(port: int) -> dict[str, int]:
    url = f"ws://127.0.0.1:{port}/ws/prices"
    gate = trio.Semaphore(HANDSHAKES_AT_ONCE)
    everyone_in = trio.Event()
    tally = {"in": 0, "frames": 0}
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(WS_CLIENTS):
                if i % 2:
                    nursery.start_soon(
                        ws_abrupt_client, "127.0.0.1", port, gate, everyone_in, tally
                    )
                else:
                    nursery.start_soon(ws_clean_client, url, gate, everyone_in, tally)
    return tally


def test_a_thousand_websocket_clients_come_and_go_repeatedly(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, NORMAL)
    mf = rig.start(rig.config(feeds))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    pid = mf.proc.pid
    fds_before = open_fds(pid)
    rss_after: list[float] = []
    round_s: list[float] = []
    release_s: list[float] = []
    frames = 0
    for _ in range(WS_ROUNDS):
        started = time.monotonic()
        ingested = messages(mf)
        tally = trio.run(ws_round, mf.port)
        ended = time.monotonic()
        round_s.append(ended - started)
        assert tally["in"] == WS_CLIENTS
        frames += tally["frames"]
        # Every server-side connection is gone again: no task or socket leaks per client. The
        # ones that vanished without a close frame wait for Hypercorn's ping task (5 s).
        wait_for(lambda: quiet_fds(pid, fds_before), 15, "websocket sockets released")
        release_s.append(time.monotonic() - ended)
        assert messages(mf) > ingested, "ingest went on during the storm"
        rss_after.append(rss_mb(pid))
        assert_healthy_process(mf)
    started = time.monotonic()
    assert mf.get("/health").status_code == 200
    health_s = time.monotonic() - started
    assert health_s < 5.0  # typically a few ms; wide for a CI box busy with the other worker
    assert feeds_connected(mf)
    growth = rss_after[-1] - rss_after[0]
    assert growth < 30, rss_after
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent and stored == total
    figures.update(
        scenario=f"{WS_CLIENTS:,} WebSocket clients connect and leave, {WS_ROUNDS} rounds "
        "(half close cleanly, half vanish)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=sent - stored,
        rows_doubled=0,
        recovery_s=round(max(release_s), 2),
        recovery_note="clients gone -> every server socket closed (worst round)",
        slowest_round_s=round(max(round_s), 2),
        frames_received=frames,
        rss_growth_mb=round(growth, 1),
        health_after_ms=round(health_s * 1000, 1),
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


# --- slow clients ---------------------------------------------------------------------------------

SLOW_CLIENTS = 200
IDLE_CLIENTS = 50
KEEP_ALIVE_S = 30  # hypercorn_config: keep_alive_timeout (the idle timer runs until a request)


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        data = sock.recv(4096, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if data:
        sock.recv(4096)  # an answer (408/400) is fine too; the close follows
        return False
    return True


def test_slow_clients_hold_sockets_yet_health_answers_and_timeouts_close_them(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, NORMAL)
    mf = rig.start(rig.config(feeds))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    pid = mf.proc.pid
    fds_before = open_fds(pid)
    opened = time.monotonic()
    slow = [socket.create_connection(("127.0.0.1", mf.port)) for _ in range(SLOW_CLIENTS)]
    idle = [socket.create_connection(("127.0.0.1", mf.port)) for _ in range(IDLE_CLIENTS)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: marketflow\r\nX-Slow: ")
    closed_at: dict[int, float] = {}
    stop_trickle = threading.Event()

    def trickle() -> None:
        """One more header byte per second on every slow socket: a slowloris."""
        while not stop_trickle.wait(1.0):
            for i, sock in enumerate(slow):
                if i not in closed_at:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")

    threading.Thread(target=trickle, daemon=True).start()
    latencies: list[float] = []
    ingested = messages(mf)
    everyone = slow + idle
    try:
        deadline = opened + KEEP_ALIVE_S + 15
        while len(closed_at) < len(everyone) and time.monotonic() < deadline:
            started = time.monotonic()
            with httpx.Client(base_url=mf.url, timeout=5) as client:
                assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            for i, sock in enumerate(everyone):
                if i not in closed_at and closed_by_peer(sock):
                    closed_at[i] = time.monotonic() - opened
            time.sleep(0.25)
    finally:
        stop_trickle.set()
        for sock in everyone:
            sock.close()
    assert len(closed_at) == len(everyone), f"{len(everyone) - len(closed_at)} still open"
    # Typically ~10 ms and at most ~0.2 s; a CI box busy with the other xdist worker's
    # WebSocket storm has shown single 1.5 s answers, hence the wide ceiling on the worst one.
    assert statistics.median(latencies) < 0.5, latencies
    assert max(latencies) < 5.0, latencies
    assert min(closed_at.values()) >= KEEP_ALIVE_S - 2  # closed by the timeout, not by chance
    wait_for(lambda: quiet_fds(pid, fds_before), 10, "server sockets released")
    assert messages(mf) > ingested
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent and stored == total
    figures.update(
        scenario=f"{SLOW_CLIENTS} slowloris sockets (1 header byte/s) + {IDLE_CLIENTS} idle ones",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=sent - stored,
        rows_doubled=0,
        recovery_s=round(max(closed_at.values()), 2),
        recovery_note=f"all closed by keep_alive_timeout ({KEEP_ALIVE_S} s); /health meanwhile "
        f"median {statistics.median(latencies) * 1000:.0f} ms, "
        f"worst {max(latencies) * 1000:.0f} ms",
        first_closed_s=round(min(closed_at.values()), 2),
        health_max_ms=round(max(latencies) * 1000, 1),
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )


# --- a flood of bad requests ----------------------------------------------------------------------

SEGMENTS = [
    "",
    ".",
    "..",
    "%2e%2e",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "%ff%fe",
    "%",
    "%zz",
    "BTC%00USDT",
    "btcusdt",
    "BTCUSDT",
    "exchange1",
    "test-exchange1",
    "exchange1'--",
    "x' OR '1'='1",
    "{exchange1:BTCUSDT}",
    "latest:{a:b}",
    "\u00e9t\u00e9",
    "\U0001f680",
    "\u0130",
    "\u017f",
    "A" * 21,
    "B" * 3000,
    "-",
    "_",
    "a" * 33,
    "%0d%0aSet-Cookie:%20x=1",
    "<script>",
    "*",
]
PERIODS = [
    "",
    "0s",
    "-1s",
    "1.5m",
    "1m1m",
    "9" * 40 + "d",
    "3651d",
    "1y",
    "%00",
    "1s&period=2s",
    "\uff11s",
    "1S",
    "\u0661s",
    "1h30m",
    "30s",
    "5m",
    "1 s",
    "%20",
    "P1D",
    "1e3s",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
ROOTS = [
    "/prices/latest",
    "/prices/highest",
    "/prices/lowest",
    "/prices/average",
    "/prices",
    "/mode",
    "/health",
    "/metrics",
    "/openapi.json",
    "/ws/prices",
    "",
    "/nowhere",
]
RAW = [
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /mode/test HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /%%% HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /pri\x01ces HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /ws/prices HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /ws/prices HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: bad\r\nSec-WebSocket-Version: 99\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws/prices HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: \xff\xfe\r\n\r\n",
    b"GET /health?\xff=\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /prices/latest/BTCUSDT HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
    b"POST /mode/live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\r\n\r\n",
]


def bad_requests(seed: int, count: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        path = rng.choice(ROOTS)
        for _ in range(rng.randint(0, 3)):
            path += "/" + rng.choice(SEGMENTS)
        if rng.random() < 0.5:
            path += "?" + "&".join(
                f"{rng.choice(['period', 'symbols', 'exchanges', 'x', ''])}={rng.choice(PERIODS)}"
                for _ in range(rng.randint(1, 3))
            )
        out.append((rng.choice(METHODS), path or "/"))
    return out


def raw_status(port: int, data: bytes) -> int | None:
    """Send raw bytes; the status of the answer, or None when the server just closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def test_a_flood_of_malformed_requests_never_gets_a_500_and_ingest_goes_on(
    rig: Rig, figures: dict[str, Any]
) -> None:
    feeds = rig.counting_feeds(3, NORMAL)
    # An admin token, so that no request of the flood may switch the mode under the feeds.
    mf = rig.start(rig.config(feeds, http={"admin_token": "flood-test-token"}))
    wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
    ingested = messages(mf)
    requests = bad_requests(seed=20261126, count=3000)
    statuses: dict[int, int] = {}
    problems: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()

    def send(batch: list[tuple[str, str]]) -> None:
        with httpx.Client(base_url=mf.url, timeout=10) as client:
            for method, path in batch:
                try:
                    response = client.request(method, path)
                except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError):
                    continue  # the client refused to send it; raw sockets cover such bytes
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                json_body = response.headers.get("content-type") == "application/json"
                bad = response.status_code >= 500 or (
                    method != "HEAD" and response.status_code >= 400 and not json_body
                )
                if bad:
                    with lock:
                        problems.append(f"{method} {path} -> {response.status_code}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [requests[i::4] for i in range(4)]))
    raw_statuses = [raw_status(mf.port, data) for data in RAW for _ in range(10)]
    seconds = time.monotonic() - started
    assert not problems, problems[:20]
    assert all(s is None or s < 500 for s in raw_statuses), raw_statuses
    assert_healthy_process(mf)
    assert "unhandled error" not in mf.output
    assert mf.get("/mode").json()["mode"] == "live"
    assert messages(mf) > ingested
    for feed in feeds:
        feed.pause()
    sent = sum(f.total for f in feeds)
    wait_accepted(mf, lambda: sent)
    peak = peak_mb(mf)
    total, shutdown_s = stop(mf)
    stored = sum(rig.pg_ticks().values())
    assert total == sent and stored == total
    answered = sum(statuses.values()) + sum(1 for s in raw_statuses if s is not None)
    figures.update(
        scenario=f"{len(requests) + len(raw_statuses):,} malformed requests (paths, queries, "
        "methods, raw bytes)",
        ticks_sent=sent,
        ticks_accepted=total,
        ticks_stored=stored,
        late=0,
        ticks_lost=sent - stored,
        rows_doubled=0,
        recovery_s=None,
        recovery_note=f"no 5xx; {answered} answered in {seconds:.1f} s, statuses "
        + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
        peak_rss_mb=peak,
        shutdown_s=round(shutdown_s, 2),
    )
