"""Redis adapter (contract: Redis): latest prices and per-second windows, one pipeline per flush.

Blocking: the core calls it through `trio.to_thread`. Timeouts are short and retries off, so a
dead Redis costs one `timeout_ms`, not a library's retry storm.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from marketflow.config import RedisConfig
from marketflow.live import KeyMeta, meta_fields, meta_from_fields
from marketflow.models import Bucket, Key, LatestPrice, decode_bucket, encode_bucket
from marketflow.ports import FlushPlan

_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)


class RedisPriceStore:
    """Owns one redis-py client (its own small connection pool)."""

    def __init__(self, config: RedisConfig, *, window_seconds: int, ttl_seconds: int) -> None:
        timeout = config.timeout_ms / 1000
        self._client = redis.Redis(
            host=config.host,
            port=config.port,
            db=config.db,
            password=config.password or None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=True,
        )
        self.timeout_s = timeout
        self.prefix = config.key_prefix
        self.window_seconds = window_seconds
        self.ttl_seconds = ttl_seconds

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

    def write(self, plan: FlushPlan) -> None:
        pipe = self._client.pipeline(transaction=False)
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
            pipe.hset(name, mapping=meta_fields(meta))  # type: ignore[arg-type]
        for key in {*plan.touched, *((m.source, m.symbol) for m in plan.meta)}:
            pipe.expire(self.meta_key(key), self.window_seconds + 10)
        if plan.message is not None:
            pipe.publish(self.updates_channel, plan.message)
        pipe.execute()

    def read_snapshot(
        self, keys: Sequence[Key]
    ) -> tuple[dict[Key, list[tuple[int, Bucket]]], dict[Key, LatestPrice], dict[Key, KeyMeta]]:
        """Every key's whole window, latest price and meta, in one pipelined round (a mirror's
        full read)."""
        windows = self.read_windows(keys, 0)
        latest = self.read_latest(keys)
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.meta_key(key))
        metas: dict[Key, KeyMeta] = {}
        for key, fields in zip(keys, pipe.execute(), strict=True):
            meta = meta_from_fields(key, fields)
            if meta is not None:
                metas[key] = meta
        return windows, latest, metas

    # -- leases (contract: roles) ------------------------------------------------------------

    def lease_key(self, source: str) -> str:
        return f"{self.prefix}lease:{{{source}}}"

    def acquire_lease(self, source: str, instance: str, ttl_ms: int) -> int | None:
        """Take `lease:{SOURCE}` if free (SET NX PX) and return a new epoch (INCR
        epoch:{SOURCE}); None when another instance holds it. A lease already ours is renewed
        and keeps no epoch: the caller already has one."""
        name = self.lease_key(source)
        if self._client.set(name, instance, nx=True, px=ttl_ms):
            return int(self._client.incr(f"{self.prefix}epoch:{{{source}}}"))
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
        pipe = self._client.pipeline(transaction=False)
        pipe.set(name, mode, px=ttl_ms, nx=True)
        pipe.pexpire(name, ttl_ms)
        pipe.get(name)
        value = pipe.execute()[-1]
        return str(value) if value is not None else mode

    def write_status(self, instance: str, body: bytes, ttl_ms: int) -> None:
        self._client.set(f"{self.prefix}status:{instance}", body, px=ttl_ms)

    def read_statuses(self) -> list[bytes]:
        """Every live instance's status (JSON bytes as written)."""
        names = list(self._client.scan_iter(match=f"{self.prefix}status:*", count=1000))
        if not names:
            return []
        values = self._client.mget(names)
        return [v.encode() if isinstance(v, str) else v for v in values if v]

    def publish(self, channel: str, body: bytes) -> int:
        return int(self._client.publish(channel, body))

    def subscribe(self, *channels: str) -> Subscription:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(*channels)
        return Subscription(pubsub, read_timeout_s=self.timeout_s)

    def read_windows(
        self, keys: Sequence[Key], since_s: int
    ) -> dict[Key, list[tuple[int, Bucket]]]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.zrangebyscore(self.window_key(key), since_s, "+inf")
        out: dict[Key, list[tuple[int, Bucket]]] = {}
        for key, members in zip(keys, pipe.execute(), strict=True):
            decoded = []
            for member in members:
                try:
                    decoded.append(decode_bucket(member))
                except ValueError:
                    continue  # not ours: never let a foreign member break a restore
            if decoded:
                out[key] = decoded
        return out

    def read_latest(self, keys: Sequence[Key]) -> dict[Key, LatestPrice]:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.latest_key(key))
        out: dict[Key, LatestPrice] = {}
        for key, fields in zip(keys, pipe.execute(), strict=True):
            try:
                out[key] = LatestPrice(key[0], key[1], float(fields["price"]), int(fields["ts"]))
            except (KeyError, ValueError):
                continue
        return out

    def ping(self) -> float:
        started = time.perf_counter()
        self._client.ping()
        return (time.perf_counter() - started) * 1000

    def probe_write(self) -> float:
        """A write Redis must take (a short-lived key): a read-only replica or an out-of-memory
        server answers PING but refuses this. Returns the round trip in ms."""
        started = time.perf_counter()
        self._client.set(f"{self.prefix}health:probe", "1", px=5000)
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self._client.close()


class Subscription:
    """A subscription on its own connection (blocking; one reader thread at a time)."""

    def __init__(self, pubsub: Any, *, read_timeout_s: float) -> None:
        self._pubsub = pubsub
        self._read_timeout_s = read_timeout_s

    def _waiting(self) -> bool:
        """Whether more bytes already wait on the connection."""
        connection = self._pubsub.connection
        return connection is not None and bool(connection.can_read(timeout=0))

    def drain(self, timeout_s: float) -> list[bytes]:
        """Wait up to `timeout_s` for a message, then take every one already there.

        A further message is read only once its first bytes are there, and then whole, with the
        connection's own timeout: redis-py reads with the timeout it is given, and with 0 it
        gave up on a large message (an `updates` of a thousand keys is ~200 kB) whose rest was
        still on its way, which cost the mirror its subscription."""
        out: list[bytes] = []
        message = self._pubsub.get_message(timeout=timeout_s)
        while message is not None:
            if message.get("type") in ("message", "smessage"):
                data = message["data"]
                out.append(data.encode() if isinstance(data, str) else data)
            if not self._waiting():
                break
            message = self._pubsub.get_message(timeout=self._read_timeout_s)
        return out

    def close(self) -> None:
        self._pubsub.close()
