"""A `Node` built on in-memory fakes for API tests: never run, marked ready by hand."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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


def fake_node(
    config: Config,
    *,
    store: MemoryAggregateStore | None = None,
    clock: Callable[[], float] = lambda: NOW,
) -> Node:
    """A role-all node on fakes; `store` (if given) is both its writer and its reader."""
    return build_node(
        config,
        price_store=NullPriceStore(),
        aggregate_store=store if store is not None else MemoryAggregateStore(),
        query_store=store if store is not None else MemoryAggregateStore(),
        journal=ListJournal(),
        probes=False,
        clock=clock,
    )


async def take_over_all(node: Node) -> None:
    """Own every configured source's keys, resumed by the restore rule as a start would (epoch
    0: unfenced), so folded ticks are written and pruned like an ingesting process's."""
    assert node.ingest is not None
    for source in node.config.all_sources:
        await node.ingest.take_over(source, 0)


def make_node(config: Config, *, ready: bool = True) -> Node:
    node = fake_node(config)
    assert node.ingest is not None
    node.ingest.running = ready  # as if restored and started
    state = node.state
    for i, source in enumerate(("test-exchange1", "test-exchange2", "exchange1")):
        state.key(source, "BTCUSDT").fold(
            [("BTCUSDT", 100.0 + i, NOW_MS - 5_000 + i), ("BTCUSDT", 101.0 + i, NOW_MS - 1_000 + i)]
        )
    return node
