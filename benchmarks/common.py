"""What every benchmark shares: the machine, blaster feeds, a live-mode marketflow, /proc and
/metrics readings, percentiles, and the JSON records `benchmarks.run` collects.

Each benchmark module prints one JSON object a line on stdout; lines carrying a `"bench"` key
are results (`emit`), anything else is progress. Benchmarks print figures; they never assert
targets (the loss checks are exact counts, and a miscount is reported, not raised).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from tests.procs import REPO, Marketflow, Process, postgres_database, redis_prefix, wait_for

SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


# --- the machine and the code under test --------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"


def commit() -> str:
    """`git rev-parse --short HEAD`, with `+wip` when marketflow/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "marketflow"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+wip" if dirty else "")


def loadavg() -> float:
    """The 1-minute load average: other work on the machine skews every figure."""
    return round(os.getloadavg()[0], 2)


def emit(bench: str, case: str, **fields: Any) -> dict[str, Any]:
    """Print one result record (a JSON line with `bench` and `case`) and return it."""
    record = {"bench": bench, "case": case, **fields, "load1": loadavg()}
    print(json.dumps(record), flush=True)
    return record


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def slope_per_minute(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, in value units per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var * 60


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# --- /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Hypercorn runs its workers as child processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for {pid}")


class CpuMeter:
    """CPU share of a process (and its children, `tree=True`) between `start()` and `read()`,
    100 = one core."""

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self.pid = pid
        self._measure = tree_cpu_seconds if tree else cpu_seconds
        self.start()

    def start(self) -> None:
        self._cpu = self._measure(self.pid)
        self._t = time.monotonic()

    def read(self) -> float:
        elapsed = time.monotonic() - self._t
        return 100 * (self._measure(self.pid) - self._cpu) / elapsed if elapsed > 0 else 0.0


# --- feeds ---------------------------------------------------------------------------------------


class Blaster(Process):
    """A `benchmarks.blaster` feed server on a free port (`rate` lines/s, or None: max)."""

    def __init__(self, seconds: float, rate: float | None, seed: int) -> None:
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
            ],
            cwd=REPO,
        )
        self.port: int = wait_for(self._port, 10, "blaster listening")

    def _port(self) -> int | None:
        for line in self.lines:
            if line.startswith("{") and "listening" in line:
                return int(json.loads(line)["listening"]["port"])
        if self.proc.poll() is not None:
            raise AssertionError(f"blaster exited: {self.output}")
        return None

    def finish(self) -> None:
        """Stop sending at the next chunk boundary (SIGUSR1); `summary()` stays exact."""
        self.signal(signal.SIGUSR1)

    def summary(self) -> dict[str, Any] | None:
        for line in self.lines:
            if line.startswith("{") and '"sent"' in line:
                return dict(json.loads(line))
        return None


def blasters_done(blasters: Sequence[Blaster], timeout: float, *, finish: bool = False) -> int:
    """Wait until every blaster has reported (after telling them to stop now, `finish`); the
    total number of lines they sent."""
    if finish:
        for b in blasters:
            b.finish()
    summaries = wait_for(
        lambda: all(b.summary() for b in blasters) and [b.summary() for b in blasters],
        timeout,
        "blasters finished",
    )
    return sum(int(s["sent"]) for s in summaries)


# --- marketflow ---------------------------------------------------------------------------------


def live_config(
    tmp: Path, dbname: str, prefix: str, ports: Sequence[int], **app: Any
) -> dict[str, Any]:
    """A live-mode config reading the given feed ports as exchange1..N."""
    return {
        "postgres": {"dbname": dbname},
        "redis": {"key_prefix": prefix},
        "exchanges": [
            {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": port}
            for i, port in enumerate(ports)
        ],
        "app": {
            "mode": "live",
            "data_dir": str(tmp / "data"),
            "stale_after_s": 600,  # a blaster that finished stays silent: no reconnects
            "max_clock_skew_s": 3600,
            **app,
        },
        "log": {"level": "warning"},
    }


@contextlib.contextmanager
def live_marketflow(
    tmp: Path, blasters: Sequence[Blaster], **app: Any
) -> Iterator[tuple[Marketflow, str, str]]:
    """A live-mode marketflow reading `blasters`, with its own database and key prefix.

    Yields (process, database name, key prefix); the process is stopped (SIGTERM, so it writes
    its open minutes) before the database is dropped.
    """
    with redis_prefix() as prefix, postgres_database() as dbname:
        config = live_config(tmp, dbname, prefix, [b.port for b in blasters], **app)
        mf = Marketflow(tmp, config)
        try:
            yield mf, dbname, prefix
        finally:
            mf.close()


@contextlib.contextmanager
def ingesting(
    rate: float, budget_s: float, feeds: int = 3
) -> Iterator[tuple[Marketflow, list[Blaster]]]:
    """A live marketflow reading `feeds` blasters that send `rate` updates/s in all for at most
    `budget_s`; yields once the first ticks are folded, and stops everything afterwards."""
    blasters = [Blaster(budget_s, rate / feeds, seed=i) for i in range(feeds)]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            live_marketflow(Path(tmp), blasters) as (mf, _, _),
        ):
            wait_for(lambda: folded(mf) > 0, 30, "first ticks folded")
            yield mf, blasters
    finally:
        for b in blasters:
            b.close()


def folded(mf: Marketflow) -> int:
    return int(mf.health()["pipeline"]["updates_total"])


def scrape(mf: Marketflow) -> dict[str, float]:
    """marketflow's /metrics as {name{labels}: value} (comments dropped)."""
    out: dict[str, float] = {}
    for line in mf.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def db_totals(dbname: str) -> dict[str, int]:
    """What marketflow's `aggregates` table holds: rows, the sum of `tick_count`, and the
    distinct minutes and keys (one row per key and minute is the whole point)."""
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        row = conn.execute(
            """SELECT count(*), coalesce(sum(tick_count), 0), count(DISTINCT "timestamp"),
                      count(DISTINCT (exchange, pair_name))
                 FROM aggregates"""
        ).fetchone()
    assert row is not None
    rows, ticks, minutes, keys = (int(v) for v in row)
    return {"rows": rows, "ticks": ticks, "minutes": minutes, "keys": keys}


def stop(mf: Marketflow, timeout: float = 30) -> int:
    """SIGTERM and wait: marketflow drains, writes its open minutes and exits."""
    mf.client.close()
    mf.proc.terminate()
    return mf.proc.wait(timeout=timeout)


# --- profiles ------------------------------------------------------------------------------------


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def py_spy_record(pid: int, out: Path, seconds: float, rate: int = 200) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into `out` (collapsed stacks, every thread, idle
    samples included, without pausing the process)."""
    command = py_spy()
    assert command is not None
    return subprocess.Popen(
        [
            command,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            str(rate),
            "--threads",
            "--idle",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# Who does the work in a sample of marketflow's main thread: the innermost frame that matches
# one of these (py-spy frame texts); a sample with no match is Trio's scheduler and the rest.
CATEGORIES = [
    ("idle (waiting in epoll)", r"_io_epoll\.py"),
    ("ingest", r"read_feed|_distribute|Pipeline\._work|framing\.py|generator\.py|state\.py.*fold"),
    ("WebSocket hub", r"PriceHub|broadcast\.py|api/ws\.py"),
    ("stores (flusher, aggregator, probes)", r"flusher\.py|aggregation\.py|probe_stores"),
    ("marketflow request handling", r"\(marketflow/(api/|queries|state|models|logs)"),
    ("Quart, Werkzeug, Blinker", r"\((quart|quart_trio|werkzeug|blinker)/"),
    ("Hypercorn, h11, wsproto", r"\((hypercorn|h11|wsproto)/"),
]
_CATEGORY_RES = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def category_of(frames: list[str]) -> str:
    """The category of the innermost frame that has one (frames run outermost first)."""
    for frame in reversed(frames):
        for name, pattern in _CATEGORY_RES:
            if pattern.search(frame):
                return name
    return "trio core and the rest"


def profile_breakdown(collapsed: Path, top: int = 12) -> dict[str, Any]:
    """Shares of the main thread's samples per category (`category_of`) and its hottest frames
    (self time), from py-spy's collapsed stacks (`--threads --idle`)."""
    categories: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or "MainThread" not in frames[0]:
            continue
        n = int(count)
        total += n
        own[re.sub(r" \(.*?/site-packages/", " (", frames[-1])] += n
        categories[category_of(frames[1:])] += n
    if not total:
        return {"samples": 0, "categories": [], "self": []}
    return {
        "samples": total,
        "categories": [(c, round(100 * k / total, 1)) for c, k in categories.most_common()],
        "self": [(f, round(100 * k / total, 1)) for f, k in own.most_common(top)],
    }
