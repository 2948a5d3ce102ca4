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
from collections.abc import Callable, Iterator, Sequence
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


def live_config(feeds: Sequence[Any], **app: Any) -> dict[str, Any]:
    """A live-mode config reading `feeds` (anything with a `.port`) as exchange1..N, with a
    skew limit wide enough for ticks stamped in the past and a 200 ms grace; `app` overrides."""
    return {
        "exchanges": [
            {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": f.port}
            for i, f in enumerate(feeds)
        ],
        "app": {"mode": "live", "max_clock_skew_s": 600, "grace_ms": 200, **app},
    }


def hypercorn_command(workers: int) -> list[str]:
    """marketflow under Hypercorn with `workers` workers, as the README shows it."""
    return [
        str(Path(PYTHON).with_name("hypercorn")),
        "--config",
        "python:marketflow.hypercorn_config",
        "--worker-class",
        "trio",
        "--workers",
        str(workers),
        "marketflow.asgi:create_app()",
    ]


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


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: the developer's own marketflow settings
    (`MARKETFLOW_*`, `DB_HOST`, `REDIS_HOST`) never leak into a test's process."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MARKETFLOW_") and k not in ("DB_HOST", "REDIS_HOST")
    }
    return {**base, **(extra or {})}


class Process:
    """A child process whose output is collected in the background."""

    def __init__(
        self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_environment(env),
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

    def __init__(
        self,
        count: int = 3,
        *,
        rate: float | None = None,
        seed: int | None = None,
        ports: list[int] | None = None,
        symbols: list[str] | None = None,
    ) -> None:
        wanted = ports or [0] * count
        args = [PYTHON, "-m", "marketflow", "simulate", "--ports", ",".join(map(str, wanted))]
        if rate is not None:
            args += ["--rate", str(rate)]
        if symbols is not None:
            args += ["--symbols", ",".join(symbols)]
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

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        *,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        command: list[str] | None = None,
    ) -> None:
        self.port = config.setdefault("http", {}).setdefault("port", free_port())
        # Never the default feed ports (40101-40103): a developer's `marketflow simulate` may
        # be listening there. These free ports have nothing behind them.
        config.setdefault(
            "exchanges",
            [{"name": f"exchange{i}", "host": "127.0.0.1", "port": free_port()} for i in (1, 2, 3)],
        )
        self.url = f"http://127.0.0.1:{self.port}"
        path = write_config(tmp / f"config-{uuid.uuid4().hex[:6]}.toml", config)
        cmd = command or [PYTHON, "-m", "marketflow", "--config", str(path)]
        super().__init__(
            cmd + (args or []), env={"MARKETFLOW_CONFIG": str(path), **(env or {})}, cwd=tmp
        )
        self.client = httpx.Client(base_url=self.url, timeout=5.0)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"marketflow exited {self.proc.returncode}: {self.output}")
            body = self.client.get("/health").json()
            return body if body.get("status") not in (None, "starting") else None

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
        super().__init__(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
        )
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
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sigterm(proc: Process) -> None:
    proc.signal(signal.SIGTERM)


class TcpProxy:
    """A TCP proxy the test owns, in front of a real server: `cut()` drops every connection and
    refuses new ones (the server looks dead), `restore()` lets traffic through again. Setting
    `delay_s` holds every chunk that long before passing it on, either way (a distant or slow
    server: each round trip costs twice `delay_s`)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0  # connections let through
        self.delay_s = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # the 5 s was for connecting; idle connections stay
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b, from_server in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, from_server), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                self._pass(data, dst, from_server)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _pass(self, data: bytes, dst: socket.socket, from_server: bool) -> None:
        """Pass one chunk on (subclasses may hold or split it)."""
        if self.delay_s:
            time.sleep(self.delay_s)  # the injected latency itself
        dst.sendall(data)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


class ScriptedFeed:
    """A feed server whose lines the test decides: `send(ticks)` writes them to every client."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = int(self.listener.getsockname()[1])
        self.clients: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.clients.append(client)

    def wait_client(self, timeout: float = 15) -> None:
        wait_for(lambda: self.clients, timeout, "a client connected to the scripted feed")

    def send(self, ticks: list[tuple[str, float, int]]) -> None:
        import json

        data = "".join(
            json.dumps({"symbol": s, "price": p, "timestamp": ts}) + "\n" for s, p, ts in ticks
        ).encode()
        with self._lock:
            clients = list(self.clients)
        for client in clients:
            try:
                client.sendall(data)
            except OSError:  # that process went away: close our end (no socket left to the GC)
                client.close()
                with self._lock:
                    self.clients.remove(client)

    def close_clients(self) -> None:
        """Forget the current clients (their process went away): the next send waits for new."""
        with self._lock:
            for c in self.clients:
                c.close()
            self.clients.clear()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for c in self.clients:
                c.close()
            self.clients.clear()


# --- fault-suite helpers ------------------------------------------------------------------------

DEFAULT_FEED_SYMBOLS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")
_BASE_PRICES = {"BTCUSDT": 100_000.0, "DOGEUSDT": 0.3, "TONUSDT": 3.9, "SOLUSDT": 200.0}


class CountingFeed:
    """A feed server that sends valid lines with current timestamps at `rate` lines/s to each
    client and counts exactly the lines it handed to each connection.

    `sent[i]` is the number of lines of the i-th accepted connection, counted *before* the write:
    when a write fails (the client died) it is an upper bound of what the client can have read,
    otherwise it is exact. `flap_s` closes each connection (cleanly, after whole lines) once it
    has been open that long; the client is expected to reconnect. `rate` may be changed at any
    time; `pause()` returns once no write is in progress and none will start until `resume()`.
    """

    TICK_S = 0.01

    def __init__(
        self,
        rate: float,
        *,
        symbols: tuple[str, ...] = DEFAULT_FEED_SYMBOLS,
        flap_s: float | None = None,
    ) -> None:
        self.rate = rate
        self.symbols = symbols
        self.flap_s = flap_s
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.sent: list[int] = []
        self.accepted_at: list[float] = []
        self.closed_at: list[float] = []  # connections this feed ended (flapping)
        self.write_failed: list[bool] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sending = threading.Event()
        self._sending.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.sent)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.sent)

    def per_connection(self) -> list[int]:
        """Lines sent to each connection, in the order they were accepted."""
        with self._lock:
            return list(self.sent)

    def sent_since(self, connection: int) -> int:
        """Lines sent to the connections accepted from the `connection`-th one on."""
        with self._lock:
            return sum(self.sent[connection:])

    def wait_client(self, count: int = 1, timeout: float = 15) -> None:
        wait_for(lambda: self.connections >= count, timeout, f"{count} client(s) on feed")

    def pause(self) -> None:
        self._sending.clear()
        with self._send_lock:
            pass

    def resume(self) -> None:
        self._sending.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.sent)
                self.sent.append(0)
                self.write_failed.append(False)
                self.accepted_at.append(time.monotonic())
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _lines(self, n: int, start: int) -> bytes:
        ts = int(time.time() * 1000)
        out = []
        for i in range(start, start + n):
            symbol = self.symbols[i % len(self.symbols)]
            base = _BASE_PRICES.get(symbol, 3050.0)
            price = base * (1 + 0.001 * ((i * 7919) % 1000) / 1000)
            out.append(f'{{"symbol":"{symbol}","price":{price!r},"timestamp":{ts}}}\n')
        return "".join(out).encode()

    def _serve(self, conn: socket.socket, index: int) -> None:
        started = last = time.monotonic()
        credit = 0.0
        counter = 0
        while not self._stop.is_set():
            time.sleep(self.TICK_S)  # pacing only
            now = time.monotonic()
            with self._send_lock:
                if self._sending.is_set():
                    credit += (now - last) * self.rate
                last = now
                n = int(credit)
                if n and self._sending.is_set():
                    credit -= n
                    data = self._lines(n, counter)
                    counter += n
                    with self._lock:
                        self.sent[index] += n
                    try:
                        conn.sendall(data)
                    except OSError:
                        with self._lock:
                            self.write_failed[index] = True
                        return
                if self.flap_s is not None and now - started >= self.flap_s:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                    conn.close()
                    with self._lock:
                        self.closed_at.append(time.monotonic())
                    return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(timeout=5)


class RawFeed(ScriptedFeed):
    """A ScriptedFeed that can also write arbitrary bytes (overlong lines, garbage)."""

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            clients = list(self.clients)
        for client in clients:
            client.sendall(data)


def proc_status_kb(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` field in kB (VmRSS: resident now, VmHWM: peak resident)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmHWM") / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples a process's VmRSS in the background; `peak_mb` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.samples.append(rss_mb(self.pid))
            self._stop.wait(self.interval)

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_mb
