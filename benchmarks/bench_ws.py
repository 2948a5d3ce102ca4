"""WebSocket fan-out: a thousand clients following every market while marketflow ingests.

    .venv/bin/python -m benchmarks.bench_ws [--clients 1000] [--seconds 20] [--candles 1m,1h]

marketflow (live mode) ingests 10,000 updates/s from three `benchmarks.blaster` feeds; a separate
process (`benchmarks.ws_clients`, trio-websocket, every client in one Trio process) connects
`--clients` clients to `/ws/prices` (all symbols, all exchanges; with `--candles`, each client
also subscribes to those candle intervals) and measures, per client, the `prices` (and
`candles`) frames per second, the longest gap between two data frames, and each price's age
when it arrives. Also printed: marketflow's and the client process's CPU, and the ticks folded
against the ticks sent (the fan-out must not cost ingest a tick). `--profile DIR` records
marketflow with py-spy for half of the measured time and prints where its main thread spends it.
Targets: every client gets a frame at least every 250 ms; p99 lag <= 500 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    CpuMeter,
    blasters_done,
    emit,
    folded,
    ingesting,
    profile_breakdown,
    progress,
    py_spy,
    py_spy_record,
    rss_mb,
)
from tests.procs import REPO, Process, wait_for

FEEDS = 3
RATE = 10_000
WARMUP_S = 2.0


def json_line(proc: Process, key: str) -> dict[str, Any] | None:
    for line in proc.lines:
        if line.startswith("{") and f'"{key}"' in line:
            return dict(json.loads(line))
    if proc.proc.poll() is not None:
        raise AssertionError(f"ws_clients exited {proc.proc.returncode}: {proc.output[-2000:]}")
    return None


def run(
    clients: int, seconds: float, profile: Path | None = None, candles: str = ""
) -> dict[str, Any]:
    connect_budget = 30 + clients / 20
    budget = 60 + connect_budget + WARMUP_S + seconds  # the blasters are told when to finish
    with ingesting(RATE, budget, FEEDS) as (mf, blasters):
        followers = Process(
            [
                sys.executable,
                "-m",
                "benchmarks.ws_clients",
                "--url",
                f"ws://127.0.0.1:{mf.port}/ws/prices" + (f"?candles={candles}" if candles else ""),
                "--clients",
                str(clients),
                "--seconds",
                str(seconds),
                "--warmup",
                str(WARMUP_S),
            ],
            cwd=REPO,
        )
        try:
            connected = wait_for(
                lambda: json_line(followers, "connected"), connect_budget, "clients connected"
            )
            time.sleep(WARMUP_S)
            cpu = CpuMeter(mf.proc.pid)
            rss_before = rss_mb(mf.proc.pid)
            spy = None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                out = profile / f"ws-{clients}-clients{'-candles' if candles else ''}.txt"
                spy = py_spy_record(mf.proc.pid, out, max(1, seconds // 2), rate=100)
            time.sleep(seconds)
            if spy is not None:
                spy.wait(timeout=30)
                emit(
                    "ws-profile",
                    f"marketflow, {clients} WebSocket clients, under py-spy",
                    clients=clients,
                    file=str(out),
                    **profile_breakdown(out),
                )
            cpu_percent = cpu.read()
            rss_after = rss_mb(mf.proc.pid)
            summary = wait_for(
                lambda: json_line(followers, "summary"), seconds + 60, "client summary"
            )["summary"]
        finally:
            followers.close()
        sent = blasters_done(blasters, 60, finish=True)
        wait_for(lambda: folded(mf) >= sent, 60, "every tick folded", interval=0.05)
        done = folded(mf)
    return {
        **summary,
        "connected_at_start": connected["connected"],
        "candles": candles,
        "rate": RATE,
        "marketflow_cpu_percent": round(cpu_percent),
        "marketflow_rss_mb": round(rss_after, 1),
        "marketflow_rss_growth_mb": round(rss_after - rss_before, 1),
        "sent": sent,
        "folded": done,
        "lost": sent - done,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument("--candles", default="", help="candle intervals every client follows")
    args = parser.parse_args(argv)
    if args.profile is not None and py_spy() is None:
        progress("ws: py-spy is not installed (make bench installs it); no profile")
        args.profile = None
    progress(f"ws: {args.clients} clients for {args.seconds} s at {RATE} updates/s")
    case = f"{args.clients} clients" + (f", candles {args.candles}" if args.candles else "")
    bench = "ws-candles" if args.candles else "ws"
    emit(bench, case, **run(args.clients, args.seconds, args.profile, args.candles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
