"""The REST API under load, next to the ceiling of the HTTP server it runs on.

    .venv/bin/python -m benchmarks.bench_api [--seconds 10] [--connections 8,64] [--profile DIR]

1. The ceiling: `benchmarks.bare_asgi` (a fixed JSON answer, no framework) on
   `hypercorn --worker-class trio`, one worker, measured before marketflow starts and again after
   it stopped (the higher figure counts: the stricter comparison); then with `--workers 2`, the
   multi-process ceiling on this machine.
2. marketflow (live mode) ingesting 10,000 updates/s from three `benchmarks.blaster` feeds, while
   wrk (`-t2 --latency`, keep-alive) loads, in turn, `/prices/latest/exchange1/BTCUSDT`,
   `/prices/highest/BTCUSDT?period=1m` (1-second buckets in memory) and
   `/prices/average/BTCUSDT?period=1d` (minutes: memory plus one PostgreSQL read per request).
   Afterwards the ticks folded must equal the ticks sent: the API load never costs ingest a tick.

`--profile DIR` also records each endpoint at the highest connection count with py-spy
(collapsed stacks in DIR, plus a summary of the hottest frames on stdout).
Targets: latest >= 80 % of the ceiling with p99 <= 15 ms at 8 connections; statistics >= 60 %.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

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
)
from tests.procs import REPO, Process, free_port, wait_for

FEEDS = 3
RATE = 10_000
ENDPOINTS = {
    "latest": "/prices/latest/exchange1/BTCUSDT",
    "highest 1m": "/prices/highest/BTCUSDT?period=1m",
    "average 1d": "/prices/average/BTCUSDT?period=1d",
}
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unknown wrk duration {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2)], 2)


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles and errors out of `wrk --latency` output."""
    out: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            out["requests_per_s"] = round(float(line.split()[1]))
        elif m := re.fullmatch(r"(50|75|90|99)%\s+(\S+)", line):
            out[f"p{m.group(1)}_ms"] = to_ms(m.group(2))
        elif line.startswith("Non-2xx or 3xx responses:"):
            out["non_2xx"] = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            out["socket_errors"] = sum(int(n) for n in re.findall(r"\d+", line))
        elif m := re.match(r"(\d+) requests in", line):
            out["requests"] = int(m.group(1))
    if "requests_per_s" not in out:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return out


def wrk(url: str, connections: int, seconds: float, script: str | None = None) -> dict[str, Any]:
    """wrk's figures for `url`; `script`: a Lua file that makes each request (wrk -s)."""
    threads = min(2, connections)
    extra = ["-s", script] if script else []
    result = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", *extra, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return parse_wrk(result.stdout)


class BareAsgi(Process):
    """`benchmarks.bare_asgi` on Hypercorn's Trio worker, on a free port."""

    def __init__(self, workers: int = 1, body_bytes: int = 0) -> None:
        self.port = free_port()
        hypercorn = str(Path(sys.executable).with_name("hypercorn"))
        super().__init__(
            [
                hypercorn,
                "--worker-class",
                "trio",
                "--workers",
                str(workers),
                "--bind",
                f"127.0.0.1:{self.port}",
                "benchmarks.bare_asgi:app",
            ],
            env={"BARE_ASGI_BODY_BYTES": str(body_bytes)} if body_bytes else None,
            cwd=REPO,
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        wait_for(lambda: httpx.get(self.url).status_code == 200, 20, "bare ASGI app answers")


def ceiling(connections: list[int], seconds: float, workers: int, label: str) -> None:
    server = BareAsgi(workers)
    try:
        for c in connections:
            progress(f"api: bare ASGI, {workers} worker(s), {c} connections ({label})")
            cpu = CpuMeter(server.proc.pid, tree=True)
            result = wrk(server.url, c, seconds)
            emit(
                "api",
                f"bare ASGI, {workers} worker(s), {c} conn",
                server="bare",
                workers=workers,
                connections=c,
                when=label,
                cpu_percent=round(cpu.read()),
                **result,
            )
    finally:
        server.close()


def run_marketflow(connections: list[int], seconds: float, profile: Path | None) -> dict[str, Any]:
    runs = len(ENDPOINTS) * (len(connections) + (1 if profile else 0))
    budget = runs * (seconds + 5) + 60  # the blasters are told when to finish
    with ingesting(RATE, budget, FEEDS) as (mf, blasters):
        time.sleep(2)  # a couple of seconds of buckets for the statistics
        for path in ENDPOINTS.values():
            answer = mf.get(path)
            if answer.status_code != 200:
                raise RuntimeError(f"GET {path}: {answer.status_code} {answer.text}")
        for c in connections:
            for name, path in ENDPOINTS.items():
                progress(f"api: marketflow {name}, {c} connections")
                cpu = CpuMeter(mf.proc.pid)
                result = wrk(mf.url + path, c, seconds)
                emit(
                    "api",
                    f"marketflow {name}, {c} conn",
                    server="marketflow",
                    endpoint=name,
                    path=path,
                    connections=c,
                    cpu_percent=round(cpu.read()),
                    **result,
                )
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            c = max(connections)
            for name, path in ENDPOINTS.items():
                out = profile / f"api-{name.replace(' ', '-')}-{c}conn.txt"
                progress(f"api: py-spy on marketflow {name}, {c} connections -> {out}")
                spy = py_spy_record(mf.proc.pid, out, seconds)
                result = wrk(mf.url + path, c, seconds)
                spy.wait(timeout=seconds + 30)
                emit(
                    "api-profile",
                    f"marketflow {name}, {c} conn, under py-spy",
                    endpoint=name,
                    connections=c,
                    file=str(out),
                    requests_per_s=result["requests_per_s"],
                    **profile_breakdown(out),
                )
        sent = blasters_done(blasters, 60, finish=True)
        wait_for(lambda: folded(mf) >= sent, 60, "every tick folded", interval=0.05)
        return {"sent": sent, "folded": folded(mf), "lost": sent - folded(mf)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument(
        "--connections", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64]
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        progress("api: wrk is not installed (make bench installs it with apt-get)")
        return 2
    if args.profile is not None and py_spy() is None:
        progress("api: py-spy is not installed (make bench installs it); no profiles")
        args.profile = None
    ceiling(args.connections, args.seconds, 1, "before")
    ingest = run_marketflow(args.connections, args.seconds, args.profile)
    emit("api", "ingest during the API load", server="marketflow", rate=RATE, **ingest)
    ceiling(args.connections, args.seconds, 1, "after")
    ceiling(args.connections, args.seconds, 2, "after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
