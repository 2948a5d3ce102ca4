"""The Redis adapter against a real local 3-master Redis Cluster: keys spread over every master,
one pipelined round per master, the mirror's exactness across masters, leases, statuses and
sharded pub/sub."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import trio

from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.mirror import Mirror
from marketflow.models import Key, MinuteRow, Mode
from marketflow.restore import merge_restored
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.redis import RedisPriceStore
from tests.cluster import LocalCluster, cluster_prefix
from tests.integration.test_mirror import KEYS, MINUTE, NOW_S, View, answers, fold, random_ticks

MANY: list[Key] = [(f"src{i}", f"SYM{j}USDT") for i in range(10) for j in range(10)]


@pytest.fixture
def prefix(redis_cluster: LocalCluster) -> Iterator[str]:
    with cluster_prefix(redis_cluster) as p:
        yield p


def cluster_store(cluster: LocalCluster, prefix: str) -> RedisPriceStore:
    config = RedisConfig(key_prefix=prefix, timeout_ms=1000, cluster=True, nodes=cluster.nodes)
    return RedisPriceStore(config, window_seconds=300, ttl_seconds=70)


def flusher_for(state: MarketState, store: RedisPriceStore) -> RedisFlusher:
    return RedisFlusher(
        state, store, StoreHealth("redis"), Metrics(), interval_s=0.1, clock=lambda: NOW_S
    )


class Rounds:
    """Counts what reaches the servers: pipelined rounds and single commands."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines: list[int] = []  # commands per pipelined round
        self.singles: list[str] = []
        pipeline_execute = redis.client.Pipeline.execute
        single_execute = redis.client.Redis.execute_command
        cluster_execute = redis.cluster.RedisCluster.execute_command

        def count_pipeline(pipe: Any, *a: Any, **kw: Any) -> Any:
            self.pipelines.append(len(pipe.command_stack))
            return pipeline_execute(pipe, *a, **kw)

        def count_single(client: Any, *args: Any, **kw: Any) -> Any:
            self.singles.append(str(args[0]))
            return single_execute(client, *args, **kw)

        def count_cluster(client: Any, *args: Any, **kw: Any) -> Any:
            self.singles.append(f"cluster {args[0]}")
            return cluster_execute(client, *args, **kw)

        monkeypatch.setattr(redis.client.Pipeline, "execute", count_pipeline)
        monkeypatch.setattr(redis.cluster.RedisCluster, "execute_command", count_cluster)
        monkeypatch.setattr(redis.client.Redis, "execute_command", count_single)


async def test_many_keys_land_on_every_master_in_one_round_per_master(
    redis_cluster: LocalCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = MarketState(window_seconds=300)
    rng = random.Random(5)
    for source, symbol in MANY:
        for _ in range(3):
            ts = NOW_S * 1000 - rng.randrange(0, 120_000)
            state.key(source, symbol).fold([(symbol, round(rng.uniform(1, 2), 4), ts)])
    store = cluster_store(redis_cluster, prefix)
    flusher = flusher_for(state, store)
    store.sharded()  # the server version, asked once before counting
    rounds = Rounds(monkeypatch)
    assert await flusher.flush()
    # One pipelined round per master, nothing per key: 100 keys, 3 rounds.
    assert len(rounds.pipelines) == 3, rounds.pipelines
    assert rounds.singles == []
    monkeypatch.undo()
    where = redis_cluster.keys(f"{prefix}latest:*")
    assert all(len(names) >= 10 for names in where.values()), where  # every master holds keys
    assert sum(len(names) for names in where.values()) == len(MANY)
    for source, symbol in MANY[:5]:
        port = redis_cluster.port_of(store.window_key((source, symbol)))
        tagged = {
            store.window_key((source, symbol)),
            store.latest_key((source, symbol)),
            store.meta_key((source, symbol)),
        }
        assert tagged <= set(redis_cluster.keys(f"{prefix}*")[port])  # one master per key

    windows, latest, metas = store.read_snapshot(MANY)
    assert set(latest) == set(MANY) == set(windows) == set(metas)
    for key in MANY:
        st = state.keys[key]
        assert latest[key].price == st.latest_price and latest[key].ts == st.latest_ts
        assert dict(windows[key]) == {s: list(b) for s, b in st.buckets.items()}
    assert store.read_windows(MANY, NOW_S - 30).keys() <= set(MANY)
    assert store.read_latest(MANY) == latest
    store.ping()
    store.probe_write()
    store.close()


async def test_the_mirror_answers_identically_across_masters(
    redis_cluster: LocalCluster, prefix: str
) -> None:
    rng = random.Random(11)
    rows = MemoryAggregateStore()
    resumed = MinuteRow("ex1", "BTCUSDT", (MINUTE - 2) * 60_000, 7, 700.0, 50.0, 150.0, 60.0, 70.0)
    rows.upsert([resumed])
    ingesting = MarketState(window_seconds=300)
    horizon = (MINUTE - 4) * 60
    merge_restored(ingesting, KEYS, horizon, {}, {}, {("ex1", "BTCUSDT"): {MINUTE - 2: resumed}})
    writer = cluster_store(redis_cluster, prefix)
    flusher = flusher_for(ingesting, writer)
    fold(ingesting, random_ticks(rng, 300))
    assert await flusher.flush()
    nodes = {writer.node_of(key) for key in KEYS}
    assert len(nodes) >= 2, nodes  # the four keys do not all sit on one master

    mirrored = MarketState(window_seconds=300, owned_by_default=False)
    reader = cluster_store(redis_cluster, prefix)
    mirror = Mirror(mirrored, reader, StoreHealth("redis"), KEYS, mode=Mode.TEST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        with trio.fail_after(10):
            while not mirror.current:
                await trio.sleep(0.01)
        for _ in range(5):  # changes travel as sharded `updates` messages
            fold(ingesting, random_ticks(rng, 100))
            assert await flusher.flush()
        want = flusher.seq
        with trio.fail_after(10):
            while mirror._last_seq.get(flusher.instance) != want:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert mirrored.keys[("ex1", "BTCUSDT")].minute_base == {MINUTE - 2: resumed.as_bucket()}
    assert await answers(View(mirrored, rows)) == await answers(View(ingesting, rows))
    assert mirror.reads == 1  # every later change came by message, none lost
    writer.close()
    reader.close()


def test_leases_and_epochs_share_a_master(redis_cluster: LocalCluster, prefix: str) -> None:
    a, b = cluster_store(redis_cluster, prefix), cluster_store(redis_cluster, prefix)
    for source in ("exchange1", "exchange2", "exchange3", "test-exchange1"):
        assert redis_cluster.port_of(a.lease_key(source)) == redis_cluster.port_of(
            a.epoch_key(source)
        )
        first = a.acquire_lease(source, "inst-a", 5000)
        assert first is not None
        assert b.acquire_lease(source, "inst-b", 5000) is None
        assert b.lease_holder(source) == "inst-a"
        assert a.renew_lease(source, "inst-a", 5000) and not b.renew_lease(source, "inst-b", 5000)
        b.release_lease(source, "inst-b")  # not b's: stays
        assert a.lease_holder(source) == "inst-a"
        a.release_lease(source, "inst-a")
        assert b.acquire_lease(source, "inst-b", 5000) == first + 1
    a.close()
    b.close()


def test_statuses_are_read_from_every_master(redis_cluster: LocalCluster, prefix: str) -> None:
    store = cluster_store(redis_cluster, prefix)
    # Instance ids chosen so that every master holds two statuses.
    per_master: dict[int, list[str]] = {port: [] for port in redis_cluster.ports}
    with redis_cluster.client() as client:
        for i in range(10_000):
            instance = f"host-{i}-abcdef"
            port = int(client.get_node_from_key(f"{prefix}status:{instance}").port)
            if len(per_master[port]) < 2:
                per_master[port].append(instance)
            if all(len(v) == 2 for v in per_master.values()):
                break
    bodies = {inst: f'{{"n":"{inst}"}}'.encode() for v in per_master.values() for inst in v}
    assert len(bodies) == 2 * len(redis_cluster.ports)
    for instance, body in bodies.items():
        store.write_status(instance, body, 5000)
    where = redis_cluster.keys(f"{prefix}status:*")
    assert all(len(names) == 2 for names in where.values()), where
    assert sorted(store.read_statuses()) == sorted(bodies.values())
    assert store.keep_mode("live", 5000) == "live"
    assert store.keep_mode("test", 5000) == "live"  # the shared one stays
    assert store.get_mode() == "live"
    store.close()


def test_updates_and_control_use_sharded_pub_sub(redis_cluster: LocalCluster, prefix: str) -> None:
    store = cluster_store(redis_cluster, prefix)
    assert store.sharded()  # Redis >= 7 here
    sub = store.subscribe(store.control_channel)
    port = redis_cluster.port_of(store.control_channel)
    with redis_cluster.servers[port].client() as r:
        assert store.control_channel in r.execute_command("PUBSUB", "SHARDCHANNELS")
    with redis_cluster.servers[port].client() as r:
        assert store.control_channel not in r.execute_command("PUBSUB", "CHANNELS")
    assert store.publish(store.control_channel, b"one") == 1
    store.publish(store.control_channel, b"two")
    got: list[bytes] = []
    for _ in range(20):
        got += sub.drain(0.5)
        if len(got) >= 2:
            break
    assert got == [b"one", b"two"]
    sub.close()
    store.close()
