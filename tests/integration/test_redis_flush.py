"""The Redis flusher against real Redis servers: exact buckets, TTLs, trimming, outages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.state import MarketState
from marketflow.store.redis import RedisPriceStore
from tests.procs import RedisServer, redis_prefix, wait_for

NOW_S = 1_795_646_460  # a minute start
NOW_MS = NOW_S * 1000


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


def make(prefix: str, port: int = 6379) -> tuple[MarketState, RedisFlusher, redis.Redis]:
    state = MarketState(window_seconds=300)
    store = RedisPriceStore(
        RedisConfig(port=port, key_prefix=prefix, timeout_ms=300),
        window_seconds=300,
        ttl_seconds=70,
    )
    flusher = RedisFlusher(
        state, store, StoreHealth("redis"), Metrics(), interval_s=0.1, clock=lambda: NOW_S
    )
    return state, flusher, redis.Redis(port=port, decode_responses=True)


Member = tuple[int, int, float, float, float, float, float]


def members(r: redis.Redis, key: str) -> list[Member]:
    """The window's members without their tick times (`members_with_times` has them)."""
    return [m[:7] for m in members_with_times(r, key)]  # type: ignore[misc]


def members_with_times(r: redis.Redis, key: str) -> list[tuple[Member | int, ...]]:
    out: list[tuple[Member | int, ...]] = []
    for m in r.zrange(key, 0, -1):
        s, c, total, lo, hi, first, last, first_ms, last_ms = m.split("|")
        out.append(
            (
                int(s),
                int(c),
                float(total),
                float(lo),
                float(hi),
                float(first),
                float(last),
                int(first_ms),
                int(last_ms),
            )
        )
    return out


async def test_exact_bucket_contents_latest_and_ttls(prefix: str) -> None:
    state, flusher, r = make(prefix)
    ticks = [
        ("BTCUSDT", 10.5, NOW_MS - 2000 + 300),
        ("BTCUSDT", 9.25, NOW_MS - 2000 + 100),  # earlier timestamp: the second's first
        ("BTCUSDT", 11.0, NOW_MS - 2000 + 900),
        ("BTCUSDT", 0.1, NOW_MS - 1000 + 5),
        ("BTCUSDT", 0.2, NOW_MS - 1000 + 5),  # same timestamp: the later arrival is last
    ]
    state.key("ex1", "BTCUSDT").fold(ticks)
    assert await flusher.flush()
    window = f"{prefix}window:{{ex1:BTCUSDT}}"
    assert members(r, window) == [
        (NOW_S - 2, 3, 30.75, 9.25, 11.0, 9.25, 11.0),
        (NOW_S - 1, 2, 0.1 + 0.2, 0.1, 0.2, 0.1, 0.2),
    ]
    # The first and last tick's own times, to the millisecond (not the second's bounds).
    assert [m[7:] for m in members_with_times(r, window)] == [
        (NOW_MS - 2000 + 100, NOW_MS - 2000 + 900),
        (NOW_MS - 1000 + 5, NOW_MS - 1000 + 5),
    ]
    assert r.zrange(window, 0, -1, withscores=True)[0][1] == NOW_S - 2
    assert "|0.30000000000000004|" in r.zrange(window, 1, 1)[0]  # shortest round-trip repr
    latest = r.hgetall(f"{prefix}latest:{{ex1:BTCUSDT}}")
    assert latest == {"price": "0.2", "ts": str(NOW_MS - 1000 + 5)}
    assert 60 < r.ttl(f"{prefix}latest:{{ex1:BTCUSDT}}") <= 70
    assert 300 < r.ttl(window) <= 310
    # A second flush rewrites only the changed second, replacing its member.
    state.key("ex1", "BTCUSDT").fold([("BTCUSDT", 12.0, NOW_MS - 2000 + 950)])
    assert await flusher.flush()
    assert members(r, window)[0] == (NOW_S - 2, 4, 42.75, 9.25, 12.0, 9.25, 12.0)
    assert len(members(r, window)) == 2
    r.close()


async def test_windows_are_trimmed_to_window_seconds(prefix: str) -> None:
    state, flusher, r = make(prefix)
    state.key("ex1", "ETHUSDT").fold(
        [("ETHUSDT", 1.0, NOW_MS - 299_000), ("ETHUSDT", 2.0, NOW_MS - 1000)]
    )
    assert await flusher.flush()
    window = f"{prefix}window:{{ex1:ETHUSDT}}"
    assert [m[0] for m in members(r, window)] == [NOW_S - 299, NOW_S - 1]
    flusher.clock = lambda: NOW_S + 10  # time passes: the older second leaves the window
    state.key("ex1", "ETHUSDT").fold([("ETHUSDT", 3.0, NOW_MS + 9000)])
    assert await flusher.flush()
    assert [m[0] for m in members(r, window)] == [NOW_S - 1, NOW_S + 9]
    r.close()


async def test_redis_stopped_and_restarted_keys_rewritten() -> None:
    server = RedisServer()
    try:
        state, flusher, r = make("", server.port)
        state.key("ex1", "BTCUSDT").fold([("BTCUSDT", 1.0, NOW_MS - 5000)])
        state.key("ex2", "SOLUSDT").fold([("SOLUSDT", 7.0, NOW_MS - 4000)])  # goes quiet after
        assert await flusher.flush()
        port = server.port
        server.kill()
        server.close()
        state.key("ex1", "BTCUSDT").fold([("BTCUSDT", 2.0, NOW_MS - 3000)])
        assert not await flusher.flush(force=True)  # no crash: the state waits in memory
        assert not flusher.health.up and flusher.health.error
        server = RedisServer(port)  # back, and empty
        state.key("ex1", "BTCUSDT").fold([("BTCUSDT", 3.0, NOW_MS - 2000)])
        assert await flusher.flush(force=True)
        assert flusher.health.up
        assert [m[1] for m in members(r, "window:{ex1:BTCUSDT}")] == [1, 1, 1]
        assert members(r, "window:{ex2:SOLUSDT}") == [(NOW_S - 4, 1, 7.0, 7.0, 7.0, 7.0, 7.0)]
        assert r.hget("latest:{ex2:SOLUSDT}", "price") == "7.0"
        assert r.hget("latest:{ex1:BTCUSDT}", "price") == "3.0"
        r.close()
    finally:
        server.close()


async def test_windows_keep_whole_minutes_from_the_horizon(prefix: str) -> None:
    """Memory holds whole minutes from its horizon, which may begin before now-window_seconds:
    the window keeps those seconds too, so a mirror's full read sees whole minutes (a 1m answer
    from the mirror counts the edge minute like the ingesting process does)."""
    state, flusher, r = make(prefix)
    st = state.key("ex1", "SOLUSDT")
    horizon = (NOW_S - 330) // 60 * 60  # a minute start before now - 300 s
    st.horizon_s = horizon
    st.fold([("SOLUSDT", 1.0, (horizon + 2) * 1000), ("SOLUSDT", 2.0, (NOW_S - 1) * 1000)])
    assert await flusher.flush()
    window = f"{prefix}window:{{ex1:SOLUSDT}}"
    assert [m[0] for m in members(r, window)] == [horizon + 2, NOW_S - 1]
    r.close()


def test_the_shared_mode_lives_only_while_it_is_kept(prefix: str) -> None:
    store = RedisPriceStore(RedisConfig(key_prefix=prefix), window_seconds=300, ttl_seconds=70)
    r = redis.Redis(decode_responses=True)
    assert store.get_mode() is None
    assert store.keep_mode("live", 10_000) == "live"  # absent: set to ours
    assert store.keep_mode("test", 10_000) == "live"  # present: kept, not overwritten
    assert 0 < r.pttl(f"{prefix}mode") <= 10_000
    store.set_mode("test", 50)
    wait_for(lambda: store.get_mode() is None, 5, "the mode expired with nobody keeping it")
    r.close()
    store.close()
