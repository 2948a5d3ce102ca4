"""Real marketflow processes on a real local 3-master Redis Cluster: an ingest process and api
processes answering alike through sharded `updates`, and a master killed (SIGKILL) and restarted
empty mid-run: nothing lost, nothing doubled, health naming the dead master meanwhile."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.cluster import LocalCluster
from tests.e2e.conftest import Factory
from tests.e2e.test_roles import live, send_known, settled
from tests.faults.conftest import stop, wait_accepted
from tests.procs import (
    CountingFeed,
    Marketflow,
    ScriptedFeed,
    Simulator,
    postgres_database,
    wait_for,
)

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
        # The api processes follow `updates` by SSUBSCRIBE on the channel's master.
        port = cluster_keys.port_of(f"{prefix}updates")
        with cluster_keys.servers[port].client() as r:
            assert f"{prefix}updates" in r.execute_command("PUBSUB", "SHARDCHANNELS")
            assert r.execute_command("PUBSUB", "SHARDNUMSUB", f"{prefix}updates")[1] >= 2
        # A mode switch asked of an api process travels over the sharded `control` channel to
        # the ingesting process, and its answer back over the sharded reply channel.
        response = api1.client.post("/mode/test")
        assert response.status_code == 200, response.text
        assert response.json()["mode"] == "test" and response.json()["changed"] is True
        assert ingest.get("/mode").json()["mode"] == "test"
        wait_for(lambda: api2.get("/mode").json()["mode"] == "test", 5, "api follows the mode")
    finally:
        for feed in feeds:
            feed.close()


def test_simulated_feeds_answers_match_the_cluster(
    marketflow: Factory, cluster_keys: LocalCluster, prefix: str
) -> None:
    simulator = Simulator(3, seed=7)
    try:
        exchanges = [
            {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": port}
            for i, port in enumerate(simulator.ports)
        ]
        mf = marketflow(on_cluster(cluster_keys, {"exchanges": exchanges, "app": {"mode": "live"}}))
        wait_for(lambda: mf.health()["status"] == "ok", 15, "healthy with three simulated feeds")
        symbols = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]
        wait_for(
            lambda: sum(len(v) for v in cluster_keys.keys(f"{prefix}latest:*").values()) == 15,
            10,
            "fifteen keys in the cluster",
        )
        for symbol in symbols:
            assert mf.get(f"/prices/latest/{symbol}").status_code == 200
        simulator.close()  # the prices stop moving: answers and Redis settle on the same ones

        def matches() -> bool:
            for exchange in exchanges:
                for symbol in symbols:
                    key = f"{prefix}latest:{{{exchange['name']}:{symbol}}}"
                    port = cluster_keys.port_of(key)
                    with cluster_keys.servers[port].client() as r:
                        stored = r.hgetall(key)
                    body = mf.get(f"/prices/latest/{exchange['name']}/{symbol}").json()
                    if body.get("price") != float(stored["price"]):
                        return False
                    if body.get("timestamp") != int(stored["ts"]):
                        return False
            return True

        wait_for(matches, 10, "every latest answer equal to the cluster's")
        # The minute's average counts the ticks the cluster's window holds for that key.
        key = f"{prefix}window:{{exchange1:BTCUSDT}}"
        with cluster_keys.servers[cluster_keys.port_of(key)].client() as r:
            held = sum(int(m.split("|")[1]) for m in r.zrange(key, 0, -1))
        stats = mf.get("/prices/average/exchange1/BTCUSDT?period=5m").json()
        assert 0 < stats["count"] <= held, (stats, held)
    finally:
        simulator.close()


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
            print(f"--- marketflow output:\n{mf.output[-6000:]}")  # shown when the test fails
            mf.close()
            for feed in feeds:
                feed.close()


def test_an_api_process_follows_keys_of_a_dead_master_by_messages(
    own_redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The mirror's exactness across masters under a failure: while the master holding some keys
    is down, their changes still reach an api process in the `updates` messages (published on
    another master); once it is back, every answer equals the ingesting process's again."""
    cluster = own_redis_cluster
    feeds = [ScriptedFeed() for _ in range(2)]
    started: list[Marketflow] = []
    with postgres_database() as dbname:
        try:

            def start(role: str) -> Marketflow:
                config = {
                    "http": {},
                    "postgres": {"dbname": dbname},
                    "log": {"level": "info"},
                    **on_cluster(cluster, live(feeds, role, data_dir=str(tmp_path / role))),
                }
                mf = Marketflow(tmp_path, json.loads(json.dumps(config)))
                started.append(mf)
                return mf

            ingest = start("ingest")
            for feed in feeds:
                feed.wait_client()
            api = start("api")
            send_known(feeds)
            settled([ingest, api])
            victim = cluster.port_of("latest:{exchange1:BTCUSDT}")
            assert cluster.port_of("updates") != victim  # the messages' master stays up
            cluster.kill(victim)
            named = f"redis node 127.0.0.1:{victim}"
            wait_for(
                lambda: named in (ingest.health()["redis"]["error"] or ""),
                10,
                "the ingest's health naming the dead master",
            )
            # Newer than every tick sent so far (send_known's last is 1 s ahead of its clock).
            now = int(time.time() * 1000) + 2000
            feeds[0].send([("BTCUSDT", 200.5, now), ("ETHUSDT", 300.25, now)])
            for symbol, price in (("BTCUSDT", 200.5), ("ETHUSDT", 300.25)):
                wait_for(
                    lambda s=symbol, p=price: (
                        api.get(f"/prices/latest/exchange1/{s}").json().get("price") == p
                    ),
                    10,
                    f"the api process sees exchange1 {symbol} at {price}",
                )
            cluster.restart(victim)
            # No tick flows now: the dead master is asked again all the same, and its keys are
            # rewritten once it answers.
            wait_for(lambda: ingest.health()["redis"]["status"] == "ok", 15, "redis ok again")
            body = settled([ingest, api])
            assert all(status == 200 for status, _ in body), body
            with cluster.servers[victim].client() as r:
                assert float(r.hget("latest:{exchange1:BTCUSDT}", "price") or 0) == 200.5
        finally:
            for name, mf in zip(("ingest", "api"), started, strict=False):
                print(f"--- {name} output:\n{mf.output[-6000:]}")  # shown when the test fails
                mf.close()
            for feed in feeds:
                feed.close()
