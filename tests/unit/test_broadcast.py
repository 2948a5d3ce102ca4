"""PriceHub: change detection, coalescing, shared frames, slow clients and shutdown."""

from __future__ import annotations

import itertools

import orjson
import pytest
import trio
import trio.testing

from marketflow.broadcast import CLOSE_GOING_AWAY, CLOSE_POLICY, Client, PriceHub
from marketflow.health import StoreHealth
from marketflow.minute_reader import MinuteReader
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
TEST = ["test-exchange1", "test-exchange2"]
LIVE = ["exchange1"]
INTERVAL = 0.1
MAX_LAG = 1.0


def make_hub(state: MarketState, current: list[str] | None = None) -> PriceHub:
    mode = current if current is not None else TEST
    return PriceHub(
        state,
        lambda: mode,
        stored=MinuteReader(MemoryAggregateStore(), StoreHealth("postgres")),
        symbols=SYMBOLS,
        all_sources=LIVE + TEST,
        interval_s=INTERVAL,
        max_lag_s=MAX_LAG,
    )


def tick(state: MarketState, source: str, symbol: str, price: float, ts: int) -> None:
    state.key(source, symbol).fold([(symbol, price, ts)])


def prices(client: Client) -> dict[tuple[str, str], float]:
    return {key: e["price"] for key, e in client.pending.items()}


def test_only_changed_keys_are_delivered() -> None:
    state = MarketState(300)
    tick(state, "test-exchange1", "BTCUSDT", 1.0, 1000)
    tick(state, "test-exchange2", "BTCUSDT", 2.0, 1000)
    hub = make_hub(state)
    hub.mark_published()
    client = hub.add(None, None)
    assert hub.publish(0.0) == 0
    assert client.pending == {}
    tick(state, "test-exchange2", "BTCUSDT", 3.0, 2000)
    assert hub.publish(0.1) == 1
    assert prices(client) == {("test-exchange2", "BTCUSDT"): 3.0}


def test_buffer_coalesces_latest_wins_and_stays_bounded() -> None:
    state = MarketState(300)
    hub = make_hub(state)
    client = hub.add(None, None)
    for i in range(1000):
        for source in TEST:
            for symbol in SYMBOLS:
                tick(state, source, symbol, float(i), 1000 + i)
        hub.publish(i * 0.001)  # nobody drains the client
        assert len(client.pending) <= len(TEST) * len(SYMBOLS)
    assert set(prices(client).values()) == {999.0}


def test_subscription_filters_and_default_follows_the_mode() -> None:
    state = MarketState(300)
    current = list(TEST)
    hub = make_hub(state, current)
    everything = hub.add(None, None)
    btc_live = hub.add(frozenset({"BTCUSDT"}), frozenset({"exchange1"}))
    tick(state, "exchange1", "BTCUSDT", 1.0, 1000)
    tick(state, "test-exchange1", "ETHUSDT", 2.0, 1000)
    hub.publish(0.0)
    assert prices(everything) == {("test-exchange1", "ETHUSDT"): 2.0}
    assert prices(btc_live) == {("exchange1", "BTCUSDT"): 1.0}
    everything.take()
    current[:] = LIVE  # a mode switch
    tick(state, "exchange1", "BTCUSDT", 3.0, 2000)
    tick(state, "test-exchange1", "ETHUSDT", 4.0, 2000)
    hub.publish(0.1)
    assert prices(everything) == {("exchange1", "BTCUSDT"): 3.0}


def test_one_frame_is_serialised_per_subscription_shape() -> None:
    state = MarketState(300)
    hub = make_hub(state)
    group_a = [hub.add(None, None) for _ in range(50)]
    group_b = [hub.add(frozenset({"BTCUSDT"}), None) for _ in range(50)]
    for source in TEST:
        for symbol in SYMBOLS:
            tick(state, source, symbol, 5.0, 1000)
    hub.publish(0.0)
    assert hub.frames_serialised == 2
    assert len({id(c.frame) for c in group_a}) == 1
    assert len({id(c.frame) for c in group_b}) == 1
    frame = group_b[0].frame
    assert frame is not None
    decoded = orjson.loads(frame)
    assert decoded["type"] == "prices"
    assert {(e["exchange"], e["symbol"]) for e in decoded["data"]} == {
        ("test-exchange1", "BTCUSDT"),
        ("test-exchange2", "BTCUSDT"),
    }


def test_a_lagging_client_gets_a_private_merged_buffer() -> None:
    state = MarketState(300)
    hub = make_hub(state)
    fast, slow = hub.add(None, None), hub.add(None, None)
    tick(state, "test-exchange1", "BTCUSDT", 1.0, 1000)
    hub.publish(0.0)
    fast.take()
    tick(state, "test-exchange1", "ETHUSDT", 2.0, 1000)
    hub.publish(0.1)
    assert prices(slow) == {("test-exchange1", "BTCUSDT"): 1.0, ("test-exchange1", "ETHUSDT"): 2.0}
    assert slow.frame is None  # its sender serialises the merged buffer itself
    assert prices(fast) == {("test-exchange1", "ETHUSDT"): 2.0}  # the shared dict is untouched


def test_snapshot_lists_subscribed_keys_in_config_order() -> None:
    state = MarketState(300)
    tick(state, "test-exchange2", "ETHUSDT", 4.0, 1004)
    tick(state, "test-exchange1", "BTCUSDT", 1.0, 1001)
    tick(state, "exchange1", "BTCUSDT", 9.0, 1009)
    state.key("test-exchange1", "ETHUSDT")  # a key without a price is left out
    hub = make_hub(state)
    snapshot = orjson.loads(hub.snapshot(Client(None, None)))
    assert snapshot == {
        "type": "snapshot",
        "data": [
            {"symbol": "BTCUSDT", "exchange": "test-exchange1", "price": 1.0, "timestamp": 1001},
            {"symbol": "ETHUSDT", "exchange": "test-exchange2", "price": 4.0, "timestamp": 1004},
        ],
    }
    only = orjson.loads(hub.snapshot(Client(frozenset({"BTCUSDT"}), frozenset({"exchange1"}))))
    assert [e["exchange"] for e in only["data"]] == ["exchange1"]


def test_lag_check_drops_only_the_stale_client() -> None:
    state = MarketState(300)
    hub = make_hub(state)
    stale, fresh = hub.add(None, None), hub.add(None, None)
    stale.control.clear()
    fresh.control.clear()
    tick(state, "test-exchange1", "BTCUSDT", 1.0, 1000)
    hub.publish(10.0)
    fresh.take()
    fresh.pending_since = None
    hub.publish(10.0 + MAX_LAG + 0.01)
    assert stale.close_code == CLOSE_POLICY and stale.closed.is_set()
    assert "too slow" in stale.close_reason
    assert hub.clients == {fresh}


async def test_a_stalled_client_never_slows_the_hub_or_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = MarketState(300)
    hub = make_hub(state)
    stopping = trio.Event()
    received: list[tuple[float, dict[str, object]]] = []

    async def fast_send(text: str) -> None:
        received.append((trio.current_time(), orjson.loads(text)))

    async def stalled_send(text: str) -> None:
        await trio.sleep_forever()

    async def feed() -> None:
        for i in range(200):
            tick(state, "test-exchange1", "BTCUSDT", float(i), 1000 + i)
            await trio.sleep(0.01)  # 100 changes/s, ten per hub interval

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run, stopping)
            fast, stalled = hub.add(None, None), hub.add(None, None)
            nursery.start_soon(hub.pump, fast, fast_send)
            nursery.start_soon(hub.pump, stalled, stalled_send)
            await feed()
            await trio.sleep(0.5)
            assert stalled.close_code == CLOSE_POLICY
            assert stalled not in hub.clients
            stopping.set()
            await fast.closed.wait()
            nursery.cancel_scope.cancel()

    assert fast.close_code == CLOSE_GOING_AWAY
    kinds = [frame["type"] for _, frame in received]
    assert kinds[0] == "snapshot"
    frames = [(t, f) for t, f in received if f["type"] == "prices"]
    assert 15 <= len(frames) <= 25  # ~2 s of changes, one frame per 0.1 s
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    assert min(gaps) >= INTERVAL - 1e-9
    last = frames[-1][1]["data"]
    assert isinstance(last, list)
    assert last[-1]["price"] == 199.0  # latest wins: the last change arrived


async def test_pump_sends_snapshot_then_errors_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = MarketState(300)
    tick(state, "test-exchange1", "BTCUSDT", 1.0, 1000)
    hub = make_hub(state)
    client = hub.add(None, None)
    await client.put_control('{"type":"error","error":"x"}', trio.current_time())
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.pump, client, send)
        await trio.sleep(1)
        hub.drop(client, CLOSE_GOING_AWAY, "bye")
    assert [orjson.loads(s)["type"] for s in sent] == ["snapshot", "error"]


async def test_clients_added_after_shutdown_are_closed_at_once() -> None:
    hub = make_hub(MarketState(300))
    hub.close_all(CLOSE_GOING_AWAY, "server shutting down")
    client = hub.add(None, None)
    assert client.close_code == CLOSE_GOING_AWAY
    assert client not in hub.clients


@pytest.mark.parametrize("count", [1, 100])
async def test_control_queue_is_bounded(autojump_clock: trio.testing.MockClock, count: int) -> None:
    hub = make_hub(MarketState(300))
    client = hub.add(None, None)
    done = 0

    async def flood() -> None:
        nonlocal done
        for _ in range(count):
            await client.put_control('{"type":"error","error":"x"}', trio.current_time())
            done += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.sleep(1)
        assert len(client.control) <= 16
        assert done == min(count, 15)  # the snapshot marker holds one of the 16 places
        hub.drop(client, CLOSE_POLICY, "bye")  # unblocks the flood
    assert done >= min(count, 16)
