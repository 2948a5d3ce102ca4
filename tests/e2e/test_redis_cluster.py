"""Real marketflow processes on a real local 3-master Redis Cluster: an ingest process and api
processes answering alike through sharded `updates`, and a master killed (SIGKILL) and restarted
empty mid-run: nothing lost, nothing doubled, health naming the dead master meanwhile."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster import LocalCluster
from tests.e2e.conftest import Factory
from tests.e2e.test_roles import live, send_known, settled
from tests.faults.conftest import stop, wait_accepted
from tests.procs import CountingFeed, Marketflow, ScriptedFeed, postgres_database, wait_for

FEED_RATE = 100  # lines/s per feed


@pytest.fixture
def cluster_keys(redis_cluster: LocalCluster, prefix: str) -> Iterator[LocalCluster]:
    """The session's cluster; this test's keys are deleted from every master afterwards."""
    yield redis_cluster
    redis_cluster.delete(f"{prefix}*")


def on_cluster(cluster: LocalCluster, config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "redis": {"cluster": True, "nodes": cluster.nodes, "timeout_ms": 300}}


def test_ingest_and_api_processes_answer_alike_across_masters(
    marketflow: Factory, cluster_keys: LocalCluster, prefix: str
) -> None:
    feeds = [ScriptedFeed() for _ in range(2)]
    try:
        ingest = marketflow(on_cluster(cluster_keys, live(feeds, "ingest")))
        for feed in feeds:
            feed.wait_client()
        api1 = marketflow(on_cluster(cluster_keys, live(feeds, "api")))
        api2 = marketflow(on_cluster(cluster_keys, live(feeds, "api")))
        send_known(feeds)
        wait_for(lambda: ingest.health()["pipeline"]["updates_total"] == 56, 10, "ticks in")
        body = settled([ingest, api1, api2])
        assert all(status == 200 for status, _ in body), body
        health = api1.health()
        assert health["redis"]["status"] == "ok", health
        assert health["ingest"]["instances"] == [ingest.health()["instance"]]
        # The four keys' names sit on more than one master.
        where = cluster_keys.keys(f"{prefix}latest:*")
        assert sum(len(v) for v in where.values()) == 4
        assert sum(1 for v in where.values() if v) >= 2, where
    finally:
        for feed in feeds:
            feed.close()


def redis_ticks(cluster: LocalCluster) -> dict[str, int]:
    """Ticks held in every Redis window, per key name."""
    out: dict[str, int] = {}
    for server in cluster.servers.values():
        with server.client() as r:
            for name in r.scan_iter(match="window:*", count=1000):
                out[name] = sum(int(m.split("|")[1]) for m in r.zrange(name, 0, -1))
    return out


def pg_ticks(dbname: str) -> int:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        row = conn.execute("SELECT coalesce(sum(tick_count), 0)::bigint FROM aggregates").fetchone()
        doubled = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM aggregates"
            " GROUP BY exchange, pair_name, timestamp HAVING count(*) > 1) AS d"
        ).fetchone()
    assert row is not None and doubled is not None
    assert doubled[0] == 0, "a minute row written twice"
    return int(row[0])


def test_a_master_killed_and_restarted_mid_run(
    own_redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    feeds = [CountingFeed(FEED_RATE) for _ in range(3)]
    with postgres_database() as dbname:
        config = {
            "http": {},
            "postgres": {"dbname": dbname},
            "redis": {"cluster": True, "nodes": own_redis_cluster.nodes, "timeout_ms": 300},
            "exchanges": [
                {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": f.port}
                for i, f in enumerate(feeds)
            ],
            "app": {"mode": "live", "data_dir": str(tmp_path / "data"), "grace_ms": 200},
            "log": {"level": "info"},
        }
        mf = Marketflow(tmp_path, json.loads(json.dumps(config)))
        try:
            wait_for(lambda: mf.health()["status"] == "ok", 15, "healthy on the cluster")
            # Every key's names on one master; the fifteen keys over all three.
            wait_for(lambda: len(redis_ticks(own_redis_cluster)) == 15, 10, "every key in redis")
            by_port = {p: own_redis_cluster.keys("window:*")[p] for p in own_redis_cluster.ports}
            assert all(by_port.values()), by_port
            victim = max(by_port, key=lambda p: len(by_port[p]))
            victim_keys = set(by_port[victim])

            own_redis_cluster.kill(victim)
            named = f"redis node 127.0.0.1:{victim}"
            wait_for(
                lambda: named in (mf.health()["redis"]["error"] or ""),
                10,
                "health naming the dead master",
            )
            health = mf.health()
            assert health["redis"]["status"] == "down" and health["status"] == "degraded"
            # The other masters go on: their windows grow while the victim is down.
            before = redis_ticks(own_redis_cluster)
            wait_for(
                lambda: all(n > before[k] for k, n in redis_ticks(own_redis_cluster).items()),
                10,
                "the live masters' keys written on",
            )
            own_redis_cluster.restart(victim)  # back empty
            wait_for(
                lambda: victim_keys <= set(own_redis_cluster.keys("window:*")[victim]),
                15,
                "the victim's keys rewritten",
            )
            wait_for(lambda: mf.health()["redis"]["status"] == "ok", 10, "redis ok again")
            for feed in feeds:
                feed.pause()
            sent = sum(f.total for f in feeds)
            wait_accepted(mf, lambda: sent)
            # Redis holds every tick (the victim's keys rewritten whole from memory) ...
            wait_for(
                lambda: sum(redis_ticks(own_redis_cluster).values()) == sent,
                10,
                f"every one of {sent} ticks in redis",
            )
            # ... and the API answers from it: each latest price is Redis's.
            for name in victim_keys:
                source, symbol = name.split("{", 1)[1].rstrip("}").split(":")
                body = mf.get(f"/prices/latest/{source}/{symbol}").json()
                with own_redis_cluster.servers[victim].client() as r:
                    stored = r.hgetall(f"latest:{{{source}:{symbol}}}")
                assert body["price"] == float(stored["price"]), (body, stored)
            assert mf.health()["pipeline"]["late"] == 0
            total, _ = stop(mf)
            assert total == sent
            assert pg_ticks(dbname) == sent  # nothing lost, nothing doubled
        finally:
            mf.close()
            for feed in feeds:
                feed.close()
