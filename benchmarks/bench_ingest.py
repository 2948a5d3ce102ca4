"""Sustained end-to-end ingest: blaster processes -> marketflow (live mode) -> Redis, PostgreSQL.

    .venv/bin/python -m benchmarks.bench_ingest [--seconds 10] [--feeds 3]
        [--rates 10000,100000,max] [--naive]

For each rate (lines/s per feed, or `max`: as fast as marketflow reads) a fresh marketflow reads
`--feeds` `benchmarks.blaster` processes (TCP servers it connects to as to exchanges). The run
ends when every blaster has reported what it sent and marketflow has folded exactly that many
ticks. Then two exact loss checks: the ticks counted in the Redis buckets must equal the ticks
sent, and after a SIGTERM (marketflow writes its open minutes) so must the sum of `tick_count`
over the PostgreSQL rows.

Printed per rate: the sustained rate; Redis commands/s from marketflow's own counter
(`marketflow_redis_commands_total`) and, as a cross-check, from Redis' INFO (server-wide: other
clients of the same Redis count too); PostgreSQL rows written (`marketflow_db_rows_written_total`
during the run, and the rows in the table after the shutdown flush) and rows/s; marketflow's CPU.
Both store figures must stay flat while the tick rate grows by orders of magnitude.

`--naive` measures the baseline design with the same blasters and the same count check: one Redis
round trip per update (HSET latest + ZADD into the window, one unpipelined round trip).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import (
    Blaster,
    CpuMeter,
    blasters_done,
    db_totals,
    emit,
    folded,
    live_marketflow,
    progress,
    scrape,
    stop,
)
from tests.procs import Process, redis_prefix, wait_for


def redis_commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def bucket_total(r: redis.Redis, prefix: str) -> int:
    total = 0
    for key in r.scan_iter(match=f"{prefix}window:*", count=1000):
        total += sum(int(m.split(b"|")[1]) for m in r.zrange(key, 0, -1))
    return total


def run_marketflow(seconds: float, feeds: int, rate: int | None) -> dict[str, Any]:
    """One fresh marketflow reading `feeds` blasters at `rate` lines/s each (None: max)."""
    r = redis.Redis()
    blasters = [Blaster(seconds, rate, seed=i) for i in range(feeds)]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            live_marketflow(Path(tmp), blasters) as (
                mf,
                dbname,
                prefix,
            ),
        ):
            wait_for(lambda: folded(mf) > 0, 30, "first ticks folded", interval=0.01)
            before = scrape(mf)
            server_before = redis_commands(r)
            cpu = CpuMeter(mf.proc.pid)
            started = time.monotonic()
            sent = blasters_done(blasters, seconds * 4 + 60)
            wait_for(lambda: folded(mf) >= sent, 120, f"{sent} ticks folded", interval=0.01)
            elapsed = time.monotonic() - started
            cpu_percent = cpu.read()
            after = scrape(mf)
            server_commands = redis_commands(r) - server_before
            own_commands = after["marketflow_redis_commands_total"] - before.get(
                "marketflow_redis_commands_total", 0
            )
            rows_during = after["marketflow_db_rows_written_total"] - before.get(
                "marketflow_db_rows_written_total", 0
            )
            # Let one more flush land, then count what Redis holds.
            wait_for(lambda: bucket_total(r, prefix) >= sent, 10, "Redis buckets hold every tick")
            in_redis = bucket_total(r, prefix)
            health = mf.health()
            # SIGTERM: every open minute is written; then PostgreSQL must hold every tick once.
            shutdown_started = time.monotonic()
            exit_code = stop(mf)
            shutdown_s = time.monotonic() - shutdown_started
            db = db_totals(dbname)
    finally:
        for b in blasters:
            b.close()
        r.close()
    return {
        "design": "marketflow",
        "feeds": feeds,
        "rate_per_feed": rate or "max",
        "sent": sent,
        "folded": health["pipeline"]["updates_total"],
        "in_redis": in_redis,
        "lost": sent - in_redis,
        "db_ticks": db["ticks"],
        "db_lost": sent - db["ticks"],
        "seconds": round(elapsed, 2),
        "updates_per_s": round(sent / elapsed),
        "redis_commands_per_s": round(own_commands / elapsed),
        "redis_server_commands_per_s": round(server_commands / elapsed),
        "db_rows_during_run": int(rows_during),
        "db_rows": db["rows"],
        "db_key_minutes": db["keys"] * db["minutes"],
        # Rows per second of ingest time: the rows of the minutes the run touched, over those
        # minutes (a short run's rows / elapsed would only measure the shutdown flush).
        "db_rows_per_s": round(db["rows"] / (60 * db["minutes"]), 3) if db["minutes"] else 0,
        "ticks_per_db_row": round(sent / db["rows"]) if db["rows"] else None,
        "cpu_percent": round(cpu_percent),
        "rejected": sum(s["rejected"] for s in health["sources"].values()),
        "shutdown_s": round(shutdown_s, 2),
        "exit_code": exit_code,
    }


def run_naive(seconds: float, feeds: int, rate: int | None) -> dict[str, Any]:
    """The baseline: parse each line and make one Redis round trip per update."""
    r = redis.Redis()
    with redis_prefix() as prefix:
        blasters = [Blaster(seconds, rate, seed=i) for i in range(feeds)]
        consumers: list[Process] = []
        try:
            commands_before = redis_commands(r)
            consumers = [
                Process(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.naive_ingest",
                        "--port",
                        str(b.port),
                        "--prefix",
                        f"{prefix}",
                        "--source",
                        f"exchange{i + 1}",
                    ]
                )
                for i, b in enumerate(blasters)
            ]
            started = time.monotonic()
            sent = blasters_done(blasters, seconds * 50 + 60)
            wait_for(
                lambda: bucket_total(r, prefix) >= sent,
                600,
                "naive consumer caught up",
                interval=0.5,
            )
            elapsed = time.monotonic() - started
            commands = redis_commands(r) - commands_before
            in_redis = bucket_total(r, prefix)
            return {
                "design": "naive (1 round trip per update)",
                "feeds": feeds,
                "rate_per_feed": rate or "max",
                "sent": sent,
                "in_redis": in_redis,
                "lost": sent - in_redis,
                "seconds": round(elapsed, 2),
                "updates_per_s": round(sent / elapsed),
                "redis_server_commands_per_s": round(commands / elapsed),
            }
        finally:
            for c in consumers:
                c.close()
            for b in blasters:
                b.close()
            r.close()


def parse_rates(text: str) -> list[int | None]:
    return [None if part.strip() == "max" else int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="sending time per rate")
    parser.add_argument("--feeds", type=int, default=3)
    parser.add_argument(
        "--rates", type=parse_rates, default=[10_000, 100_000, None], help="per feed, or max"
    )
    parser.add_argument("--rate", type=int, default=None, help="one rate only (lines/s per feed)")
    parser.add_argument("--naive", action="store_true", help="measure the naive baseline too")
    args = parser.parse_args(argv)
    rates = [args.rate] if args.rate else args.rates
    for rate in rates:
        progress(f"ingest: {args.feeds} feeds at {rate or 'max'} lines/s each, {args.seconds} s")
        result = run_marketflow(args.seconds, args.feeds, rate)
        emit("ingest", f"{args.feeds} feeds x {rate or 'max'}/s", **result)
    if args.naive:
        progress("ingest: naive baseline")
        result = run_naive(min(args.seconds, 3.0), args.feeds, None)
        emit("ingest", "naive", **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
