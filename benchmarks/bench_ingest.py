"""Sustained end-to-end ingest: blaster processes -> marketflow (live mode) -> Redis.

    .venv/bin/python -m benchmarks.bench_ingest [--seconds 10] [--feeds 3] [--rate N] [--naive]

Each feed is a `benchmarks.blaster` process (a TCP server marketflow connects to). The run ends
when every blaster has reported what it sent and marketflow has folded exactly that many ticks;
then the ticks counted in the Redis buckets must equal the ticks sent (zero loss). Printed: the
sustained rate, Redis commands/s during the run (from Redis' own INFO), and marketflow's CPU.

`--naive` measures the baseline design with the same blasters and the same count check: one Redis
round trip per update (HSET latest + ZADD into the window in one unpipelined MULTI-less pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.procs import Marketflow, Process, postgres_database, redis_prefix, wait_for

SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


class Blaster(Process):
    def __init__(self, seconds: float, rate: int | None, seed: int) -> None:
        pace = ["--rate", str(rate)] if rate else ["--max"]
        super().__init__(
            [
                sys.executable,
                "-m",
                "benchmarks.blaster",
                "--port",
                "0",
                "--seconds",
                str(seconds),
                "--seed",
                str(seed),
                *pace,
            ]
        )
        self.port: int = wait_for(self._port, 10, "blaster listening")

    def _port(self) -> int | None:
        for line in self.lines:
            if line.startswith("{") and "listening" in line:
                return int(json.loads(line)["listening"]["port"])
        return None

    def summary(self) -> dict[str, Any] | None:
        for line in self.lines:
            if line.startswith("{") and '"sent"' in line:
                return dict(json.loads(line))
        return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def bucket_total(r: redis.Redis, prefix: str) -> int:
    total = 0
    for key in r.scan_iter(match=f"{prefix}window:*", count=1000):
        total += sum(int(m.split(b"|")[1]) for m in r.zrange(key, 0, -1))
    return total


def run_marketflow(args: argparse.Namespace) -> dict[str, Any]:
    r = redis.Redis()
    with tempfile.TemporaryDirectory() as tmp, redis_prefix() as prefix, postgres_database() as db:
        blasters = [Blaster(args.seconds, args.rate, seed=i) for i in range(args.feeds)]
        config = {
            "postgres": {"dbname": db},
            "redis": {"key_prefix": prefix},
            "exchanges": [
                {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": b.port}
                for i, b in enumerate(blasters)
            ],
            "app": {
                "mode": "live",
                "data_dir": str(Path(tmp) / "data"),
                "stale_after_s": 60,
                "max_clock_skew_s": 3600,
            },
            "log": {"level": "warning"},
        }
        mf = Marketflow(Path(tmp), config)
        try:
            commands_before = redis_commands(r)
            cpu_before = cpu_seconds(mf.proc.pid)

            def folded() -> int:
                return int(mf.health()["pipeline"]["updates_total"])

            wait_for(lambda: folded() > 0, 30, "first ticks folded")
            started = time.monotonic()
            summaries = wait_for(
                lambda: all(b.summary() for b in blasters) and [b.summary() for b in blasters],
                args.seconds * 4 + 60,
                "blasters finished",
            )
            sent = sum(int(s["sent"]) for s in summaries)
            wait_for(lambda: folded() >= sent, 120, f"{sent} ticks folded", interval=0.02)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(mf.proc.pid) - cpu_before
            commands = redis_commands(r) - commands_before
            # Let one more flush land, then count what Redis holds.
            wait_for(lambda: bucket_total(r, prefix) >= sent, 10, "Redis buckets hold every tick")
            in_redis = bucket_total(r, prefix)
            health = mf.health()
            return {
                "design": "marketflow",
                "sent": sent,
                "folded": health["pipeline"]["updates_total"],
                "in_redis": in_redis,
                "lost": sent - in_redis,
                "seconds": round(elapsed, 2),
                "updates_per_s": round(sent / elapsed),
                "redis_commands_per_s": round(commands / elapsed),
                "cpu_percent": round(100 * cpu / elapsed),
                "rejected": sum(s["rejected"] for s in health["sources"].values()),
            }
        finally:
            mf.close()
            for b in blasters:
                b.close()
            r.close()


def run_naive(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline: parse each line and make one Redis round trip per update."""
    r = redis.Redis()
    with redis_prefix() as prefix:
        blasters = [Blaster(args.seconds, args.rate, seed=i) for i in range(args.feeds)]
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
            summaries = wait_for(
                lambda: all(b.summary() for b in blasters) and [b.summary() for b in blasters],
                args.seconds * 50 + 60,
                "blasters finished",
            )
            sent = sum(int(s["sent"]) for s in summaries)
            wait_for(
                lambda: bucket_total(r, prefix) >= sent,
                600,
                "naive consumer caught up",
                interval=0.5,
            )
            elapsed = time.monotonic() - started
            commands = redis_commands(r) - commands_before
            in_redis = bucket_total(r, prefix)
            for c in consumers:
                c.close()
            return {
                "design": "naive (1 round trip per update)",
                "sent": sent,
                "in_redis": in_redis,
                "lost": sent - in_redis,
                "seconds": round(elapsed, 2),
                "updates_per_s": round(sent / elapsed),
                "redis_commands_per_s": round(commands / elapsed),
            }
        finally:
            for b in blasters:
                b.close()
            r.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--feeds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=None, help="lines/s per feed (default: max)")
    parser.add_argument("--naive", action="store_true", help="measure the naive baseline too")
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine(), "run": str(uuid.uuid4())[:8]}), flush=True)
    print(json.dumps(run_marketflow(args)), flush=True)
    if args.naive:
        naive_args = argparse.Namespace(**{**vars(args), "seconds": min(args.seconds, 3.0)})
        print(json.dumps(run_naive(naive_args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
