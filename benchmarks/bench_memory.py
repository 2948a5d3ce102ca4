"""Memory under sustained load: marketflow's resident set while it ingests 100,000 updates/s.

    .venv/bin/python -m benchmarks.bench_memory [--seconds 600] [--rate 100000]

marketflow (live mode) reads three `benchmarks.blaster` feeds sending rate/3 lines/s each for
`--seconds`. This process samples marketflow's VmRSS from /proc once a second and prints the
peak, the value at the end, and the least-squares slope (MiB per minute) over the whole run and
over its second half (after the first `window_seconds` of buckets have filled, state is at its
steady size). Over the same long run, Redis commands/s and PostgreSQL rows/s from marketflow's
own counters show the store cost in steady state, and the ticks folded must equal those sent.
Targets: peak <= 200 MB, slope flat.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Blaster,
    CpuMeter,
    blasters_done,
    emit,
    folded,
    live_marketflow,
    progress,
    rss_mb,
    scrape,
    slope_per_minute,
)
from tests.procs import wait_for

FEEDS = 3


def run(seconds: float, rate: int) -> dict[str, Any]:
    blasters = [Blaster(seconds, rate / FEEDS, seed=i) for i in range(FEEDS)]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            live_marketflow(Path(tmp), blasters) as (
                mf,
                _,
                _,
            ),
        ):
            pid = mf.proc.pid
            start_rss = rss_mb(pid)
            wait_for(lambda: folded(mf) > 0, 30, "first ticks folded")
            before = scrape(mf)
            cpu = CpuMeter(pid)
            started = time.monotonic()
            samples: list[tuple[float, float]] = []
            next_report = started + 60
            while not all(b.summary() for b in blasters):
                now = time.monotonic()
                samples.append((now - started, rss_mb(pid)))
                if now >= next_report:
                    progress(f"memory: {now - started:.0f} s, RSS {samples[-1][1]:.1f} MiB")
                    next_report += 60
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            cpu_percent = cpu.read()
            after = scrape(mf)
            sent = blasters_done(blasters, 60)
            wait_for(lambda: folded(mf) >= sent, 60, "every tick folded", interval=0.05)
            done = folded(mf)
    finally:
        for b in blasters:
            b.close()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    values = [v for _, v in samples]
    half = samples[len(samples) // 2 :]
    return {
        "rate": rate,
        "seconds": round(elapsed),
        "samples": len(samples),
        "rss_at_start_mb": round(start_rss, 1),
        "rss_peak_mb": round(max(values), 1),
        "rss_end_mb": round(values[-1], 1),
        "rss_min_mb": round(min(values), 1),
        "slope_mb_per_min": round(slope_per_minute(samples), 3),
        "slope_second_half_mb_per_min": round(slope_per_minute(half), 3),
        "redis_commands_per_s": round(delta("marketflow_redis_commands_total") / elapsed),
        "db_rows_per_s": round(delta("marketflow_db_rows_written_total") / elapsed, 3),
        "cpu_percent": round(cpu_percent),
        "sent": sent,
        "folded": done,
        "lost": sent - done,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=int, default=100_000, help="total updates/s")
    args = parser.parse_args(argv)
    progress(f"memory: {args.rate} updates/s for {args.seconds:.0f} s")
    emit("memory", f"{args.rate}/s for {args.seconds:.0f} s", **run(args.seconds, args.rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
