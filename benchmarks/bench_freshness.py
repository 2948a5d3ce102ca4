"""Freshness: how old a tick is when a client can see it, over REST and over the WebSocket.

    .venv/bin/python -m benchmarks.bench_freshness [--rates 1000,10000,100000] [--seconds 20]

For each total rate a fresh marketflow (live mode) reads three `benchmarks.blaster` feeds, each
sending rate/3 lines/s stamped with the current wall-clock time (one stamp per 10 ms chunk).
This process measures, after a warm-up second, for `--seconds`:

- REST: a keep-alive poller GETs `/prices/latest/exchange1/BTCUSDT` every `--poll-ms`; each time
  the timestamp changes it records now - timestamp. The poll interval adds up to `--poll-ms` to
  each sample, so the figures are upper bounds.
- WebSocket: one client on `/ws/prices` (every symbol and exchange) records now - timestamp of
  every price in every `prices` frame.

Printed per rate: p50/p99/max of both, the ticks folded against the ticks sent (no loss) and
marketflow's CPU. Target: p99 <= 150 ms at every rate.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

from benchmarks.common import (
    CpuMeter,
    blasters_done,
    emit,
    folded,
    ingesting,
    percentile,
    progress,
    rounded,
)
from benchmarks.probes import FrameStats, follow_ws, poll_latest
from tests.procs import wait_for

FEEDS = 3
WARMUP_S = 1.0
PATH = "/prices/latest/exchange1/BTCUSDT"


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "samples": len(values),
        "p50_ms": rounded(percentile(values, 50)),
        "p99_ms": rounded(percentile(values, 99)),
        "max_ms": rounded(max(values) if values else None),
    }


async def probe(port: int, seconds: float, poll_s: float) -> tuple[list[float], FrameStats, int]:
    rest: list[float] = []
    ws = FrameStats()
    start = trio.current_time() + WARMUP_S
    until = start + seconds
    requests = 0

    async def poller() -> None:
        nonlocal requests
        await trio.sleep_until(start)
        requests = await poll_latest(
            "127.0.0.1", port, PATH, until=until, interval_s=poll_s, lags=rest
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        nursery.start_soon(
            lambda: follow_ws(
                f"ws://127.0.0.1:{port}/ws/prices",
                ws,
                measuring=lambda: trio.current_time() >= start,
                until=until,
            )
        )
    return rest, ws, requests


def run_rate(rate: int, seconds: float, poll_s: float) -> dict[str, Any]:
    # Each blaster sends from the moment marketflow connects until it is told to finish.
    with ingesting(rate, seconds + WARMUP_S + 60, FEEDS) as (mf, blasters):
        cpu = CpuMeter(mf.proc.pid)
        started = time.monotonic()
        rest, ws, requests = trio.run(probe, mf.port, seconds, poll_s)
        elapsed = time.monotonic() - started
        cpu_percent = cpu.read()
        sent = blasters_done(blasters, 60, finish=True)
        wait_for(lambda: folded(mf) >= sent, 60, "every tick folded", interval=0.02)
        done = folded(mf)
    return {
        "rate": rate,
        "seconds": seconds,
        "rest": {**summary(rest), "requests_per_s": round(requests / seconds)},
        "ws": {**summary(ws.lags), "frames": ws.frames, "max_gap_ms": rounded(ws.max_gap_ms)},
        "sent": sent,
        "folded": done,
        "lost": sent - done,
        "cpu_percent": round(cpu_percent),
        "measured_s": round(elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--rates",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000, 10_000, 100_000],
        help="total updates/s (split over three feeds)",
    )
    parser.add_argument("--poll-ms", type=float, default=2.0)
    args = parser.parse_args(argv)
    for rate in args.rates:
        progress(f"freshness: {rate} updates/s for {args.seconds} s")
        result = run_rate(rate, args.seconds, args.poll_ms / 1000)
        emit("freshness", f"{rate}/s", **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
