"""Redis Cluster without a cluster: the config keys, a flush plan cut per node, and the flusher
holding back only the keys of a node that refused its part."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from marketflow.config import ConfigError, load_config
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.models import Key
from marketflow.ports import FlushPlan, PartialWrite
from marketflow.state import MarketState
from marketflow.store.redis import split_plan

T0 = 1_795_646_400_000  # a minute start (ms)
KEYS: list[Key] = [("ex", s) for s in ("AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT")]
NODE = {KEYS[0]: "n1", KEYS[1]: "n2", KEYS[2]: "n1", KEYS[3]: "n3"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_cluster_config_reads_nodes(tmp_path: Path) -> None:
    text = '[redis]\ncluster = true\nnodes = ["127.0.0.1:7001", "redis-b:7002", "[::1]:7003"]\n'
    config = load_config(write(tmp_path, text), {})
    assert config.redis.cluster
    assert config.redis.node_addresses() == [
        ("127.0.0.1", 7001),
        ("redis-b", 7002),
        ("::1", 7003),
    ]
    env = {"MARKETFLOW_REDIS_CLUSTER": "true", "MARKETFLOW_REDIS_NODES": "h1:1,h2:2"}
    assert load_config(None, env).redis.nodes == ["h1:1", "h2:2"]
    assert not load_config(None, {}).redis.cluster


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[redis]\ncluster = true\n", "redis.nodes: required with redis.cluster = true"),
        ("[redis]\ncluster = true\nnodes = ['127.0.0.1']\n", "redis.nodes: '127.0.0.1'"),
        ("[redis]\ncluster = true\nnodes = ['h:0']\n", "redis.nodes: 'h:0'"),
        ("[redis]\ncluster = true\nnodes = ['h:70000']\n", "redis.nodes: 'h:70000'"),
        ("[redis]\ncluster = true\nnodes = ['a b:1']\n", "redis.nodes: 'a b:1'"),
        ("[redis]\ncluster = true\nnodes = ['h:1', 'h:1']\n", "listed twice"),
        ("[redis]\ncluster = true\nnodes = ['h:1']\ndb = 2\n", "redis.db"),
        ("[redis]\nnodes = ['h:1']\n", "redis.nodes: only used with redis.cluster"),
        ("[redis]\ncluster = 'yes'\n", "cluster"),
    ],
)
def test_cluster_config_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(write(tmp_path, text), {})


def test_bad_cluster_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MARKETFLOW_REDIS_CLUSTER"):
        load_config(None, {"MARKETFLOW_REDIS_CLUSTER": "maybe"})


def plan_for(state: MarketState, now_s: int) -> FlushPlan:
    plan = state.take_flush(now_s)
    assert plan is not None
    return plan


def folded_state() -> MarketState:
    state = MarketState(300)
    for i, (source, symbol) in enumerate(KEYS):
        state.key(source, symbol).fold([(symbol, 10.0 + i, T0 + 1000 * i)])
    return state


def test_a_plan_is_cut_per_node_and_the_message_goes_with_its_channel() -> None:
    state = folded_state()
    plan = plan_for(state, T0 // 1000 + 10)
    plan = attrs.evolve(plan, message=b"msg")
    parts = split_plan(plan, NODE.__getitem__, message_node="n4")
    assert sorted(parts) == ["n1", "n2", "n3", "n4"]
    for node, part in parts.items():
        keys = {(p.source, p.symbol) for p in part.latest}
        assert keys == {k for k, n in NODE.items() if n == node}
        assert set(part.buckets) == keys == set(part.touched) == set(part.rewritten)
        assert {(m.source, m.symbol) for m in part.meta} == keys
        assert set(part.horizons) == keys
        assert part.now_s == plan.now_s
        assert part.message == (b"msg" if node == "n4" else None)
    # Nothing lost, nothing doubled.
    assert sum(len(p.latest) for p in parts.values()) == len(plan.latest)
    assert sum(len(p.buckets) for p in parts.values()) == len(plan.buckets)
    assert sum(len(p.meta) for p in parts.values()) == len(plan.meta)
    assert parts["n4"].latest == [] and parts["n4"].buckets == {}


def test_held_keys_are_rewritten_once_their_node_takes_writes() -> None:
    state = folded_state()
    plan_for(state, T0 // 1000 + 10)  # the first flush (everything rewritten) went through
    state.hold_rewrites(lambda key: NODE[key] == "n1")
    assert state.held_rewrites == {KEYS[0], KEYS[2]}
    # n1 still failing: nothing released.
    assert state.release_rewrites(lambda key: NODE[key] == "n1") == 0
    assert state.take_flush(T0 // 1000 + 11) is None
    assert state.release_rewrites() == 2
    plan = plan_for(state, T0 // 1000 + 12)
    assert sorted(plan.rewritten) == [KEYS[0], KEYS[2]]
    assert plan.rewrite and not state.held_rewrites


class NodeFailingStore:
    """A price store over fake nodes: `down` nodes refuse their keys, the others keep them."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.written: dict[str, list[FlushPlan]] = {"n1": [], "n2": [], "n3": []}

    def write(self, plan: FlushPlan) -> None:
        parts = split_plan(plan, NODE.__getitem__, message_node="n2")
        failed = sorted(self.down)  # named until they take a write, touched or not
        for node, part in parts.items():
            if node not in self.down:
                self.written[node].append(part)
        if failed:
            lost = set(failed)
            raise PartialWrite(
                f"redis node {','.join(failed)}: ConnectionError",
                nodes=failed,
                covers=lambda key: NODE[key] in lost,
                written_any=any(n not in lost for n in parts),
            )

    def read_windows(self, keys: object, since_s: int) -> dict[Key, object]:
        return {}

    def read_latest(self, keys: object) -> dict[Key, object]:
        return {}

    def ping(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


async def test_a_failed_node_holds_back_only_its_keys() -> None:
    state = folded_state()
    store = NodeFailingStore()
    health = StoreHealth("redis")
    now = [T0 / 1000 + 10]
    flusher = RedisFlusher(
        state,
        store,
        health,
        Metrics(),
        interval_s=0.1,
        clock=lambda: now[0],  # type: ignore[arg-type]
    )
    assert await flusher.flush()
    store.down = {"n1"}
    written_before = {n: len(p) for n, p in store.written.items()}

    def tick(i: int, second: int) -> None:
        source, symbol = KEYS[i]
        state.key(source, symbol).fold([(symbol, 20.0 + i, T0 + 1000 * second)])

    for i in range(4):
        tick(i, 5)
    assert not await flusher.flush()
    assert not health.up and "n1" in (health.error or "")
    # The other nodes got their keys' changes in the same flush; n1's keys are held.
    assert len(store.written["n2"]) == written_before["n2"] + 1
    assert len(store.written["n3"]) == written_before["n3"] + 1
    assert len(store.written["n1"]) == written_before["n1"]
    assert state.held_rewrites == {KEYS[0], KEYS[2]}
    # No backoff for the nodes that answer: the next change goes out at the next flush, and a
    # flush without n1's keys does not release them while n1 is down.
    tick(1, 6)
    assert not await flusher.flush()
    assert state.held_rewrites == {KEYS[0], KEYS[2]}
    assert store.written["n2"][-1].buckets[KEYS[1]][0][0] == T0 // 1000 + 6
    # n1 is back (empty, say): its keys are rewritten whole, the others are not.
    store.down = set()
    tick(3, 7)
    assert await flusher.flush()
    assert health.up
    # The flush after the node came back rewrites its keys whole (a resync), and only them.
    assert await flusher.flush()
    after = store.written["n1"][written_before["n1"] :]
    assert sorted(k for part in after for k in part.rewritten) == [KEYS[0], KEYS[2]]
    whole = next(part for part in after if part.rewritten)
    assert sorted(s for s, _ in whole.buckets[KEYS[0]]) == [T0 // 1000, T0 // 1000 + 5]
    assert not any(p.rewritten for p in store.written["n3"][written_before["n3"] :])
    assert not state.held_rewrites


async def test_every_node_failing_is_redis_down() -> None:
    state = folded_state()
    store = NodeFailingStore()
    store.down = {"n1", "n2", "n3"}
    health = StoreHealth("redis")
    flusher = RedisFlusher(
        state,
        store,
        health,
        Metrics(),
        interval_s=0.1,
        clock=lambda: T0 / 1000 + 10,  # type: ignore[arg-type]
    )
    assert not await flusher.flush()
    assert not state.held_rewrites
    assert all(st.rewrite for st in state.keys.values())  # the whole-state rewrite path


async def test_a_failed_node_is_tried_again_while_nothing_changes() -> None:
    state = folded_state()
    store = NodeFailingStore()
    health = StoreHealth("redis")
    flusher = RedisFlusher(
        state,
        store,  # type: ignore[arg-type]
        health,
        Metrics(),
        interval_s=0.1,
        clock=lambda: T0 / 1000 + 10,
    )
    assert await flusher.flush()
    store.down = {"n1"}
    state.key(*KEYS[0]).fold([(KEYS[0][1], 30.0, T0 + 2000)])
    assert not await flusher.flush()
    seq = flusher.seq
    # Quiet: no change to flush, yet the failed node is asked again (an empty plan, no message).
    assert not await flusher.flush()
    assert flusher.seq == seq and not health.up
    store.down = set()
    assert await flusher.flush()  # n1 answers: health clears, its keys are released
    assert health.up and not state.held_rewrites
    assert await flusher.flush()
    assert sorted(store.written["n1"][-1].rewritten) == [KEYS[0], KEYS[2]]
    assert flusher.seq == seq + 1  # the rewrite's resync
    assert await flusher.flush()  # and then quiet again: nothing sent
    assert flusher.seq == seq + 1
