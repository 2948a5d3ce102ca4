"""The ingest side's ordered shutdown, on in-memory stores (no source sends anything)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import trio
import trio.testing

from marketflow.config import build_config
from marketflow.health import StoreHealth
from marketflow.ingest import Ingest
from marketflow.metrics import Metrics
from marketflow.models import MinuteRow
from marketflow.state import MarketState
from marketflow.store.memory import MemoryAggregateStore
from tests.procs import free_port
from tests.unit.node_fakes import ListJournal, NullPriceStore

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "TONUSDT", "DOGEUSDT", "XRPUSDT"]


class GatedStore(MemoryAggregateStore):
    """Holds its `gate_at`-th upsert in its thread until `release` is set."""

    def __init__(self, gate_at: int) -> None:
        super().__init__()
        self.gate_at = gate_at
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def upsert(self, rows: Sequence[MinuteRow]) -> int:
        self.calls += 1
        if self.calls == self.gate_at:
            self.entered.set()
            self.release.wait(10)
        return super().upsert(rows)


async def test_shutdown_stops_the_aggregator_before_the_final_flush() -> None:
    """Guards the shutdown loss: the final `flush_all` ran while the aggregator's loop was
    still writing a step of more than `db_batch_size` rows, and the node then cancelled that
    loop between two batches, so the batches after it were never written. Now the shutdown
    cancels the aggregator's own scope, waits for the batch in flight, and only then writes
    every changed minute: each row of the interrupted step lands."""
    config = build_config(
        {
            "app": {
                "mode": "live",
                "db_batch_size": 2,
                "grace_ms": 0,
                "symbols": SYMBOLS,
                "flush_interval_ms": 5000,  # a quiet flusher: the wait below sees all blocked
            },
            # Nothing listens there: no tick comes from a source, the test folds its own.
            "exchanges": [{"name": "exchange1", "host": "127.0.0.1", "port": free_port()}],
        }
    )
    store = GatedStore(gate_at=2)
    state = MarketState(config.app.window_seconds)
    ingest = Ingest(
        config,
        state,
        Metrics(),
        price_store=NullPriceStore(),
        aggregate_store=store,
        journal=ListJournal(),
        redis_health=StoreHealth("redis"),
        postgres_health=StoreHealth("postgres"),
    )
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, stopping)
        closed = int(time.time() * 1000) // 60_000 * 60_000 - 120_000
        for i, symbol in enumerate(SYMBOLS):
            state.key("exchange1", symbol).fold([(symbol, 10.0 + i, closed + 1000)])
        await trio.to_thread.run_sync(store.entered.wait)  # a step is writing its 2nd batch
        stopping.set()
        # Let the shutdown go as far as it can while that batch is still in flight.
        while not ingest.pipeline.drained.is_set():
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)
        store.release.set()
    assert ingest.finished.is_set()
    assert sorted(key[1] for key in store.data) == sorted(SYMBOLS)
    assert all(row.count == 1 for row in store.data.values())
