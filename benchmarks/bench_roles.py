"""Scale-out, side by side in one run while ingesting 10,000 updates/s: one `all` process against
one `ingest` process plus Hypercorn `--workers 2` serving as `api`.

    .venv/bin/python -m benchmarks.bench_roles [--seconds 10] [--clients 1000]

For each setup, on the same three `benchmarks.blaster` feeds:
1. wrk (`-t2 -c64 --latency`) on `GET /prices/latest/exchange1/BTCUSDT` and on
   `GET /prices/highest/BTCUSDT?period=1m`, with the CPU-seconds of the serving processes (the
   `all` process; the Hypercorn master and its two workers), so req/s per API-worker CPU-second;
2. freshness: a poller and a WebSocket client measure now - tick timestamp of what they see;
3. (split only) 1,000 WebSocket clients (`benchmarks.ws_clients`) over the two api workers:
   the largest gap between two frames of a client, and the frame lag.
The bare ASGI app on `hypercorn --workers 2` gives the two-worker ceiling of this machine in the
same run. Targets (the scale-out issue): split >= 1.5x the single process and >= 60 % of the
two-worker ceiling, p99 <= 50 ms; every client a frame at least every 250 ms, lag p99 <= 500 ms;
freshness p99 <= 150 ms. Two cores are shared by the blasters, wrk, the clients and marketflow:
where they cannot show a target, the per-CPU-second figures and the projection to N cores do
(labelled as a projection).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks.bench_api import BareAsgi, wrk
from benchmarks.bench_freshness import probe, summary
from benchmarks.bench_ws import json_line
from benchmarks.common import (
    Blaster,
    CpuMeter,
    blasters_done,
    emit,
    folded,
    live_config,
    progress,
    tree_cpu_seconds,
)
from tests.procs import (
    REPO,
    Marketflow,
    Process,
    free_port,
    hypercorn_command,
    postgres_database,
    redis_prefix,
    wait_for,
)

FEEDS = 3
RATE = 10_000
CONNECTIONS = 64
ENDPOINTS = {
    "latest": "/prices/latest/exchange1/BTCUSDT",
    "highest 1m": "/prices/highest/BTCUSDT?period=1m",
}


@contextlib.contextmanager
def setup(kind: str, budget_s: float) -> Iterator[tuple[Marketflow, Marketflow | None, Any]]:
    """`single`: one role-all process. `split`: a role-ingest process and Hypercorn with two
    api workers. Yields (the process clients talk to, the ingesting one if separate, blasters)."""
    blasters = [Blaster(budget_s, RATE / FEEDS, seed=i) for i in range(FEEDS)]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            redis_prefix() as prefix,
            postgres_database() as dbname,
        ):
            ports = [b.port for b in blasters]
            if kind == "single":
                mf = Marketflow(Path(tmp), live_config(Path(tmp), dbname, prefix, ports))
                try:
                    wait_for(lambda: folded(mf) > 0, 30, "first ticks folded")
                    yield mf, None, blasters
                finally:
                    mf.close()
                return
            ingest = Marketflow(
                Path(tmp), live_config(Path(tmp), dbname, prefix, ports, role="ingest")
            )
            port = free_port()
            config = live_config(Path(tmp), dbname, prefix, ports, role="api")
            config["http"] = {"port": port}
            api = Marketflow(
                Path(tmp),
                config,
                command=hypercorn_command(2),
                wait_ready=False,
            )
            try:
                wait_for(lambda: folded(ingest) > 0, 30, "first ticks folded")
                wait_for(
                    lambda: httpx.get(api.url + ENDPOINTS["latest"]).status_code == 200,
                    30,
                    "the api workers answer",
                )
                yield api, ingest, blasters
            finally:
                api.close()
                ingest.close()
    finally:
        for b in blasters:
            b.close()


def load(mf: Marketflow, kind: str, seconds: float) -> None:
    for name, path in ENDPOINTS.items():
        progress(f"roles: {kind}, {name}, {CONNECTIONS} connections")
        before = tree_cpu_seconds(mf.proc.pid)
        result = wrk(mf.url + path, CONNECTIONS, seconds)
        cpu_s = tree_cpu_seconds(mf.proc.pid) - before
        emit(
            "roles",
            f"{kind}: {name}, {CONNECTIONS} conn",
            setup=kind,
            endpoint=name,
            connections=CONNECTIONS,
            api_cpu_seconds=round(cpu_s, 2),
            requests_per_cpu_second=round(result["requests"] / cpu_s) if cpu_s else None,
            **result,
        )


def freshness(mf: Marketflow, kind: str, seconds: float) -> None:
    progress(f"roles: {kind}, freshness")
    rest, ws, _ = trio.run(probe, mf.port, seconds, 0.005)
    emit(
        "roles",
        f"{kind}: freshness tick -> answer",
        setup=kind,
        rest=summary(rest),
        ws={**summary(ws.lags), "max_gap_ms": ws.max_gap_ms},
    )


def fan_out(mf: Marketflow, clients: int, seconds: float) -> None:
    progress(f"roles: split, {clients} WebSocket clients")
    followers = Process(
        [
            sys.executable,
            "-m",
            "benchmarks.ws_clients",
            "--url",
            f"ws://127.0.0.1:{mf.port}/ws/prices",
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--warmup",
            "2",
        ],
        cwd=REPO,
    )
    try:
        wait_for(lambda: json_line(followers, "connected"), 30 + clients / 20, "clients in")
        before = tree_cpu_seconds(mf.proc.pid)
        result = wait_for(lambda: json_line(followers, "summary"), seconds + 90, "summary")
        cpu_s = tree_cpu_seconds(mf.proc.pid) - before
    finally:
        followers.close()
    per_client = result["summary"].get("frames_per_client_per_s") or 0
    frames = per_client * clients * seconds
    emit(
        "roles",
        f"split: {clients} WebSocket clients over 2 api workers",
        setup="split",
        api_cpu_seconds=round(cpu_s, 2),
        frames_per_cpu_second=round(frames / cpu_s) if frames and cpu_s else None,
        **result["summary"],
    )


def run(kind: str, seconds: float, clients: int) -> None:
    budget = 4 * (seconds + 10) + (seconds + 120 if kind == "split" else 0) + 60
    with setup(kind, budget) as (mf, ingest, blasters):
        time.sleep(2)  # a couple of seconds of buckets for the statistic
        load(mf, kind, seconds)
        freshness(mf, kind, seconds)
        if kind == "split":
            fan_out(mf, clients, seconds)
        counter = ingest or mf
        sent = blasters_done(blasters, 60, finish=True)
        wait_for(lambda: folded(counter) >= sent, 60, "every tick folded", interval=0.05)
        emit("roles", f"{kind}: ingest", setup=kind, sent=sent, lost=sent - folded(counter))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        progress("roles: wrk is not installed (make bench installs it with apt-get)")
        return 2
    server = BareAsgi(2)
    try:
        cpu = CpuMeter(server.proc.pid, tree=True)
        result = wrk(server.url, CONNECTIONS, args.seconds)
        emit(
            "roles",
            f"bare ASGI ceiling, 2 workers, {CONNECTIONS} conn",
            setup="bare",
            cpu_percent=round(cpu.read()),
            **result,
        )
    finally:
        server.close()
    run("single", args.seconds, args.clients)
    run("split", args.seconds, args.clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
