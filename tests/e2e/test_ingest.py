"""End to end: real simulators -> the real marketflow process -> the real local Redis."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.conftest import Factory
from tests.procs import Simulator, wait_for

SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


def exchanges(ports: list[int]) -> list[dict[str, object]]:
    return [
        {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)
    ]


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    client = redis.Redis(decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    sim = Simulator(3, seed=7)
    yield sim
    sim.close()


def latest_ts(r: redis.Redis, prefix: str, source: str, symbol: str) -> int:
    value = r.hget(f"{prefix}latest:{{{source}:{symbol}}}", "ts")
    return int(value) if value else 0


def test_live_mode_fills_all_15_series_within_2s(
    marketflow: Factory, simulator: Simulator, prefix: str, r: redis.Redis
) -> None:
    mf = marketflow({"exchanges": exchanges(simulator.ports), "app": {"mode": "live"}})
    started = time.monotonic()

    def all_series() -> bool:
        return all(
            latest_ts(r, prefix, f"exchange{i}", s)
            and r.zcard(f"{prefix}window:{{exchange{i}:{s}}}")
            for i in (1, 2, 3)
            for s in SYMBOLS
        )

    wait_for(all_series, 2.0, "15 series in Redis")
    assert time.monotonic() - started < 2.0
    ttl = r.ttl(f"{prefix}latest:{{exchange1:BTCUSDT}}")
    assert 0 < ttl <= 70
    wttl = r.ttl(f"{prefix}window:{{exchange1:BTCUSDT}}")
    assert 300 < wttl <= 310
    health = mf.health()
    assert health["status"] == "ok", health
    assert {health["sources"][f"exchange{i}"]["status"] for i in (1, 2, 3)} == {"connected"}


def test_killed_feed_reconnects_and_the_others_never_pause(
    marketflow: Factory, simulator: Simulator, prefix: str, r: redis.Redis
) -> None:
    solo = Simulator(1, seed=3)
    try:
        ports = [*simulator.ports[:2], solo.ports[0]]
        mf = marketflow(
            {"exchanges": exchanges(ports), "app": {"mode": "live", "reconnect_max_delay_s": 2}}
        )
        wait_for(lambda: latest_ts(r, prefix, "exchange3", "BTCUSDT"), 5, "exchange3 data")
        solo.kill()
        solo.close()
        wait_for(
            lambda: mf.health()["sources"]["exchange3"]["status"] != "connected",
            5,
            "exchange3 noticed as down",
        )
        assert mf.health()["status"] == "degraded"
        # While exchange3 is down, the other two keep arriving every ~100 ms.
        seen: list[int] = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen.append(latest_ts(r, prefix, "exchange1", "BTCUSDT"))
            time.sleep(0.1)
        gaps = [b - a for a, b in itertools.pairwise(seen) if b != a]
        assert len(set(seen)) >= 10, seen
        assert max(gaps) < 1000, gaps
        restarted = Simulator(ports=[ports[2]], seed=4)
        try:
            before = latest_ts(r, prefix, "exchange3", "BTCUSDT")
            wait_for(
                lambda: latest_ts(r, prefix, "exchange3", "BTCUSDT") > before,
                10,
                "exchange3 reconnected and writing",
            )
            health = mf.health()
            assert health["sources"]["exchange3"]["status"] == "connected"
            assert health["sources"]["exchange3"]["reconnects"] >= 1
            wait_for(lambda: mf.health()["status"] == "ok", 5, "health ok again")
        finally:
            restarted.close()
    finally:
        solo.close()


class GarbageFeed:
    """A feed that mixes good lines with every kind of bad one, on one connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.good = 0
        self.bad = {
            "malformed": 0,
            "too_long": 0,
            "bad_price": 0,
            "unknown_symbol": 0,
            "bad_timestamp": 0,
        }
        self.sent = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        self.connections += 1
        with conn:
            for i in range(40):
                now = int(time.time() * 1000)
                price = 100.0 + i
                lines = [
                    json.dumps({"symbol": "BTCUSDT", "price": price, "timestamp": now}),
                    "this is not json",
                    f'{{"symbol":"BTCUSDT","price":NaN,"timestamp":{now}}}',
                    json.dumps({"symbol": "BTCUSDT", "price": -5, "timestamp": now}),
                    json.dumps({"symbol": "NOPEUSDT", "price": 1.0, "timestamp": now}),
                    json.dumps({"symbol": "BTCUSDT", "price": "12", "timestamp": now}),
                    json.dumps({"symbol": "BTCUSDT", "price": 1.0, "timestamp": now - 10**7}),
                    "x" * 70_000,
                    json.dumps({"symbol": "ETHUSDT", "price": price, "timestamp": now}),
                ]
                self.good += 2
                for key, n in (
                    ("malformed", 2),
                    ("bad_price", 2),
                    ("unknown_symbol", 1),
                    ("bad_timestamp", 1),
                    ("too_long", 1),
                ):
                    self.bad[key] += n
                conn.sendall(("\n".join(lines) + "\n").encode())
                time.sleep(0.01)
            self.sent.set()
            # Keep the connection open: marketflow must not have dropped it.
            time.sleep(5)

    def close(self) -> None:
        self.sock.close()


def test_garbage_between_good_lines_is_counted_and_the_connection_stays(
    marketflow: Factory, simulator: Simulator, prefix: str, r: redis.Redis
) -> None:
    feed = GarbageFeed()
    try:
        ports = [feed.port, *simulator.ports[1:]]
        mf = marketflow({"exchanges": exchanges(ports), "app": {"mode": "live"}})
        assert feed.sent.wait(15)
        wanted = feed.bad

        def counted() -> dict[str, object] | None:
            src = mf.health()["sources"]["exchange1"]
            return src if src["rejected_by_reason"] == wanted else None

        src = wait_for(counted, 5, f"rejects counted as {wanted}")
        assert src["messages"] == feed.good
        assert src["status"] == "connected" and src["reconnects"] == 0
        assert feed.connections == 1

        def stored() -> int:
            total = 0
            for symbol in ("BTCUSDT", "ETHUSDT"):
                for member in r.zrange(f"{prefix}window:{{exchange1:{symbol}}}", 0, -1):
                    total += int(member.split("|")[1])
            return total

        wait_for(lambda: stored() == feed.good, 5, "every good line in Redis buckets")
        assert "feed line rejected" in mf.output
    finally:
        feed.close()


def test_sigterm_while_ingesting_exits_0_with_the_last_flush_in_redis(
    marketflow: Factory, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    sim = Simulator(3, rate=5000, seed=1)
    try:
        mf = marketflow({"exchanges": exchanges(sim.ports), "app": {"mode": "live"}})
        wait_for(lambda: mf.health()["pipeline"]["updates_total"] > 5000, 10, "ingesting")
        started = time.monotonic()
        mf.signal(signal.SIGTERM)
        assert mf.wait(10) == 0, mf.output
        assert time.monotonic() - started < 10
        assert "shutdown complete" in mf.output
        final = next(ln for ln in mf.lines if "shutdown complete" in ln)
        total = int(final.split("updates_total=")[1].split()[0])
        in_redis = 0
        for key in r.scan_iter(match=f"{prefix}window:*"):
            in_redis += sum(int(m.split("|")[1]) for m in r.zrange(key, 0, -1))
        assert in_redis == total  # every folded tick is in the last flush (window holds 300 s)
    finally:
        sim.close()


def test_a_silent_feed_is_reconnected_after_stale_after_s(
    marketflow: Factory, simulator: Simulator
) -> None:
    from tests.procs import ScriptedFeed

    silent = ScriptedFeed()
    try:
        ports = [silent.port, *simulator.ports[1:]]
        mf = marketflow(
            {"exchanges": exchanges(ports), "app": {"mode": "live", "stale_after_s": 1}}
        )
        silent.wait_client()
        assert mf.health()["sources"]["exchange1"]["status"] == "connected"  # silent, yet open
        wait_for(lambda: mf.health()["sources"]["exchange1"]["reconnects"] >= 1, 10, "stale seen")
        wait_for(lambda: len(silent.clients) >= 2, 10, "a new connection after the backoff")
        assert "stale" in mf.output
        assert mf.health()["sources"]["exchange2"]["reconnects"] == 0
    finally:
        silent.close()
