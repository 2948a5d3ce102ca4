"""Many WebSocket clients in one Trio process (trio-websocket), for bench_ws.

    python -m benchmarks.ws_clients --url ws://127.0.0.1:8080/ws/prices --clients 1000 \\
        --seconds 20

Connects `--clients` clients (at most `--connect-concurrency` handshakes at a time), waits until
every one has its snapshot, lets `--warmup` seconds pass, then measures for `--seconds`: per
client the `prices` and `candles` frames, the longest gap between two data frames (either
kind), and the age (now - timestamp) of every price in every frame. Prints one JSON line:
`{"connected": N}` once all are connected, then the summary (`"clients"`,
`"frames_per_client_per_s"`, gaps, lag percentiles, this process's CPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from typing import Any

import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)
from wsproto.utilities import LocalProtocolError


class Lags:
    """A histogram of ages in whole milliseconds: a million samples cost a few kilobytes."""

    def __init__(self) -> None:
        self.counts: collections.Counter[int] = collections.Counter()
        self.n = 0

    def add(self, ms: float) -> None:
        self.counts[int(ms)] += 1
        self.n += 1

    def percentile(self, q: float) -> int | None:
        if not self.n:
            return None
        rank = max(1, int(q / 100 * self.n + 0.999999))
        seen = 0
        for ms in sorted(self.counts):
            seen += self.counts[ms]
            if seen >= rank:
                return ms + 1  # the bucket's upper edge: an upper bound
        return max(self.counts) + 1


class Follower:
    __slots__ = ("candle_frames", "closed", "frames", "last", "max_gap_ms", "prices", "ready")

    def __init__(self) -> None:
        self.frames = 0
        self.candle_frames = 0
        self.prices = 0
        self.last: float | None = None
        self.max_gap_ms = 0.0
        self.ready = False
        self.closed: str | None = None


async def follow(
    url: str,
    me: Follower,
    lags: Lags,
    window: dict[str, float],
    connect_limit: trio.Semaphore,
    all_ready: trio.Event,
) -> None:
    """One client: connect (at most `connect_limit` handshakes at a time), take the snapshot,
    then record the frames that arrive inside the measuring window."""
    try:
        async with trio.open_nursery() as nursery:
            async with connect_limit:
                ws = await connect_websocket_url(nursery, url, message_queue_size=64)
            try:
                await _read(ws, me, lags, window, all_ready)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* ConnectionClosed as group:
        if time.time() * 1000 < window["end"]:  # closing at the end of the run is no drop
            reason = group.exceptions[0].reason  # type: ignore[attr-defined]
            me.closed = f"{reason.code} {reason.reason}"
    except* (HandshakeError, OSError, LocalProtocolError) as group:
        if time.time() * 1000 < window["end"]:
            me.closed = repr(group.exceptions[0])[:200]


async def _read(
    ws: WebSocketConnection,
    me: Follower,
    lags: Lags,
    window: dict[str, float],
    all_ready: trio.Event,
) -> None:
    while True:
        message = await ws.get_message()
        now = time.time() * 1000
        if not me.ready:
            me.ready = True  # the snapshot
            window["ready"] += 1
            if window["ready"] == window["clients"]:
                all_ready.set()
        elif now >= window["end"]:
            return
        elif now >= window["start"]:
            frame = orjson.loads(message)
            kind = frame["type"]
            if kind in ("prices", "candles"):
                if kind == "prices":
                    me.frames += 1
                    me.prices += len(frame["data"])
                    for price in frame["data"]:
                        lags.add(now - price["timestamp"])
                else:
                    me.candle_frames += 1
                if me.last is not None and me.last >= window["start"]:
                    me.max_gap_ms = max(me.max_gap_ms, now - me.last)
        me.last = now


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    followers = [Follower() for _ in range(args.clients)]
    lags = Lags()
    inf = float("inf")
    window = {"start": inf, "end": inf, "ready": 0, "clients": args.clients}
    all_ready = trio.Event()
    connect_limit = trio.Semaphore(args.connect_concurrency)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for me in followers:
            nursery.start_soon(follow, args.url, me, lags, window, connect_limit, all_ready)
        with trio.move_on_after(args.connect_timeout):
            await all_ready.wait()
        connect_s = trio.current_time() - started
        print(json.dumps({"connected": int(window["ready"])}), flush=True)
        await trio.sleep(args.warmup)
        window["start"] = time.time() * 1000
        window["end"] = window["start"] + args.seconds * 1000
        cpu_before = cpu_seconds()
        await trio.sleep(args.seconds + 0.5)
        cpu = cpu_seconds() - cpu_before
        nursery.cancel_scope.cancel()
    measured = [f for f in followers if f.ready]
    frames = [f.frames for f in measured]
    gaps = sorted(f.max_gap_ms for f in measured)
    return {
        "clients": args.clients,
        "connected": len(measured),
        "connect_s": round(connect_s, 2),
        "dropped": sum(1 for f in followers if f.closed),
        "drop_reasons": collections.Counter(f.closed for f in followers if f.closed),
        "seconds": args.seconds,
        "frames_per_client_per_s": round(sum(frames) / len(frames) / args.seconds, 2)
        if frames
        else 0,
        "min_frames_per_client_per_s": round(min(frames) / args.seconds, 2) if frames else 0,
        "prices_per_frame": round(sum(f.prices for f in measured) / max(1, sum(frames)), 1),
        "candle_frames_per_client_per_s": round(
            sum(f.candle_frames for f in measured) / max(1, len(measured)) / args.seconds, 2
        ),
        "max_gap_ms": round(gaps[-1], 1) if gaps else None,
        "p99_client_max_gap_ms": round(gaps[int(0.99 * (len(gaps) - 1))], 1) if gaps else None,
        "clients_gap_over_250ms": sum(1 for g in gaps if g > 250),
        "lag_samples": lags.n,
        "lag_p50_ms": lags.percentile(50),
        "lag_p99_ms": lags.percentile(99),
        "lag_max_ms": lags.percentile(100),
        "client_cpu_percent": round(100 * cpu / (args.seconds + 0.5)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps({"summary": trio.run(run, args)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
