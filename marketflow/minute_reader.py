"""Stored minutes for the read path: the aggregate store behind one async, shared front.

`MinuteReader` satisfies `ports.StoredMinutes`. It owns the API's own PostgreSQL connection (so
queries never wait behind a batch write), a limiter of one thread at a time on it, and a
single-flight cache: the minutes these reads cover are older than anything the market state
holds, so they change only when a journal replay commits, and 64 clients asking for
`?period=1d` share one read instead of queueing 64 behind one connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from marketflow.health import StoreHealth, describe
from marketflow.logs import rate_limited
from marketflow.models import Key, MinuteRow, RangeStats, StoreRange
from marketflow.ports import AggregateStore
from marketflow.queries import QueryError, rfc3339

log = logging.getLogger("marketflow.queries")

# A read never holds a request longer than this; the store's own statement timeout bounds the
# thread, this bounds the wait for the reader connection behind other queries.
QUERY_TIMEOUT_S: Final = 10.0
UNAVAILABLE: Final = (
    "PostgreSQL is unavailable and memory does not hold this whole range; "
    "try a period within the last window_seconds"
)

Answer = list[RangeStats | None]


class MinuteReader:
    """Async range reads on the aggregate store, shared by identical concurrent requests."""

    def __init__(
        self,
        store: AggregateStore,
        health: StoreHealth,
        *,
        unwritten_from: Callable[[Key], int | None] = lambda key: None,
        ttl_s: float = 1.0,
        max_entries: int = 256,
    ) -> None:
        self.store = store
        self.health = health
        # The oldest minute (ms) accepted but not yet committed (another instance's journal, or
        # this one's): a range reaching it would silently miss that minute, so it is a 503.
        self.unwritten_from = unwritten_from
        self.limiter = trio.CapacityLimiter(1)  # one connection: one thread at a time
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._answers: dict[tuple[StoreRange, ...], tuple[float, Answer]] = {}
        self._inflight: dict[tuple[StoreRange, ...], trio.Event] = {}

    async def range_stats(self, ranges: Sequence[StoreRange]) -> Answer:
        """Stats of each range, in order, in one thread hop; 503 when the store cannot answer.

        Concurrent identical requests wait for one read; its answer serves for `ttl_s`.
        """
        self._check_up()
        for r in ranges:
            unwritten = self.unwritten_from((r.source, r.symbol))
            if unwritten is not None and r.to_ms > unwritten:
                raise QueryError(
                    503,
                    f"minutes from {rfc3339(unwritten)} are not yet committed to PostgreSQL "
                    "(it was unreachable); try again shortly or ask for a shorter period",
                )
        key = tuple(ranges)
        while True:
            cached = self._answers.get(key)
            if cached is not None and trio.current_time() - cached[0] < self.ttl_s:
                return cached[1]
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()  # then read the answer it left, or try ourselves if it failed
        done = self._inflight[key] = trio.Event()
        try:
            answer = await self._read(ranges)
            if len(self._answers) >= self.max_entries:
                self._answers.clear()
            self._answers[key] = (trio.current_time(), answer)
            return answer
        finally:
            del self._inflight[key]
            done.set()

    def _check_up(self) -> None:
        if self.health.checked and not self.health.up:
            raise QueryError(503, UNAVAILABLE)

    async def _read(self, ranges: Sequence[StoreRange]) -> Answer:
        self._check_up()
        store = self.store

        def read() -> Answer:
            return [store.range_stats(r.source, r.symbol, r.from_ms, r.to_ms) for r in ranges]

        with trio.move_on_after(QUERY_TIMEOUT_S) as scope:
            try:
                return await trio.to_thread.run_sync(read, limiter=self.limiter)
            except Exception as exc:
                if rate_limited("queries.postgres_failed", 10.0):
                    log.warning(
                        "statistics query failed on postgres",
                        extra={"ctx": {"error": describe(exc)}},
                    )
                raise QueryError(
                    503,
                    f"PostgreSQL query failed ({type(exc).__name__}) and memory does not hold "
                    "this whole range",
                ) from exc
        assert scope.cancelled_caught
        raise QueryError(503, "PostgreSQL did not answer in time")

    async def latest_rows(self, keys: Sequence[Key]) -> dict[Key, MinuteRow]:
        """Each key's newest stored minute, in one thread hop; 503 when the store cannot answer."""
        self._check_up()
        store = self.store

        def read() -> dict[Key, MinuteRow]:
            found = {key: store.latest_row(*key) for key in keys}
            return {key: row for key, row in found.items() if row is not None}

        with trio.move_on_after(QUERY_TIMEOUT_S):
            try:
                return await trio.to_thread.run_sync(read, limiter=self.limiter)
            except Exception as exc:
                raise QueryError(503, f"PostgreSQL query failed ({type(exc).__name__})") from exc
        raise QueryError(503, "PostgreSQL did not answer in time")

    def ping(self) -> float:
        """Round trip on the reader's own connection (blocking; for the store probe)."""
        return self.store.ping()

    def close(self) -> None:
        self.store.close()
