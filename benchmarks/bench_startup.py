"""Start-up to ready: time from exec of `marketflow` (test mode) to its first `/health` 200.

    .venv/bin/python -m benchmarks.bench_startup [--runs 5]

Each run execs the installed `marketflow` command with its own config (test mode, real Redis
and PostgreSQL) and polls `GET /health` every 10 ms over fresh connections until it answers
200; then SIGTERM. The first run also creates and migrates the database (a fresh install);
the others start against it, like a restart. Printed: every run, the median of the restarts
and the first run. Target: under 2 s.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, progress
from tests.procs import free_port, postgres_database, redis_prefix, write_config

POLL_S = 0.01


def health_status(port: int) -> int | None:
    """The status code of `GET /health`, or None while nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def one_start(tmp: Path, dbname: str, prefix: str) -> dict[str, Any]:
    port = free_port()
    config = write_config(
        tmp / f"startup-{port}.toml",
        {
            "http": {"port": port},
            "postgres": {"dbname": dbname},
            "redis": {"key_prefix": prefix},
            "app": {"mode": "test", "data_dir": str(tmp / "data")},
            "log": {"level": "warning"},
        },
    )
    command = str(Path(sys.executable).with_name("marketflow"))
    started = time.monotonic()
    proc = subprocess.Popen(
        [command, "--config", str(config)],
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_answer: float | None = None
    try:
        while True:
            status = health_status(port)
            now = time.monotonic() - started
            if status is not None and first_answer is None:
                first_answer = now
            if status == 200:
                ready = now
                break
            if proc.poll() is not None:
                raise RuntimeError(f"marketflow exited {proc.returncode} before ready")
            if now > 60:
                raise RuntimeError("marketflow not ready after 60 s")
            time.sleep(POLL_S)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"ready_s": round(ready, 3), "listening_s": round(first_answer or ready, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="restarts after the first start")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis_prefix() as prefix, postgres_database() as db:
        progress("startup: first start (creates and migrates the database)")
        first = one_start(Path(tmp), db, prefix)
        runs = []
        for i in range(args.runs):
            progress(f"startup: restart {i + 1}/{args.runs}")
            runs.append(one_start(Path(tmp), db, prefix))
    ready = [r["ready_s"] for r in runs]
    emit(
        "startup",
        f"median of {len(runs)}",
        median_ready_s=round(statistics.median(ready), 3),
        max_ready_s=max(ready),
        runs_ready_s=ready,
        median_listening_s=round(statistics.median(r["listening_s"] for r in runs), 3),
        first_start_ready_s=first["ready_s"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
