"""Real processes for end-to-end and fault tests: marketflow, simulators, redis-server, a TCP proxy.

Every helper uses free ports, waits on conditions with deadlines (never fixed sleeps) and cleans
up after itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; fail with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (OSError, httpx.HTTPError, ValueError, KeyError) as exc:
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last error: {last_error!r})")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, config: dict[str, Any]) -> Path:
    lines: list[str] = []
    for table, values in config.items():
        if table == "exchanges":
            for exchange in values:
                lines.append("[[exchanges]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in exchange.items()]
            continue
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Process:
    """A child process whose output is collected in the background."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Simulator(Process):
    """`marketflow simulate` on free ports."""

    def __init__(self, count: int = 3, *, rate: float | None = None, seed: int | None = None,
                 ports: list[int] | None = None) -> None:
        wanted = ports or [0] * count
        args = [PYTHON, "-m", "marketflow", "simulate", "--ports", ",".join(map(str, wanted))]
        if rate is not None:
            args += ["--rate", str(rate)]
        if seed is not None:
            args += ["--seed", str(seed)]
        super().__init__(args)
        self.ports: list[int] = wait_for(self._ports, 15, "simulator listening line")

    def _ports(self) -> list[int] | None:
        for line in self.lines:
            m = re.search(r"simulator listening .*ports=([\d,]+)", line)
            if m:
                return [int(p) for p in m.group(1).split(",")]
        if self.proc.poll() is not None:
            raise AssertionError(f"simulator exited: {self.output}")
        return None


class Marketflow(Process):
    """The real `marketflow` process with its own config, database, key prefix and data dir."""

    def __init__(self, tmp: Path, config: dict[str, Any], *, args: list[str] | None = None,
                 env: dict[str, str] | None = None, wait_ready: bool = True,
                 command: list[str] | None = None) -> None:
        self.port = config.setdefault("http", {}).setdefault("port", free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        path = write_config(tmp / f"config-{uuid.uuid4().hex[:6]}.toml", config)
        cmd = command or [PYTHON, "-m", "marketflow", "--config", str(path)]
        super().__init__(cmd + (args or []), env={"MARKETFLOW_CONFIG": str(path), **(env or {})},
                         cwd=tmp)
        self.client = httpx.Client(base_url=self.url, timeout=5.0)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"marketflow exited {self.proc.returncode}: {self.output}")
            body = self.client.get("/health").json()
            return body if "mode" in body else None

        return dict(wait_for(ready, timeout, "marketflow /health"))

    def health(self) -> dict[str, Any]:
        return dict(self.client.get("/health").json())

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def close(self) -> None:
        self.client.close()
        super().close()


class RedisServer(Process):
    """A private redis-server on a free port (for tests that stop and restart Redis)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no"])
        wait_for(self._ping, 10, "redis-server ping")

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


def redis_keys(pattern: str, port: int = 6379) -> list[str]:
    import redis

    with redis.Redis(port=port, decode_responses=True) as r:
        return sorted(r.scan_iter(match=pattern, count=1000))


@contextlib.contextmanager
def redis_prefix(port: int = 6379) -> Iterator[str]:
    """A key prefix unique to one test; its keys are deleted afterwards."""
    import redis

    prefix = f"mftest-{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        with contextlib.suppress(redis.RedisError), redis.Redis(port=port) as r:
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A database name unique to one test; dropped afterwards (marketflow creates it)."""
    import psycopg

    name = f"mftest_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sigterm(proc: Process) -> None:
    proc.signal(signal.SIGTERM)
