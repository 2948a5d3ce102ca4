"""The API against the real process: statistics equal the values computed by hand from the ticks
sent, bad input is a JSON 4xx, store outages, and mode switches under load."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.conftest import Factory
from tests.procs import RedisServer, ScriptedFeed, Simulator, TcpProxy, live_config, wait_for

MINUTE = 60_000
Tick = tuple[str, float, int]


@pytest.fixture
def feeds() -> Iterator[list[ScriptedFeed]]:
    made = [ScriptedFeed() for _ in range(3)]
    yield made
    for f in made:
        f.close()


live = live_config


def by_hand(ticks: list[tuple[str, Tick]], bucket_ms: int) -> dict[str, Any]:
    """count, tick-weighted average, and extremes with the start of their bucket and source."""
    prices = [p for _, (_, p, _) in ticks]
    high = max(ticks, key=lambda t: (t[1][1], -t[1][2]))
    low = min(ticks, key=lambda t: (t[1][1], t[1][2]))
    return {
        "count": len(prices),
        "average": sum(prices) / len(prices),
        "highest": (high[1][1], high[1][2] // bucket_ms * bucket_ms, high[0]),
        "lowest": (low[1][1], low[1][2] // bucket_ms * bucket_ms, low[0]),
    }


def check(mf: Any, path: str, want: dict[str, Any], resolution: str) -> None:
    for stat in ("highest", "lowest", "average"):
        response = mf.get(path.format(stat=stat))
        assert response.status_code == 200, (path, stat, response.text)
        body = response.json()
        assert body["stat"] == stat and body["resolution"] == resolution, body
        assert body["count"] == want["count"], (path, stat, body, want)
        if stat == "average":
            assert body["price"] == pytest.approx(want["average"], rel=1e-12)
        else:
            price, at, exchange = want[stat]
            assert (body["price"], body["at"], body["at_exchange"]) == (price, at, exchange), (
                path,
                body,
                want,
            )


def test_statistics_equal_hand_computed_values_from_buckets_and_from_postgres(
    marketflow: Factory, feeds: list[ScriptedFeed], prefix: str
) -> None:
    # Run 1 (window 300 s) writes four past minutes to PostgreSQL and stops.
    first = marketflow(live(feeds))
    for f in feeds:
        f.wait_client()
    m = int(time.time() * 1000) // MINUTE * MINUTE
    old: dict[str, list[Tick]] = {
        "exchange1": [("BTCUSDT", 100.0 + i, m - 4 * MINUTE + i * 13_000) for i in range(5)],
        "exchange2": [("BTCUSDT", 90.0 + 3 * i, m - 3 * MINUTE + i * 11_000) for i in range(4)],
        "exchange3": [
            ("BTCUSDT", 120.5, m - 2 * MINUTE + 1000),
            ("BTCUSDT", 80.25, m - 4 * MINUTE),
        ],
    }
    for i, f in enumerate(feeds):
        f.send(old[f"exchange{i + 1}"])
    total_old = sum(len(v) for v in old.values())
    wait_for(lambda: first.health()["pipeline"]["updates_total"] == total_old, 10, "old folded")
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    for f in feeds:
        f.close_clients()
    # Run 2 holds a 120 s window: whole minutes from one starting 60-120 s ago, so the recent
    # ticks (up to 20 s old) are held and the old minutes are answered from PostgreSQL.
    mf = marketflow(live(feeds, window_seconds=120))
    for f in feeds:
        f.wait_client()
    now = int(time.time() * 1000)
    recent: dict[str, list[Tick]] = {
        "exchange1": [("BTCUSDT", 101.5, now - 9000), ("BTCUSDT", 99.5, now - 3000)],
        "exchange2": [("BTCUSDT", 130.0, now - 5000), ("ETHUSDT", 3000.0, now - 5000)],
        "exchange3": [("BTCUSDT", 70.0, now - 20_000)],
    }
    for i, f in enumerate(feeds):
        f.send(recent[f"exchange{i + 1}"])
    total_recent = sum(len(v) for v in recent.values())
    wait_for(lambda: mf.health()["pipeline"]["updates_total"] == total_recent, 10, "recent folded")

    def btc(source: str, which: dict[str, list[Tick]]) -> list[tuple[str, Tick]]:
        return [(source, t) for t in which[source] if t[0] == "BTCUSDT"]

    # 30 s: per-second buckets in memory.
    for source in ("exchange1", "exchange2"):
        want = by_hand(btc(source, recent), 1000)
        check(mf, f"/prices/{{stat}}/{source}/BTCUSDT?period=30s", want, "1s")
    everyone = [t for s in ("exchange1", "exchange2", "exchange3") for t in btc(s, recent)]
    check(mf, "/prices/{stat}/BTCUSDT?period=30s", by_hand(everyone, 1000), "1s")
    # 10 min: PostgreSQL's written minutes plus memory's, the current partial minute included.
    for source in ("exchange1", "exchange2", "exchange3"):
        want = by_hand(btc(source, old) + btc(source, recent), MINUTE)
        check(mf, f"/prices/{{stat}}/{source}/BTCUSDT?period=10m", want, "1m")
    everything = everyone + [
        t for s in ("exchange1", "exchange2", "exchange3") for t in btc(s, old)
    ]
    check(mf, "/prices/{stat}/BTCUSDT?period=10m", by_hand(everything, MINUTE), "1m")
    check(mf, "/prices/{stat}/BTCUSDT", by_hand(everything, MINUTE), "1m")  # all history
    body = mf.get("/prices/average/BTCUSDT").json()
    assert body["period"] == "all" and body["exchange"] == "all"
    # Latest: the freshest timestamp across the mode's sources, each source listed.
    latest = mf.get("/prices/latest/BTCUSDT").json()
    assert (latest["exchange"], latest["price"], latest["timestamp"]) == (
        "exchange1",
        99.5,
        now - 3000,
    )
    assert {s["exchange"]: s["price"] for s in latest["sources"]} == {
        "exchange1": 99.5,
        "exchange2": 130.0,
        "exchange3": 70.0,
    }
    one = mf.get("/prices/latest/exchange2/ETHUSDT").json()
    assert one["price"] == 3000.0 and one["timestamp"] == now - 5000
    assert one["time"].endswith("Z")


BAD = [
    ("GET", "/prices/latest/BTC-USDT", 400),
    ("GET", "/prices/latest/NOPEUSDT", 404),
    ("GET", "/prices/latest/nosuchexchange/BTCUSDT", 404),
    ("GET", "/prices/latest/bad%20name/BTCUSDT", 400),
    ("GET", "/prices/highest/BTCUSDT?period=abc", 400),
    ("GET", "/prices/highest/BTCUSDT?period=-1m", 400),
    ("GET", "/prices/highest/BTCUSDT?period=0s", 400),
    ("GET", "/prices/highest/BTCUSDT?period=1.5m", 400),
    ("GET", "/prices/highest/BTCUSDT?period=10y", 400),
    ("GET", "/prices/average/BTCUSDT?period=99999999999d", 400),
    ("GET", "/prices/average/BTCUSDT?period=", 400),
    ("GET", "/prices/average/BTCUSDT?period=1m&period=2m", 400),
    ("GET", "/prices/latest/..%2F..%2Fetc%2Fpasswd", 404),
    ("GET", "/prices/latest/../../etc/passwd", 404),
    ("GET", "/prices/latest/" + "A" * 5000, 400),
    ("GET", "/nowhere", 404),
    ("POST", "/prices/latest/BTCUSDT", 405),
    ("DELETE", "/mode", 405),
    ("GET", "/mode/test", 405),
    ("POST", "/mode/paper", 404),
]


def test_bad_input_gets_a_json_4xx_and_ingest_goes_on(marketflow: Factory) -> None:
    mf = marketflow()
    wait_for(lambda: mf.health()["pipeline"]["updates_total"] > 0, 10, "ingesting")
    for method, path, status in BAD:
        response = mf.client.request(method, path)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert isinstance(response.json()["error"], str) and response.json()["error"]
        assert response.headers.get("X-Request-ID")
    before = mf.health()["pipeline"]["updates_total"]
    wait_for(lambda: mf.health()["pipeline"]["updates_total"] > before, 5, "still ingesting")


def test_redis_stopped_answers_from_memory_and_health_degrades(
    marketflow: Factory, tmp_path: Any
) -> None:
    server = RedisServer()
    try:
        mf = marketflow({"redis": {"port": server.port}})
        wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
        server.kill()
        wait_for(lambda: mf.health()["redis"]["status"] == "down", 3, "redis down within 2 s")
        assert mf.get("/health").status_code == 503
        assert mf.health()["status"] == "degraded"
        assert mf.get("/prices/latest/BTCUSDT").status_code == 200
        before = mf.get("/prices/average/test-exchange1/BTCUSDT?period=30s").json()["count"]
        wait_for(
            lambda: (
                mf.get("/prices/average/test-exchange1/BTCUSDT?period=30s").json()["count"] > before
            ),
            5,
            "short periods keep growing from memory",
        )
    finally:
        server.close()


def test_postgres_cut_long_periods_503_the_rest_works(marketflow: Factory) -> None:
    proxy = TcpProxy(5432)
    try:
        mf = marketflow({"postgres": {"port": proxy.port}})
        wait_for(lambda: mf.health()["status"] == "ok", 10, "healthy")
        proxy.cut()
        wait_for(lambda: mf.health()["postgres"]["status"] == "down", 3, "postgres down in 2 s")
        response = mf.get("/prices/highest/BTCUSDT?period=1d")
        assert response.status_code == 503, response.text
        assert "postgres" in response.json()["error"].lower()
        assert mf.get("/prices/highest/BTCUSDT?period=1m").status_code == 200
        assert mf.get("/prices/latest/test-exchange2/SOLUSDT").status_code == 200
        proxy.restore()
        wait_for(
            lambda: mf.get("/prices/highest/BTCUSDT?period=1d").status_code == 200,
            10,
            "long periods back",
        )
    finally:
        proxy.close()


def test_mode_switch_under_load_loses_nothing_already_read(
    marketflow: Factory, prefix: str
) -> None:
    sims = Simulator(2, seed=9)
    feed = ScriptedFeed()
    try:
        mf = marketflow(
            {
                "exchanges": [
                    {"name": "exchange1", "host": "127.0.0.1", "port": feed.port},
                    {"name": "exchange2", "host": "127.0.0.1", "port": sims.ports[0]},
                    {"name": "exchange3", "host": "127.0.0.1", "port": sims.ports[1]},
                ],
                "app": {"mode": "live"},
            }
        )
        feed.wait_client()
        now = int(time.time() * 1000)
        burst = [("BTCUSDT", 100.0 + (i % 7), now - (i % 5000)) for i in range(100_000)]
        feed.send(burst)
        switched = mf.client.post("/mode/test").json()
        assert switched["changed"] is True and switched["previous"] == "live"
        assert switched["sources"] == ["test-exchange1", "test-exchange2", "test-exchange3"]
        again = mf.client.post("/mode/test").json()
        assert again["changed"] is False and again["mode"] == "test"
        assert mf.get("/mode").json()["mode"] == "test"
        read = mf.health()["sources"]["exchange1"]["messages"]
        assert read > 0
        r = redis.Redis(decode_responses=True)

        def stored() -> int:
            window = f"{prefix}window:{{exchange1:BTCUSDT}}"
            return sum(int(m.split("|")[1]) for m in r.zrange(window, 0, -1))

        wait_for(lambda: stored() == read, 10, f"all {read} ticks read before the switch stored")
        r.close()
        latest = wait_for(
            lambda: (
                (b := mf.get("/prices/latest/BTCUSDT").json()).get("sources")
                and {s["exchange"] for s in b["sources"]} == set(switched["sources"])
                and b
            ),
            5,
            "test sources answer",
        )
        assert latest["exchange"].startswith("test-")
        assert mf.get("/prices/latest/exchange2/BTCUSDT").status_code == 200  # still retained
    finally:
        feed.close()
        sims.close()


def test_a_hundred_concurrent_switches_leave_one_consistent_mode(marketflow: Factory) -> None:
    mf = marketflow()

    def switch(i: int) -> dict[str, Any]:
        with httpx.Client(base_url=mf.url, timeout=20) as c:
            return dict(c.post(f"/mode/{'live' if i % 2 else 'test'}").json())

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(switch, range(100)))
    assert all(a["mode"] in ("live", "test") for a in answers)
    final = mf.get("/mode").json()
    expected = {
        "test": ["test-exchange1", "test-exchange2", "test-exchange3"],
        "live": ["exchange1", "exchange2", "exchange3"],
    }
    assert final["sources"] == expected[final["mode"]]
    changed = [a for a in answers if a["changed"]]
    for a in changed:
        assert a["previous"] != a["mode"]
    # Each change flips the mode, starting from test: the count's parity gives the final mode.
    assert final["mode"] == ("live" if len(changed) % 2 else "test")
    health = mf.health()
    assert health["mode"] == final["mode"]
    other = "live" if final["mode"] == "test" else "test"
    wait_for(
        lambda: all(mf.health()["sources"][s]["status"] == "disconnected" for s in expected[other]),
        5,
        "the other mode's sources stopped",
    )
