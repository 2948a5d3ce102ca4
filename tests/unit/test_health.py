"""What /health, /health/ready and /metrics say about the stores, the start and the feeds
(contract: health), on a node of in-memory fakes."""

from __future__ import annotations

import re

import trio

from marketflow.app import build_node
from marketflow.config import build_config
from marketflow.health import StoreHealth, probe_store
from marketflow.models import SourceStatus
from marketflow.node import Node
from marketflow.store.memory import MemoryAggregateStore
from marketflow.store.postgres import PostgresAggregateStore
from marketflow.store.redis import RedisPriceStore
from tests.unit.node_fakes import ListJournal, NullPriceStore
from tests.unit.test_api_app import call, make_app

BODY_KEYS = {
    "status",
    "role",
    "instance",
    "mode",
    "uptime_s",
    "version",
    "postgres",
    "redis",
    "sources",
    "pipeline",
}


def all_well(node: Node) -> None:
    """Both stores answered and every current source is connected."""
    node.redis_health.ok(0.5)
    node.postgres_health.ok(0.5)
    assert node.ingest is not None
    for stats in node.ingest.pipeline.stats.values():
        stats.status = SourceStatus.CONNECTED


# --- one store's state ---------------------------------------------------------------------------


def test_a_store_that_answers_the_probe_but_refused_a_write_is_down_until_a_write_succeeds() -> (
    None
):
    """Guards health that lied: a store was `ok` while it answered a ping, however its writes
    fared. A failed write marks it down with the write's error at once; the probe answering
    does not clear that; the next successful write does."""
    health = StoreHealth("redis")
    health.ok(0.4)
    assert health.as_json() == {"status": "ok", "latency_ms": 0.4, "error": None}
    health.write_failed(RuntimeError("READONLY You can't write against a read only replica."))
    health.ok(0.3)  # PING still answers
    assert health.as_json() == {
        "status": "down",
        "latency_ms": 0.3,
        "error": "RuntimeError: READONLY You can't write against a read only replica.",
    }
    health.wrote()
    assert health.as_json()["status"] == "ok" and health.error is None


def test_before_the_first_answer_a_store_is_down_and_says_why() -> None:
    assert StoreHealth("postgres").as_json() == {
        "status": "down",
        "latency_ms": None,
        "error": "not reached yet",
    }


async def test_the_probe_marks_a_refusing_store_down_and_calls_back_when_it_takes_writes(
    autojump_clock: trio.abc.Clock,
) -> None:
    health = StoreHealth("postgres")
    refusing = True
    comebacks = 0

    def check() -> float:
        if refusing:
            raise PermissionError("no INSERT/UPDATE privilege on aggregates")
        return 1.5

    def on_up() -> None:
        nonlocal comebacks
        comebacks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: probe_store(health, check, on_up=on_up, interval_s=1.0))
        while not health.checked:
            await trio.sleep(0.1)
        assert health.as_json() == {
            "status": "down",
            "latency_ms": None,
            "error": "PermissionError: no INSERT/UPDATE privilege on aggregates",
        }
        refusing = False
        while not health.up:
            await trio.sleep(0.1)
        assert comebacks == 1 and health.latency_ms == 1.5
        nursery.cancel_scope.cancel()


# --- the node's answers --------------------------------------------------------------------------


async def test_while_starting_health_has_the_whole_shape_and_both_probes_say_503() -> None:
    """Before the restore completes: `starting` (503) with the same body as later, role and
    instance included; /health/ready is 503 too."""
    app, node = make_app(ready=False)
    status, body, _ = await call(app, "GET", "/health")
    assert status == 503 and body["status"] == "starting"
    assert set(body) == BODY_KEYS
    assert body["role"] == "all" and body["instance"] == node.instance
    assert set(body["pipeline"]) >= {"queue_depth", "updates_total", "pending_rows", "late"}
    status, body, _ = await call(app, "GET", "/health/ready")
    assert (status, body) == (503, {"ready": False})


async def test_rows_waiting_in_the_journal_make_health_degraded() -> None:
    """`pending_rows` > 0 is degraded (503), though every store and source is fine; ready
    stays 200 (this process serves current data)."""
    app, node = make_app()
    all_well(node)
    status, body, _ = await call(app, "GET", "/health")
    assert (status, body["status"]) == (200, "ok")
    assert node.ingest is not None
    node.ingest.aggregator.journaled_rows = 3
    status, body, _ = await call(app, "GET", "/health")
    assert (status, body["status"], body["pipeline"]["pending_rows"]) == (503, "degraded", 3)
    status, body, _ = await call(app, "GET", "/health/ready")
    assert (status, body) == (200, {"ready": True})


async def test_a_store_refusing_writes_makes_health_degraded_with_the_write_error() -> None:
    app, node = make_app()
    all_well(node)
    node.postgres_health.write_failed(
        RuntimeError("cannot execute INSERT in a read-only transaction")
    )
    status, body, _ = await call(app, "GET", "/health")
    assert (status, body["status"]) == (503, "degraded")
    assert body["postgres"] == {
        "status": "down",
        "latency_ms": 0.5,
        "error": "RuntimeError: cannot execute INSERT in a read-only transaction",
    }


async def test_metrics_export_each_sources_feed_lag_and_refused_ticks() -> None:
    """`marketflow_feed_lag_seconds{source}`: wall clock minus the source's newest tick (the
    fake node's clock is fixed; its newest ticks are 1000, 999 and 998 ms old); a source
    without a tick has no sample."""
    app, node = make_app()
    node.state.refused = 4
    status, text, _ = await call(app, "GET", "/metrics")
    assert status == 200
    lag = dict(
        re.findall(r'^marketflow_feed_lag_seconds\{source="([^"]+)"\} (\S+)$', text.decode(), re.M)
    )
    assert lag == {"test-exchange1": "1.0", "test-exchange2": "0.999", "exchange1": "0.998"}
    assert "marketflow_refused_ticks_total 4.0" in text.decode()


def test_the_store_probes_have_connections_of_their_own() -> None:
    """Guards health judged on the API reader's connection: a reader busy with a long query
    delayed the news, and a ping on it says nothing about writes. The probes get their own
    store objects (own connections), which check writes, not the reader's nor the writer's."""
    writer = NullPriceStore()
    aggregates = MemoryAggregateStore()
    reader = MemoryAggregateStore()
    node = build_node(
        build_config({}),
        price_store=writer,
        aggregate_store=aggregates,
        query_store=reader,
        journal=ListJournal(),
    )
    try:
        assert node.ingest is not None
        probes = {health.name: (check, on_up) for health, check, on_up in node.probes}
        redis_check, _ = probes["redis"]
        postgres_check, postgres_up = probes["postgres"]
        redis_probe = getattr(redis_check, "__self__", None)
        postgres_probe = getattr(postgres_check, "__self__", None)
        assert isinstance(redis_probe, RedisPriceStore) and redis_check.__name__ == "probe_write"
        assert isinstance(postgres_probe, PostgresAggregateStore)
        assert postgres_check.__name__ == "probe_write"
        assert postgres_probe not in (reader, aggregates, node.minutes.store)
        assert postgres_up == node.ingest.aggregator.retry_soon
    finally:
        for close in node.closers:
            close()
