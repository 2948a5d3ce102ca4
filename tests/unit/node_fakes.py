"""A `Node` built on in-memory fakes for API tests: never run, marked ready by hand."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from marketflow.app import build_node
from marketflow.config import Config
from marketflow.models import Bucket, Key, LatestPrice, MinuteRow
from marketflow.node import Node
from marketflow.ports import FlushPlan
from marketflow.store.memory import MemoryAggregateStore

MINUTE = 29_927_441
NOW = MINUTE * 60 + 30.5
NOW_MS = int(NOW * 1000)


class NullPriceStore:
    def write(self, plan: FlushPlan) -> None:
        pass

    def read_windows(
        self, keys: Sequence[Key], since_s: int
    ) -> dict[Key, list[tuple[int, Bucket]]]:
        return {}

    def read_latest(self, keys: Sequence[Key]) -> dict[Key, LatestPrice]:
        return {}

    def ping(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class ListJournal:
    def __init__(self) -> None:
        self.items: list[list[MinuteRow]] = []

    def append(self, rows: Sequence[MinuteRow]) -> None:
        self.items.append(list(rows))

    def batches(self) -> Iterable[list[MinuteRow]]:
        return list(self.items)

    def read_from(self, offset: int) -> Iterable[tuple[int, list[MinuteRow]]]:
        return [(i + 1, batch) for i, batch in enumerate(self.items) if i >= offset]

    def truncate(self) -> None:
        self.items.clear()

    def __len__(self) -> int:
        return sum(len(b) for b in self.items)


def make_node(config: Config, *, ready: bool = True) -> Node:
    node = build_node(
        config,
        price_store=NullPriceStore(),
        aggregate_store=MemoryAggregateStore(),
        query_store=MemoryAggregateStore(),
        journal=ListJournal(),
        probes=False,
        clock=lambda: NOW,
    )
    node.ingest.running = ready  # as if restored and started
    state = node.state
    for i, source in enumerate(("test-exchange1", "test-exchange2", "exchange1")):
        state.key(source, "BTCUSDT").fold(
            [("BTCUSDT", 100.0 + i, NOW_MS - 5_000 + i), ("BTCUSDT", 101.0 + i, NOW_MS - 1_000 + i)]
        )
    return node
