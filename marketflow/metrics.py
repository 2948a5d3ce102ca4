"""Prometheus metrics (contract: health). Counters that change per tick are read at scrape time from
the
pipeline's own counters, so the hot path never touches a metric object."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per service instance (no process globals, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.flush_seconds = Histogram(
            "marketflow_redis_flush_seconds",
            "Time of one Redis flush (one pipelined call).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_write_seconds = Histogram(
            "marketflow_db_write_seconds",
            "Time of one PostgreSQL batch upsert.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ingest_batch_seconds = Histogram(
            "marketflow_ingest_batch_seconds",
            "Time from a batch being read off its source to its fold into state.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_commands = Counter(
            "marketflow_redis_commands", "Redis commands sent by the flusher.", registry=r
        )
        self.db_rows = Counter(
            "marketflow_db_rows_written", "Aggregate rows committed to PostgreSQL.", registry=r
        )
        self.fenced_rows = Counter(
            "marketflow_fenced_rows",
            "Aggregate rows PostgreSQL refused: written under an older lease epoch than the "
            "source's newest.",
            registry=r,
        )
        self.store_errors = Counter(
            "marketflow_store_errors", "Failed store calls.", ["store"], registry=r
        )

    def watch(
        self,
        snapshot: Callable[[], dict[str, Any]],
        feed_lag_ms: Callable[[], dict[str, int | None]] | None = None,
    ) -> None:
        """Expose the pipeline's counters; `snapshot()` returns the /health body, `feed_lag_ms()`
        each source's wall clock minus its newest tick's timestamp."""
        self.registry.register(_SnapshotCollector(snapshot, feed_lag_ms))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        feed_lag_ms: Callable[[], dict[str, int | None]] | None,
    ) -> None:
        self._snapshot = snapshot
        self._feed_lag_ms = feed_lag_ms

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        pipeline = snap["pipeline"]
        updates = CounterMetricFamily("marketflow_updates", "Ticks accepted into state.")
        updates.add_metric([], pipeline["updates_total"])
        yield updates
        for name, help_text in (
            ("queue_depth", "Batches waiting in the pipeline's channels."),
            ("pending_rows", "Aggregate rows waiting in the journal for PostgreSQL."),
        ):
            gauge = GaugeMetricFamily(f"marketflow_{name}", help_text)
            gauge.add_metric([], pipeline[name])
            yield gauge
        late = CounterMetricFamily("marketflow_late_ticks", "Ticks too old for any held minute.")
        late.add_metric([], pipeline["late"])
        yield late
        refused = CounterMetricFamily(
            "marketflow_refused_ticks",
            "Ticks refused because rows could be written nowhere and pending_rows_max was reached.",
        )
        refused.add_metric([], pipeline.get("refused", 0))
        yield refused
        if self._feed_lag_ms is not None:
            lag = GaugeMetricFamily(
                "marketflow_feed_lag_seconds",
                "Wall clock minus the newest tick's timestamp, per source.",
                labels=["source"],
            )
            for name, ms in self._feed_lag_ms().items():
                if ms is not None:
                    lag.add_metric([name], ms / 1000)
            yield lag
        messages = CounterMetricFamily(
            "marketflow_source_messages", "Valid lines read per source.", labels=["source"]
        )
        rejected = CounterMetricFamily(
            "marketflow_source_rejected",
            "Rejected lines by source and reason.",
            labels=["source", "reason"],
        )
        reconnects = CounterMetricFamily(
            "marketflow_source_reconnects", "Feed reconnects per source.", labels=["source"]
        )
        connected = GaugeMetricFamily(
            "marketflow_source_connected", "1 when the source is connected.", labels=["source"]
        )
        for name, src in snap["sources"].items():
            messages.add_metric([name], src["messages"])
            reconnects.add_metric([name], src["reconnects"])
            connected.add_metric([name], 1 if src["status"] == "connected" else 0)
            for reason, count in src["rejected_by_reason"].items():
                rejected.add_metric([name, reason], count)
        yield from (messages, rejected, reconnects, connected)
        for store in ("redis", "postgres"):
            up = GaugeMetricFamily(f"marketflow_{store}_up", f"1 when {store} answers.")
            up.add_metric([], 1 if snap[store]["status"] == "ok" else 0)
            yield up
