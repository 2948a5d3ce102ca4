"""Session-wide: the real PostgreSQL and Redis must answer before anything starts.

Integration, end-to-end, fault and browser tests talk to the local PostgreSQL (127.0.0.1:5432)
and Redis (127.0.0.1:6379). When one of them is down, the run stops at once with one line saying
which and how to start it, instead of hundreds of connection errors. A run of unit tests only
(`pytest tests/unit ...`) does not need them and is not checked.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cluster import LocalCluster

PG = ("127.0.0.1", 5432)
REDIS = ("127.0.0.1", 6379)
HINTS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save ""',
}


def _unreachable() -> list[str]:
    down = []
    try:
        import psycopg

        psycopg.connect(
            host=PG[0], port=PG[1], user="postgres", dbname="postgres", connect_timeout=2
        ).close()
    except Exception:
        down.append("PostgreSQL")
    try:
        with socket.create_connection(REDIS, timeout=2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                down.append("Redis")
    except OSError:
        down.append("Redis")
    return down


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller checked already
        return
    paths = [str(a) for a in config.args]
    if paths and all(p.startswith(("tests/unit", "tests\\unit")) for p in paths):
        return
    down = _unreachable()
    if down:
        where = {"PostgreSQL": f"{PG[0]}:{PG[1]}", "Redis": f"{REDIS[0]}:{REDIS[1]}"}
        what = "; ".join(
            f"{name} at {where[name]} does not answer (start it: {HINTS[name]})" for name in down
        )
        pytest.exit(f"marketflow's tests need the real stores: {what}", returncode=3)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real 3-master Redis Cluster on free ports, shared by the session's tests (each uses its
    own key prefix); skipped only where redis-server or redis-cli is not installed."""
    with _local_cluster(Path(tmp_path_factory.mktemp("redis-cluster"))) as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A 3-master Redis Cluster of one test's own (for a test that kills a master)."""
    with _local_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


@contextlib.contextmanager
def _local_cluster(workdir: Path) -> Iterator[LocalCluster]:
    from tests.cluster import LocalCluster, cluster_binaries_missing

    missing = cluster_binaries_missing()
    if missing:
        pytest.skip(f"a Redis Cluster needs redis-server and redis-cli: {missing}")
    cluster = LocalCluster(workdir)
    try:
        yield cluster
    finally:
        cluster.close()
