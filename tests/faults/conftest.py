"""The fault rig: every test owns its redis-server, its proxy in front of PostgreSQL, its database,
its feeds and the real `marketflow` process, and records its figures.

Figures: each test fills the `figures` dict; when it passes and `MARKETFLOW_FAULTS_REPORT` names a
file, one JSON line is appended to it (`tests/faults/report.py` turns them into the table of
`docs/reliability.md`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
import redis

from tests.procs import (
    CountingFeed,
    Marketflow,
    RedisServer,
    TcpProxy,
    peak_rss_mb,
    postgres_database,
    wait_for,
)

REPORT_ENV = "MARKETFLOW_FAULTS_REPORT"
RSS_BOUND_MB = 300.0
SHUTDOWN_LINE = re.compile(r"shutdown complete.*\bupdates_total=(\d+)")


class HasPort(Protocol):
    port: int


# --- figures ------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_PASSED] = report.passed


_PASSED = pytest.StashKey[bool]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What the test measured; appended to the report file if the test passed."""
    data: dict[str, Any] = {}
    started = time.monotonic()
    yield data
    path = os.environ.get(REPORT_ENV)
    if not path or not data or not request.node.stash.get(_PASSED, False):
        return
    data.setdefault("test", request.node.nodeid.split("::")[-1])
    data["test_seconds"] = round(time.monotonic() - started, 1)
    line = json.dumps(data, sort_keys=True) + "\n"
    # One small O_APPEND write per line: xdist workers may append to the same file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# --- the rig ------------------------------------------------------------------------------------


class Rig:
    """Processes and stores one fault test owns; everything is stopped by the fixture."""

    def __init__(self, tmp: Path, dbname: str) -> None:
        self.tmp = tmp
        self.dbname = dbname
        self.redis = RedisServer()
        self.proxy = TcpProxy(5432)
        self.processes: list[Marketflow] = []
        self.feeds: list[Any] = []

    # -- starting things --------------------------------------------------------------------

    def counting_feeds(self, count: int, rate: float, **kw: Any) -> list[CountingFeed]:
        feeds = [CountingFeed(rate, **kw) for _ in range(count)]
        self.feeds += feeds
        return feeds

    def own(self, feed: Any) -> Any:
        self.feeds.append(feed)
        return feed

    def config(
        self, exchanges: Sequence[HasPort], app: dict[str, Any] | None = None, **tables: Any
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "http": {},
            "postgres": {"port": self.proxy.port, "dbname": self.dbname},
            "redis": {"port": self.redis.port},
            "exchanges": [
                {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": feed.port}
                for i, feed in enumerate(exchanges)
            ],
            "app": {
                "mode": "live",
                "data_dir": str(self.tmp / "data"),
                "reconnect_max_delay_s": 2,
                **(app or {}),
            },
            "log": {"level": "info"},
        }
        for table, values in tables.items():
            config.setdefault(table, {}).update(values)
        return config

    def start(self, config: dict[str, Any], **kw: Any) -> Marketflow:
        mf = Marketflow(self.tmp, json.loads(json.dumps(config)), **kw)
        self.processes.append(mf)
        return mf

    def restart_redis(self) -> None:
        """Kill redis-server (SIGKILL: nothing saved) and start an empty one on the same port."""
        port = self.redis.port
        self.redis.kill()
        self.redis.close()
        self.redis = RedisServer(port)

    def kill_redis(self) -> None:
        self.redis.kill()
        self.redis.close()

    def start_redis(self) -> None:
        self.redis = RedisServer(self.redis.port)

    # -- reading the stores -----------------------------------------------------------------

    def redis_client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, decode_responses=True, socket_timeout=5)

    def redis_ticks(self) -> int:
        """Ticks held in every Redis window (the sum of the per-second counts)."""
        total = 0
        with self.redis_client() as r:
            for key in r.scan_iter(match="window:*", count=1000):
                total += sum(int(m.split("|")[1]) for m in r.zrange(key, 0, -1))
        return total

    def redis_latest_keys(self) -> int:
        with self.redis_client() as r:
            return len(list(r.scan_iter(match="latest:*", count=1000)))

    def pg(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(host="127.0.0.1", user="postgres", dbname=self.dbname)

    def pg_ticks(self) -> dict[str, int]:
        """sum(tick_count) per exchange, read directly (not through the proxy)."""
        try:
            with self.pg() as conn:
                found = conn.execute(
                    "SELECT exchange, sum(tick_count)::bigint FROM aggregates GROUP BY exchange"
                ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
        return {str(e): int(n) for e, n in found}

    def pg_duplicate_rows(self) -> int:
        """Rows beyond the first per (exchange, pair, minute): 0 unless the unique key is gone."""
        with self.pg() as conn:
            row = conn.execute(
                "SELECT coalesce(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM aggregates"
                " GROUP BY exchange, pair_name, timestamp) AS g"
            ).fetchone()
        assert row is not None
        return int(row[0])

    def close(self) -> None:
        for mf in self.processes:
            mf.close()
        for feed in self.feeds:
            feed.close()
        self.proxy.close()
        self.redis.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with postgres_database() as dbname:
        r = Rig(tmp_path, dbname)
        try:
            yield r
        finally:
            r.close()


# --- accounting ---------------------------------------------------------------------------------


def messages(mf: Marketflow, source: str | None = None) -> int:
    sources = mf.health()["sources"]
    names = [source] if source else list(sources)
    return sum(int(sources[n]["messages"]) for n in names)


def feeds_connected(mf: Marketflow) -> bool:
    """Every source of the current mode is connected."""
    health = mf.health()
    current = mf.get("/mode").json()["sources"]
    return all(health["sources"][name]["status"] == "connected" for name in current)


def updates_total(mf: Marketflow) -> int:
    return int(mf.health()["pipeline"]["updates_total"])


def wait_accepted(mf: Marketflow, expected: Callable[[], int], timeout: float = 15) -> int:
    """Wait until the process has accepted and folded exactly `expected()` ticks."""

    def done() -> int | None:
        health = mf.health()
        total = sum(int(s["messages"]) for s in health["sources"].values())
        want = expected()
        if total > want:
            raise AssertionError(f"accepted {total} ticks, more than the {want} sent")
        folded = int(health["pipeline"]["updates_total"])
        return folded if total == want and folded == want else None

    return int(wait_for(done, timeout, f"every sent tick accepted ({expected()})"))


def assert_healthy_process(mf: Marketflow) -> None:
    assert mf.proc.poll() is None, f"marketflow exited {mf.proc.returncode}: {mf.output}"
    assert "Traceback" not in mf.output, mf.output


def stop(mf: Marketflow, timeout: float = 10.0) -> tuple[int, float]:
    """SIGTERM; assert exit 0 within `timeout` and no traceback; return (updates_total, seconds)."""
    assert_healthy_process(mf)
    started = time.monotonic()
    mf.signal(signal.SIGTERM)
    code = mf.wait(timeout + 5)
    seconds = time.monotonic() - started
    assert code == 0, mf.output
    assert seconds <= timeout, f"shutdown took {seconds:.1f}s"
    assert "Traceback" not in mf.output, mf.output
    found = [m for line in mf.lines if (m := SHUTDOWN_LINE.search(line))]
    assert found, mf.output
    return int(found[-1].group(1)), seconds


def peak_mb(mf: Marketflow) -> float:
    peak = peak_rss_mb(mf.proc.pid)
    assert peak < RSS_BOUND_MB, f"peak RSS {peak:.0f} MB"
    return round(peak, 1)
