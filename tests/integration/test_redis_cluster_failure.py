"""A master of a real local Redis Cluster killed and restarted empty under the flusher: the other
masters' keys go on being written every flush, the dead master's keys wait in memory and are
rewritten whole when it returns, and health names the dead master meanwhile."""

from __future__ import annotations

import pytest
import trio

from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.models import Key
from marketflow.state import MarketState
from marketflow.store.redis import RedisPriceStore
from tests.cluster import LocalCluster

NOW_S = 1_795_646_460  # a minute start
KEYS: list[Key] = [(f"src{i}", f"SYM{j}USDT") for i in range(4) for j in range(5)]


def ticks(state: MarketState, second: int, price: float) -> None:
    for source, symbol in KEYS:
        state.key(source, symbol).fold([(symbol, price, (NOW_S + second) * 1000)])


def window_counts(store: RedisPriceStore, keys: list[Key]) -> dict[Key, int]:
    """Ticks per key held in its Redis window."""
    return {k: sum(int(b[0]) for _, b in v) for k, v in store.read_windows(keys, 0).items()}


async def test_a_dead_master_holds_back_only_its_keys(own_redis_cluster: LocalCluster) -> None:
    config = RedisConfig(timeout_ms=500, cluster=True, nodes=own_redis_cluster.nodes)
    store = RedisPriceStore(config, window_seconds=300, ttl_seconds=70)
    reader = RedisPriceStore(config, window_seconds=300, ttl_seconds=70)
    state = MarketState(window_seconds=300)
    health = StoreHealth("redis")
    flusher = RedisFlusher(state, store, health, Metrics(), interval_s=0.1, clock=lambda: NOW_S)
    ticks(state, 0, 1.0)
    assert await flusher.flush()
    by_node: dict[str, list[Key]] = {}
    for key in KEYS:
        by_node.setdefault(store.node_of(key), []).append(key)
    assert len(by_node) == 3, by_node
    dead = sorted(by_node)[0]
    dead_port = int(dead.rsplit(":", 1)[1])
    alive = [k for node, keys in by_node.items() if node != dead for k in keys]

    own_redis_cluster.kill(dead_port)
    for second in (1, 2, 3):
        ticks(state, second, 1.0 + second)
        assert not await flusher.flush()
    # The other masters took every flush; health names the dead one, and so does the probe.
    assert window_counts(reader, alive) == dict.fromkeys(alive, 4)
    assert not health.up and f"redis node {dead}" in (health.error or "")
    with pytest.raises(Exception, match=f"redis node {dead}"):
        store.probe_write()
    assert state.held_rewrites == set(by_node[dead])

    own_redis_cluster.restart(dead_port)  # back empty
    assert reader.read_windows(by_node[dead], 0) == {}
    ticks(state, 4, 5.0)
    # Tried again after its backoff (0.5 s at first): flush until it takes its keys.
    with trio.fail_after(15):
        while not (await flusher.flush() and not state.held_rewrites):
            await trio.sleep(0.05)
    assert await flusher.flush()  # the held keys' whole rewrite
    counts = window_counts(reader, KEYS)
    assert counts == dict.fromkeys(KEYS, 5), counts  # every tick of the dead master's keys too
    assert health.up
    store.probe_write()
    for key in by_node[dead]:
        assert reader.read_latest([key])[key].price == 5.0
    store.close()
    reader.close()
