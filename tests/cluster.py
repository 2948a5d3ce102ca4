"""A real local Redis Cluster for tests: three masters (no replicas) on free ports in a temporary
directory, created with `redis-cli --cluster create` and torn down after.

A master can be killed (SIGKILL) and started again on the same port with the same
`nodes-PORT.conf`: it rejoins with its slots, and comes back empty (`--save ""`, no AOF).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.procs import Process, wait_for

MASTERS = 3


def cluster_port() -> int:
    """A free port P with P + 10000 free too (a node's cluster bus) and P <= 55535."""
    for _ in range(200):
        port = random.randrange(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def cluster_binaries_missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


class ClusterNodeProcess(Process):
    """One `redis-server --cluster-enabled yes` in `workdir`."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        super().__init__(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-require-full-coverage",
                "no",
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            cwd=workdir,
        )
        try:
            wait_for(self.ping, 10, f"redis-server on {port}")
        except BaseException:
            self.close()
            raise

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def ping(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server {self.port} exited: {self.output}")
        try:
            with self.client() as r:
                return bool(r.ping())
        except redis.ConnectionError:
            return False


class LocalCluster:
    """Three masters; `nodes` as `[redis] nodes` takes them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = [cluster_port() for _ in range(MASTERS)]
        self.servers: dict[int, ClusterNodeProcess] = {}
        try:
            for port in self.ports:
                self.servers[port] = ClusterNodeProcess(port, workdir)
            created = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *self.nodes,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert created.returncode == 0, created.stdout + created.stderr
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    @property
    def nodes(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def state_ok(self, port: int) -> bool:
        with self.servers[port].client() as r:
            info = r.execute_command("CLUSTER", "INFO")
        text = info if isinstance(info, str) else str(info)
        return "cluster_state:ok" in text

    def wait_ok(self, timeout: float = 30) -> None:
        """Every master says `cluster_state:ok` and sees the others' slots."""

        def ok() -> bool:
            for port in self.ports:
                try:
                    if not self.state_ok(port):
                        return False
                    with self.servers[port].client() as r:
                        slots = r.execute_command("CLUSTER", "SLOTS")
                    if len(slots) < MASTERS:
                        return False
                except redis.RedisError:
                    return False
            return True

        wait_for(ok, timeout, "cluster_state:ok on every master", interval=0.1)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode("127.0.0.1", p) for p in self.ports],
            decode_responses=True,
            require_full_coverage=False,
            socket_timeout=2,
        )

    def port_of(self, key: str) -> int:
        """The port of the master holding `key`'s slot."""
        with self.client() as c:
            return int(c.get_node_from_key(key).port)

    def kill(self, port: int) -> None:
        """SIGKILL one master: nothing saved."""
        server = self.servers.pop(port)
        server.kill()
        server.close()

    def restart(self, port: int) -> None:
        """Start a killed master again on its port with its nodes.conf (it comes back empty)."""
        self.servers[port] = ClusterNodeProcess(port, self.workdir)
        self.wait_ok()

    def keys(self, pattern: str) -> dict[int, list[str]]:
        """Per master, its keys matching `pattern`."""
        out = {}
        for port, server in self.servers.items():
            with server.client() as r:
                out[port] = sorted(r.scan_iter(match=pattern, count=1000))
        return out

    def delete(self, pattern: str) -> None:
        for port, server in self.servers.items():
            with contextlib.suppress(redis.RedisError), server.client() as r:
                names = list(r.scan_iter(match=pattern, count=1000))
                for name in names:  # one slot per DEL: a cluster refuses cross-slot DELs
                    r.delete(name)
            del port

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()


@contextlib.contextmanager
def cluster_prefix(cluster: LocalCluster) -> Iterator[str]:
    """A key prefix unique to one test; its keys are deleted from every master afterwards."""
    prefix = f"mftest-{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        cluster.delete(f"{prefix}*")
