"""Redis adapter (contract: Redis): latest prices and per-second windows, one pipeline per flush.

Blocking: the core calls it through `trio.to_thread`. Timeouts are short and retries off, so a
dead Redis costs one `timeout_ms`, not a library's retry storm.

With `[redis] cluster = true` the client is redis-py's `RedisCluster`: it owns the slot table
and every single-key command's routing (leases, mode, status, channels). Batches (a flush, a
mirror's full read, a restore) are grouped by the node redis-py says holds each key
(`get_node_from_key`) and sent as one pipelined round per node on that node's own client, the
rounds side by side. Every key carries a `{SOURCE:SYMBOL}` hash tag, so all of a key's names sit
on one node. A node that refuses its round fails only its own keys (`PartialWrite`); the other
nodes' rounds stand. (redis-py's `ClusterPipeline` gives up the whole batch when one node
refuses the connection, and retries a failed node's commands one by one: neither fits.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError
from redis.retry import Retry

from marketflow.backoff import Backoff
from marketflow.config import RedisConfig
from marketflow.health import describe
from marketflow.live import KeyMeta, meta_fields, meta_from_fields
from marketflow.models import Bucket, Key, LatestPrice, decode_bucket, encode_bucket
from marketflow.ports import FlushPlan, PartialWrite

_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)
Command = tuple[Any, ...]  # a command and its arguments, as `execute_command` takes them
# A node answering these holds a stale view of the slots: refresh redis-py's slot table.
_TOPOLOGY_ERRORS = (MovedError, AskError, ClusterDownError, TryAgainError)


class NodeError(redis.exceptions.ConnectionError):
    """One or more cluster nodes failed a call; the message names each with its error."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        self.errors = errors
        super().__init__(node_errors(errors))


def node_errors(errors: dict[str, BaseException]) -> str:
    return "; ".join(f"redis node {name}: {describe(exc)}" for name, exc in sorted(errors.items()))


def split_plan(
    plan: FlushPlan, node_of: Callable[[Key], str], message_node: str
) -> dict[str, FlushPlan]:
    """`plan` cut into one plan per node (`node_of` each key); the `updates` message goes with
    the node holding its channel (a plan of its own when that node has no key to write)."""
    keys: dict[Key, str] = {}

    def node(key: Key) -> str:
        name = keys.get(key)
        if name is None:
            name = keys[key] = node_of(key)
        return name

    parts: dict[str, dict[str, Any]] = {}

    def part(name: str) -> dict[str, Any]:
        found = parts.get(name)
        if found is None:
            found = parts[name] = {
                "latest": [],
                "buckets": {},
                "touched": [],
                "meta": [],
                "rewritten": [],
                "horizons": {},
            }
        return found

    for latest in plan.latest:
        part(node((latest.source, latest.symbol)))["latest"].append(latest)
    for key, seconds in plan.buckets.items():
        part(node(key))["buckets"][key] = seconds
    for key in plan.touched:
        p = part(node(key))
        p["touched"].append(key)
        if key in plan.horizons:
            p["horizons"][key] = plan.horizons[key]
    for meta in plan.meta:
        part(node((meta.source, meta.symbol)))["meta"].append(meta)
    for key in plan.rewritten:
        part(node(key))["rewritten"].append(key)
    if plan.message is not None:
        part(message_node)
    return {
        name: FlushPlan(
            latest=p["latest"],
            buckets=p["buckets"],
            touched=p["touched"],
            now_s=plan.now_s,
            meta=p["meta"],
            rewritten=p["rewritten"],
            rewrite=bool(p["rewritten"]),
            message=plan.message if name == message_node else None,
            horizons=p["horizons"],
        )
        for name, p in parts.items()
    }


class RedisPriceStore:
    """Owns one redis-py client (its own small connection pools): a `Redis`, or a
    `RedisCluster` with `[redis] cluster = true` (connected at first use, so a process starts
    while the cluster is away, as it does without a single Redis)."""

    def __init__(self, config: RedisConfig, *, window_seconds: int, ttl_seconds: int) -> None:
        timeout = config.timeout_ms / 1000
        self._options: dict[str, Any] = {
            "password": config.password or None,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            "decode_responses": True,
        }
        self.cluster = config.cluster
        self._nodes = config.node_addresses()
        self._single: redis.Redis | None = None
        self._cluster: Any = None  # a RedisCluster (redis-py leaves its methods untyped)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._sharded: bool | None = None  # SPUBLISH/SSUBSCRIBE (a cluster of Redis >= 7)
        # Per node: when to try it again, and how it failed (its keys fail at once meanwhile).
        self._node_retry: dict[str, tuple[float, BaseException, Backoff]] = {}
        self._probe_keys: dict[str, str] = {}  # node -> a probe key on one of its slots
        if not self.cluster:
            self._single = redis.Redis(
                host=config.host, port=config.port, db=config.db, **self._options
            )
        self.timeout_s = timeout
        self.prefix = config.key_prefix
        self.window_seconds = window_seconds
        self.ttl_seconds = ttl_seconds

    # -- clients ---------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        """The client for single-key commands (redis-py routes them in a cluster)."""
        if self._single is not None:
            return self._single
        return self._cluster_client()

    def _cluster_client(self) -> Any:
        with self._lock:
            if self._cluster is None:
                options = dict(self._options)
                # Connecting asks the cluster's first master for its commands: while that one
                # is down, a few tries move to another master (redis-py replaces its default
                # node between tries). Then retries are off, as for a single Redis.
                options["retry"] = Retry(NoBackoff(), 6)
                client = RedisCluster(
                    startup_nodes=[
                        ClusterNode(host, port)  # type: ignore[no-untyped-call]
                        for host, port in self._nodes
                    ],
                    require_full_coverage=False,
                    **options,
                )
                client.set_retry(Retry(NoBackoff(), 0))
                self._cluster = client
            return self._cluster

    def sharded(self) -> bool:
        """Whether `updates` and `control` use sharded pub/sub (a cluster of Redis >= 7)."""
        if not self.cluster:
            return False
        if self._sharded is None:
            versions = self._on_primaries(lambda node: node.info("server")["redis_version"])
            if not versions:
                raise NodeError({"cluster": redis.exceptions.ConnectionError("no master answers")})
            self._sharded = all(int(str(v).split(".")[0]) >= 7 for v in versions.values())
        return self._sharded

    def _on_primaries[T](self, call: Callable[[redis.Redis], T]) -> dict[str, T]:
        """`call` on every master that answers (the others are left out)."""
        names = [str(node.name) for node in self._cluster_client().get_primaries()]
        results = self._on_nodes(dict.fromkeys(names, call))
        return {n: r for n, r in results.items() if not isinstance(r, BaseException)}

    def node_of(self, key: Key) -> str:
        """The cluster node holding `key`'s names (`host:port`, redis-py's slot table)."""
        return str(self._cluster_client().get_node_from_key(self.latest_key(key)).name)

    def _on_nodes[T](
        self, work: dict[str, Callable[[redis.Redis], T]]
    ) -> dict[str, T | BaseException]:
        """Run each node's call on that node's client, side by side; each result or error."""
        client = self._cluster_client()

        def run(name: str, call: Callable[[redis.Redis], T]) -> T | BaseException:
            try:
                node = client.get_node(node_name=name)
                if node is None:
                    raise redis.exceptions.ConnectionError(f"{name} left the cluster")
                return call(client.get_redis_connection(node))
            except Exception as exc:
                return exc

        if len(work) <= 1:
            results = {name: run(name, call) for name, call in work.items()}
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="redis-node")
            futures = {name: self._pool.submit(run, name, call) for name, call in work.items()}
            results = {name: future.result() for name, future in futures.items()}
        if any(isinstance(r, _TOPOLOGY_ERRORS) for r in results.values()):
            self._refresh_slots()
        return results

    def _refresh_slots(self) -> None:
        with contextlib.suppress(Exception):  # nothing answers: the next call finds out again
            self._cluster_client().nodes_manager.initialize()

    def _batch(self, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        """Each `(key name, command)` in one pipelined round (one per node in a cluster, by the
        key's node); the replies in order. Raises when any node fails."""
        if self._single is not None:
            pipe = self._single.pipeline(transaction=False)
            for _, command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return list(pipe.execute())
        client = self._cluster_client()
        groups: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(commands):
            groups.setdefault(str(client.get_node_from_key(name).name), []).append(i)

        def round_for(indexes: list[int]) -> Callable[[redis.Redis], list[Any]]:
            def call(node: redis.Redis) -> list[Any]:
                pipe = node.pipeline(transaction=False)
                for i in indexes:
                    pipe.execute_command(*commands[i][1])  # type: ignore[no-untyped-call]
                return list(pipe.execute())

            return call

        results = self._on_nodes({node: round_for(ix) for node, ix in groups.items()})
        errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
        if errors:
            raise NodeError(errors)
        out: list[Any] = [None] * len(commands)
        for node, indexes in groups.items():
            replies = results[node]
            assert isinstance(replies, list)
            for i, reply in zip(indexes, replies, strict=True):
                out[i] = reply
        return out

    # -- names -----------------------------------------------------------------------------

    def latest_key(self, key: Key) -> str:
        return f"{self.prefix}latest:{{{key[0]}:{key[1]}}}"

    def window_key(self, key: Key) -> str:
        return f"{self.prefix}window:{{{key[0]}:{key[1]}}}"

    def meta_key(self, key: Key) -> str:
        return f"{self.prefix}meta:{{{key[0]}:{key[1]}}}"

    @property
    def updates_channel(self) -> str:
        return f"{self.prefix}updates"

    @property
    def control_channel(self) -> str:
        return f"{self.prefix}control"

    # -- the flush -------------------------------------------------------------------------

    def write(self, plan: FlushPlan) -> None:
        if self._single is not None:
            pipe = self._single.pipeline(transaction=False)
            self._queue(pipe, plan)
            pipe.execute()
            return
        self._write_cluster(plan)

    def _queue(self, pipe: Any, plan: FlushPlan) -> None:
        """Every command of `plan`, queued on `pipe`."""
        for key in plan.rewritten:
            pipe.delete(self.window_key(key))
        for latest in plan.latest:
            name = self.latest_key((latest.source, latest.symbol))
            pipe.hset(name, mapping={"price": repr(latest.price), "ts": str(latest.ts)})
            pipe.expire(name, self.ttl_seconds)
        for key, seconds in plan.buckets.items():
            name = self.window_key(key)
            for second, bucket in seconds:
                # One member per second: drop the second's previous member, add the new one.
                pipe.zremrangebyscore(name, second, second)
                pipe.zadd(name, {encode_bucket(second, bucket): second})
        trim_below = plan.now_s - self.window_seconds
        for key in plan.touched:
            name = self.window_key(key)
            horizon = plan.horizons.get(key, 0)
            keep_from = min(horizon, trim_below + 1) if horizon > 0 else trim_below + 1
            pipe.zremrangebyscore(name, "-inf", f"({keep_from}")
            pipe.expire(name, self.window_seconds + 10)
        for meta in plan.meta:
            name = self.meta_key((meta.source, meta.symbol))
            pipe.delete(name)
            pipe.hset(name, mapping=meta_fields(meta))
        for key in {*plan.touched, *((m.source, m.symbol) for m in plan.meta)}:
            pipe.expire(self.meta_key(key), self.window_seconds + 10)
        if plan.message is not None:
            if self.sharded():
                pipe.execute_command("SPUBLISH", self.updates_channel, plan.message)
            else:
                pipe.publish(self.updates_channel, plan.message)

    def _write_cluster(self, plan: FlushPlan) -> None:
        """One round per node holding a key of `plan`; a node that fails (or is waiting to be
        tried again) fails only its keys: `PartialWrite` names it, the others are written.
        A node that failed stays named until it takes a round again (its keys' round, or a PING
        when the plan has none of its keys), even by flushes that do not touch it."""
        client = self._cluster_client()
        sharded = self.sharded()
        message_node = str(client.get_node_from_key(self.updates_channel).name)
        parts = split_plan(plan, self.node_of, message_node)
        now = time.monotonic()
        failed: dict[str, BaseException] = {}
        work: dict[str, Callable[[redis.Redis], object]] = {}
        for name in {*parts, *self._node_retry}:
            waiting = self._node_retry.get(name)
            if waiting is not None and now < waiting[0]:
                failed[name] = waiting[1]
            elif name in parts:
                work[name] = self._node_round(parts[name], sharded)
            else:
                work[name] = _ping
        for name, result in self._on_nodes(work).items():
            if isinstance(result, BaseException):
                failed[name] = result
                backoff = self._node_retry.get(name, (0.0, result, Backoff(0.5, 5.0)))[2]
                self._node_retry[name] = (now + backoff.next(), result, backoff)
            else:
                self._node_retry.pop(name, None)
        if failed:
            lost = set(failed)

            def covers(key: Key) -> bool:
                try:
                    return self.node_of(key) in lost
                except Exception:  # its slot has no master now: it waits too
                    return True

            raise PartialWrite(
                node_errors(failed),
                nodes=sorted(lost),
                covers=covers,
                written_any=any(name not in lost for name in parts),
            )

    def _node_round(self, plan: FlushPlan, sharded: bool) -> Callable[[redis.Redis], None]:
        def call(node: redis.Redis) -> None:
            pipe = node.pipeline(transaction=False)
            self._queue(pipe, plan)
            pipe.execute()

        return call

    # -- reads -----------------------------------------------------------------------------

    def read_snapshot(
        self, keys: Sequence[Key]
    ) -> tuple[dict[Key, list[tuple[int, Bucket]]], dict[Key, LatestPrice], dict[Key, KeyMeta]]:
        """Every key's whole window, latest price and meta, in one pipelined round per node
        (a mirror's full read). Raises when any node cannot answer: a mirror never takes a
        part of the state for the whole."""
        commands: list[tuple[str, Command]] = []
        for key in keys:
            window, latest, meta = self.window_key(key), self.latest_key(key), self.meta_key(key)
            commands += [
                (window, ("ZRANGEBYSCORE", window, 0, "+inf")),
                (latest, ("HGETALL", latest)),
                (meta, ("HGETALL", meta)),
            ]
        replies = iter(self._batch(commands))
        windows: dict[Key, list[tuple[int, Bucket]]] = {}
        prices: dict[Key, LatestPrice] = {}
        metas: dict[Key, KeyMeta] = {}
        for key in keys:
            members, fields, found = next(replies), next(replies), next(replies)
            decoded = _decode_window(members)
            if decoded:
                windows[key] = decoded
            price = _decode_latest(key, fields)
            if price is not None:
                prices[key] = price
            key_meta = meta_from_fields(key, found)
            if key_meta is not None:
                metas[key] = key_meta
        return windows, prices, metas

    def read_windows(
        self, keys: Sequence[Key], since_s: int
    ) -> dict[Key, list[tuple[int, Bucket]]]:
        names = [self.window_key(key) for key in keys]
        replies = self._batch([(n, ("ZRANGEBYSCORE", n, since_s, "+inf")) for n in names])
        out: dict[Key, list[tuple[int, Bucket]]] = {}
        for key, members in zip(keys, replies, strict=True):
            decoded = _decode_window(members)
            if decoded:
                out[key] = decoded
        return out

    def read_latest(self, keys: Sequence[Key]) -> dict[Key, LatestPrice]:
        names = [self.latest_key(key) for key in keys]
        replies = self._batch([(n, ("HGETALL", n)) for n in names])
        out: dict[Key, LatestPrice] = {}
        for key, fields in zip(keys, replies, strict=True):
            price = _decode_latest(key, fields)
            if price is not None:
                out[key] = price
        return out

    # -- leases (contract: roles) ------------------------------------------------------------

    def lease_key(self, source: str) -> str:
        return f"{self.prefix}lease:{{{source}}}"

    def epoch_key(self, source: str) -> str:
        """Shares the lease's `{SOURCE}` hash tag: one slot, one node for both."""
        return f"{self.prefix}epoch:{{{source}}}"

    def acquire_lease(self, source: str, instance: str, ttl_ms: int) -> int | None:
        """Take `lease:{SOURCE}` if free (SET NX PX) and return a new epoch (INCR
        epoch:{SOURCE}); None when another instance holds it. A lease already ours is renewed
        and keeps no epoch: the caller already has one."""
        name = self.lease_key(source)
        if self._client.set(name, instance, nx=True, px=ttl_ms):
            return int(self._client.incr(self.epoch_key(source)))
        return None

    def renew_lease(self, source: str, instance: str, ttl_ms: int) -> bool:
        """Compare-and-renew: True while the lease is still ours."""
        return bool(self._client.eval(_RENEW, 1, self.lease_key(source), instance, ttl_ms))

    def release_lease(self, source: str, instance: str) -> None:
        """Compare-and-delete: never releases another instance's lease."""
        self._client.eval(_RELEASE, 1, self.lease_key(source), instance)

    def lease_holder(self, source: str) -> str | None:
        value = self._client.get(self.lease_key(source))
        return None if value is None else str(value)

    # -- shared mode, instance status, channels ---------------------------------------------

    def get_mode(self) -> str | None:
        value = self._client.get(f"{self.prefix}mode")
        return value if value in ("live", "test") else None

    def set_mode(self, mode: str, ttl_ms: int) -> None:
        """The shared mode lives as long as ingesting processes refresh it (`keep_mode`): with
        none left, the next start uses its own configured mode (the mode is not persisted)."""
        self._client.set(f"{self.prefix}mode", mode, px=ttl_ms)

    def keep_mode(self, mode: str, ttl_ms: int) -> str:
        """Refresh the shared mode's TTL, setting it to `mode` when it is gone; returns it."""
        name = f"{self.prefix}mode"
        replies = self._batch(
            [
                (name, ("SET", name, mode, "PX", ttl_ms, "NX")),
                (name, ("PEXPIRE", name, ttl_ms)),
                (name, ("GET", name)),
            ]
        )
        value = replies[-1]
        return str(value) if value is not None else mode

    def write_status(self, instance: str, body: bytes, ttl_ms: int) -> None:
        self._client.set(f"{self.prefix}status:{instance}", body, px=ttl_ms)

    def read_statuses(self) -> list[bytes]:
        """Every live instance's status (JSON bytes as written). In a cluster, from every master
        that answers: an instance whose status sits on a dead master is not seen meanwhile."""
        pattern = f"{self.prefix}status:*"
        if self._single is not None:
            names = list(self._single.scan_iter(match=pattern, count=1000))
            values = self._single.mget(names) if names else []
        else:
            found = self._on_primaries(functools.partial(_scan_values, pattern=pattern))
            if not found:
                self._each_primary(lambda node, name: node.ping())  # raises, naming each
            values = [v for node_values in found.values() for v in node_values]
        return [v.encode() if isinstance(v, str) else v for v in values if v]

    def publish(self, channel: str, body: bytes) -> int:
        if self.sharded():
            return int(self._client.execute_command("SPUBLISH", channel, body))
        return int(self._client.publish(channel, body))

    def subscribe(self, *channels: str) -> Subscription:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        if self.sharded():
            pubsub.ssubscribe(*channels)
            return Subscription(pubsub, read_timeout_s=self.timeout_s, sharded=True)
        pubsub.subscribe(*channels)
        return Subscription(pubsub, read_timeout_s=self.timeout_s)

    # -- health ----------------------------------------------------------------------------

    def ping(self) -> float:
        """Round trip in ms; in a cluster every primary must answer (the error names each
        node that does not)."""
        started = time.perf_counter()
        if self._single is not None:
            self._single.ping()
        else:
            self._each_primary(lambda node, name: node.ping())
        return (time.perf_counter() - started) * 1000

    def probe_write(self) -> float:
        """A write Redis must take (a short-lived key): a read-only replica or an out-of-memory
        server answers PING but refuses this. In a cluster, one such key on every primary.
        Returns the round trip in ms."""
        started = time.perf_counter()
        if self._single is not None:
            self._single.set(f"{self.prefix}health:probe", "1", px=5000)
        else:
            self._each_primary(lambda node, name: node.set(self._probe_key(name), "1", px=5000))
        return (time.perf_counter() - started) * 1000

    def _each_primary(self, call: Callable[..., object]) -> None:
        """`call(node_client, name=node)` on every primary; raises naming each that failed."""
        client = self._cluster_client()
        names = [str(node.name) for node in client.get_primaries()]
        results = self._on_nodes({name: functools.partial(call, name=name) for name in names})
        errors = {n: r for n, r in results.items() if isinstance(r, BaseException)}
        if errors:
            raise NodeError(errors)

    def _probe_key(self, node: str) -> str:
        """A probe key whose slot `node` serves (found once per node; again if it moved)."""
        client = self._cluster_client()
        name = self._probe_keys.get(node)
        if name is not None and client.get_node_from_key(name).name == node:
            return name
        for i in range(100_000):
            name = f"{self.prefix}health:probe:{{{i}}}"
            if client.get_node_from_key(name).name == node:
                self._probe_keys[node] = name
                return name
        raise redis.exceptions.ConnectionError(f"redis node {node} serves no slot")

    def close(self) -> None:
        if self._single is not None:
            self._single.close()
        if self._cluster is not None:
            self._cluster.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _scan_values(node: redis.Redis, pattern: str) -> list[Any]:
    """The values of one node's keys matching `pattern` (one GET each, pipelined: its keys sit
    on different slots, which MGET refuses)."""
    names = list(node.scan_iter(match=pattern, count=1000))
    pipe = node.pipeline(transaction=False)
    for name in names:
        pipe.get(name)
    return list(pipe.execute()) if names else []


def _ping(node: redis.Redis) -> object:
    return node.ping()


def _decode_window(members: Iterable[str]) -> list[tuple[int, Bucket]]:
    decoded = []
    for member in members:
        try:
            decoded.append(decode_bucket(member))
        except ValueError:
            continue  # not ours: never let a foreign member break a restore
    return decoded


def _decode_latest(key: Key, fields: dict[str, str]) -> LatestPrice | None:
    try:
        return LatestPrice(key[0], key[1], float(fields["price"]), int(fields["ts"]))
    except (KeyError, ValueError):
        return None


class Subscription:
    """A subscription on its own connection (blocking; one reader thread at a time): plain
    pub/sub, or sharded pub/sub (SSUBSCRIBE) on the node holding the channel's slot."""

    def __init__(self, pubsub: Any, *, read_timeout_s: float, sharded: bool = False) -> None:
        self._pubsub = pubsub
        self._read_timeout_s = read_timeout_s
        self._sharded = sharded

    def _next(self, timeout_s: float) -> Any:
        if self._sharded:
            return self._pubsub.get_sharded_message(timeout=timeout_s)
        return self._pubsub.get_message(timeout=timeout_s)

    def _waiting(self) -> bool:
        """Whether more bytes already wait on the subscription's connection(s)."""
        if self._sharded:
            pubsubs = list(self._pubsub.node_pubsub_mapping.values())
        else:
            pubsubs = [self._pubsub]
        return any(
            p.connection is not None and bool(p.connection.can_read(timeout=0)) for p in pubsubs
        )

    def drain(self, timeout_s: float) -> list[bytes]:
        """Wait up to `timeout_s` for a message, then take every one already there.

        A further message is read only once its first bytes are there, and then whole, with the
        connection's own timeout: redis-py reads with the timeout it is given, and with 0 it
        gave up on a large message (an `updates` of a thousand keys is ~200 kB) whose rest was
        still on its way, which cost the mirror its subscription."""
        out: list[bytes] = []
        message = self._next(timeout_s)
        while message is not None:
            if message.get("type") in ("message", "smessage"):
                data = message["data"]
                out.append(data.encode() if isinstance(data, str) else data)
            if not self._waiting():
                break
            message = self._next(self._read_timeout_s)
        return out

    def close(self) -> None:
        self._pubsub.close()
