"""The ingest pipeline (contract: pipeline): sources -> fan-in channel -> distributor -> workers ->
state.

Channels carry batches. The distributor shards by key, so one key is always folded by one
worker, in arrival order. Sources of the current mode run in their own cancel scope so a mode
switch stops them without touching what they already sent.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial

import trio

from marketflow.config import Config, ExchangeConfig
from marketflow.feeds.sources import read_source
from marketflow.generator import generate
from marketflow.logs import rate_limited
from marketflow.metrics import Metrics
from marketflow.models import Key, Mode, SourceStats, SourceStatus, Tick, TickBatch
from marketflow.state import MarketState

log = logging.getLogger("marketflow.pipeline")

FAN_IN_BATCHES = 1024  # bounded: a stalled worker pool slows readers, it never grows memory
WORKER_BATCHES = 64
DRAIN_BATCHES = 256  # batches one distributor turn may take from the fan-in

# One worker's share of a batch: when the batch was read, and its ticks grouped by key.
WorkItem = tuple[float, list[tuple[Key, list[Tick]]]]


class Pipeline:
    """Owns the fan-in channel, the distributor, the workers and the running sources."""

    def __init__(
        self,
        config: Config,
        state: MarketState,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.mode = Mode(config.app.mode)
        self.stats = {name: SourceStats(name) for name in config.all_sources}
        self._send, self._recv = trio.open_memory_channel[TickBatch](FAN_IN_BATCHES)
        widest = max(len(config.live_sources), len(config.test_sources))
        self.worker_count = config.app.workers_per_exchange * widest
        self._worker_sends: list[trio.MemorySendChannel[WorkItem]] = []
        self._worker_recvs: list[trio.MemoryReceiveChannel[WorkItem]] = []
        for _ in range(self.worker_count):
            send, recv = trio.open_memory_channel[WorkItem](WORKER_BATCHES)
            self._worker_sends.append(send)
            self._worker_recvs.append(recv)
        self._shards: dict[Key, int] = {}
        self._sources_nursery: trio.Nursery | None = None
        self._sources_scope: trio.CancelScope | None = None
        self._switch_lock = trio.Lock()
        self.drained = trio.Event()
        # Decides whether this process runs a source (leases, file locks): `owner(name, run)`
        # calls `run()` only while the source is held. None: every source runs.
        self.owner: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]] | None = None

    # --- the per-tick path -------------------------------------------------------------------

    async def send_batch(self, source: str, ticks: list[Tick]) -> None:
        """Hand one batch to the pipeline; shielded so a mode switch never drops a read batch."""
        with trio.CancelScope(shield=True):
            await self._send.send((source, ticks, trio.current_time()))

    def _shard(self, key: Key) -> int:
        shard = self._shards.get(key)
        if shard is None:
            crc = zlib.crc32(f"{key[0]}\0{key[1]}".encode())
            shard = self._shards[key] = crc % self.worker_count
        return shard

    async def _distribute(self) -> None:
        """Split batches by key and pass each worker its part; ends when the fan-in closes.

        Each turn takes every batch already queued (up to DRAIN_BATCHES) and hands each worker
        one item for all of them, without a checkpoint where a channel has room: under a
        thousand busy WebSocket tasks a scheduler turn is long, and ingest must not wait for one
        per batch.
        """
        async with AsyncExitStack() as stack:
            for send in self._worker_sends:
                await stack.enter_async_context(send)
            async with self._recv:
                async for first in self._recv:
                    batches = [first]
                    while len(batches) < DRAIN_BATCHES:
                        try:
                            batches.append(self._recv.receive_nowait())
                        except trio.WouldBlock:
                            break
                    groups: dict[Key, list[Tick]] = {}
                    for source, ticks, _ in batches:
                        by_symbol: dict[str, list[Tick]] = {}
                        for tick in ticks:
                            group = by_symbol.get(tick[0])
                            if group is None:
                                by_symbol[tick[0]] = group = []
                            group.append(tick)
                        for symbol, group in by_symbol.items():
                            held = groups.get((source, symbol))
                            if held is None:
                                groups[(source, symbol)] = group
                            else:
                                held.extend(group)  # arrival order kept: batches in order
                    per_worker: dict[int, list[tuple[Key, list[Tick]]]] = {}
                    for key, group in groups.items():
                        per_worker.setdefault(self._shard(key), []).append((key, group))
                    read_at = first[2]
                    for worker, item in per_worker.items():
                        send = self._worker_sends[worker]
                        try:
                            send.send_nowait((read_at, item))
                        except trio.WouldBlock:
                            await send.send((read_at, item))

    async def _work(self, recv: trio.MemoryReceiveChannel[WorkItem]) -> None:
        """Fold this worker's items into state; each turn folds every item already queued."""
        latency = self.metrics.ingest_batch_seconds
        async with recv:
            async for first in recv:
                self._fold(first)
                latency.observe(trio.current_time() - first[0])
                while True:
                    try:
                        item = recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._fold(item)
                    latency.observe(trio.current_time() - item[0])

    def _fold(self, work: WorkItem) -> None:
        state = self.state
        for (source, symbol), ticks in work[1]:
            late, refused = state.key(source, symbol).fold(ticks, state.refuse_new_minutes)
            state.updates_total += len(ticks) - refused
            if refused:
                state.refused += refused
                if rate_limited("refused-ticks", 10.0):
                    log.error(
                        "ticks refused: rows can be written nowhere and pending_rows_max is "
                        "reached",
                        extra={"ctx": {"source": source, "refused_total": state.refused}},
                    )
            if late:
                state.late += late
                if rate_limited("late-ticks", 10.0):
                    log.warning(
                        "ticks older than every held minute counted as late",
                        extra={
                            "ctx": {"source": source, "symbol": symbol, "late_total": state.late}
                        },
                    )

    @property
    def queue_depth(self) -> int:
        """Batches waiting in the fan-in and worker channels."""
        depth = self._recv.statistics().current_buffer_used
        return depth + sum(r.statistics().current_buffer_used for r in self._worker_recvs)

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run distributor, workers and the current mode's sources until `stop()` drains them.

        On `stop()` the sources are cancelled, the fan-in is closed, and the distributor and
        workers finish every batch already read before this returns.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._distribute)
            async with trio.open_nursery() as workers:
                for recv in self._worker_recvs:
                    workers.start_soon(self._work, recv)
                async with trio.open_nursery() as sources:
                    self._sources_nursery = sources
                    self._sources_scope = await sources.start(self._run_sources, self.mode)
                    task_status.started()
                    # `stop()` cancels the sources; this nursery then ends.
                self._sources_nursery = None
                await self._send.aclose()
        self.drained.set()

    def stop(self) -> None:
        """Stop every source; `run()` then drains and returns."""
        if self._sources_scope is not None:
            self._sources_scope.cancel()

    async def switch_mode(self, mode: Mode) -> tuple[Mode, bool]:
        """Stop the current sources and start `mode`'s. Returns (previous mode, changed);
        read under the lock, so concurrent switches each see the mode they replaced."""
        async with self._switch_lock:
            if mode == self.mode:
                return mode, False
            if self._sources_nursery is None:
                raise RuntimeError("the pipeline is not running")
            if self._sources_scope is not None:
                self._sources_scope.cancel()
            previous = self.mode
            self.mode = mode
            self._sources_scope = await self._sources_nursery.start(self._run_sources, mode)
            log.info(
                "mode switched", extra={"ctx": {"mode": mode.value, "previous": previous.value}}
            )
            return previous, True

    def sources(self, mode: Mode | None = None) -> list[str]:
        return self.config.sources_for((mode or self.mode).value)

    async def _run_sources(
        self,
        mode: Mode,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `mode`'s sources, each in a nursery of its own, inside one cancel scope (reported
        to the caller): cancelling it stops them all; what they already sent stays queued."""
        names = self.config.sources_for(mode.value)
        with trio.CancelScope() as scope:
            try:
                for name, stats in self.stats.items():
                    stats.active = name in names
                async with trio.open_nursery() as nursery:
                    for name in names:
                        nursery.start_soon(self._run_source, name)
                    task_status.started(scope)
            finally:
                for name in names:
                    self.stats[name].status = SourceStatus.DISCONNECTED

    async def _run_source(self, name: str) -> None:
        """One source's nursery: its reader (live) or generator (test), run while this process
        holds the source (`owner`: leases and file locks), else at once."""
        exchange = self.config.exchange(name)
        run = (
            partial(self._read, exchange) if exchange is not None else partial(self._generate, name)
        )
        async with trio.open_nursery() as nursery:
            if self.owner is None:
                nursery.start_soon(run)
            else:
                nursery.start_soon(self.owner, name, run)

    async def _read(self, exchange: ExchangeConfig) -> None:
        app = self.config.app
        await read_source(
            exchange,
            self.send_batch,
            self.stats[exchange.name],
            symbols=app.symbols,
            max_line_bytes=app.max_line_bytes,
            max_skew_ms=app.max_clock_skew_s * 1000,
            max_future_ms=app.max_future_skew_ms,
            stale_after_s=app.stale_after_s,
            reconnect_max_delay_s=app.reconnect_max_delay_s,
            clock=self.clock,
        )

    async def _generate(self, name: str) -> None:
        """One test source: the generator, handing its batches to the pipeline."""
        stats = self.stats[name]
        stats.status = SourceStatus.CONNECTED

        async def send(source: str, ticks: list[Tick]) -> None:
            stats.messages += len(ticks)
            stats.last_message_at = trio.current_time()
            await self.send_batch(source, ticks)

        try:
            await generate(
                name,
                list(self.config.app.symbols),
                self.config.test.rate,
                send,
                seed=None,
                clock=self.clock,
            )
        finally:
            stats.status = SourceStatus.DISCONNECTED
