"""Stored minutes for the read path: the aggregate store behind one async, shared front.

`MinuteReader` satisfies `ports.StoredMinutes`. It owns the API's own PostgreSQL connections (so
queries never wait behind a batch write), a limiter of one thread per connection, and a
single-flight cache: the minutes these reads cover are older than anything the market state
holds, so they change only when a journal replay commits, and 64 clients asking for
`?period=1d` share one read instead of queueing 64 behind one connection. Candle reads (a
thousand candles each, seldom asked twice) are shared while in flight only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Final

import trio

from marketflow.health import StoreHealth, describe
from marketflow.logs import rate_limited
from marketflow.models import Bucket, Key, MinuteRow, RangeStats, StoreCandles, StoreRange
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
Candles = list[list[tuple[int, Bucket]]]


class _Flight:
    """One read in progress; its waiters take its answer when `done` is set (if it got one)."""

    __slots__ = ("answer", "done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.answer: Any = None


class MinuteReader:
    """Async reads on the aggregate store, shared by identical concurrent requests."""

    def __init__(
        self,
        store: AggregateStore,
        health: StoreHealth,
        *,
        unwritten_from: Callable[[Key], int | None] = lambda key: None,
        connections: int = 1,
        ttl_s: float = 1.0,
        max_entries: int = 256,
    ) -> None:
        self.store = store
        self.health = health
        # The oldest minute (ms) accepted but not yet committed (another instance's journal, or
        # this one's): a range reaching it would silently miss that minute, so it is a 503.
        self.unwritten_from = unwritten_from
        # One thread per connection `store` reads through (a `StorePool` has several).
        self.limiter = trio.CapacityLimiter(connections)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._answers: dict[Hashable, tuple[float, Any]] = {}  # oldest first
        self._inflight: dict[Hashable, _Flight] = {}

    async def range_stats(self, ranges: Sequence[StoreRange]) -> Answer:
        """Stats of each range, in order, in one thread hop; 503 when the store cannot answer.

        Concurrent identical requests wait for one read; its answer serves for `ttl_s`.
        """
        self._check_ranges(ranges)
        store = self.store

        def read() -> Answer:
            return [store.range_stats(r.source, r.symbol, r.from_ms, r.to_ms) for r in ranges]

        answer: Answer = await self._shared(("stats", *ranges), lambda: self._read(read))
        return answer

    async def candles(self, reads: Sequence[StoreCandles]) -> Candles:
        """Each read's candles, in order, in one thread hop; 503 when the store cannot answer.
        Identical concurrent requests share one read; answers are not kept (see module)."""
        self._check_ranges([r.range for r in reads])
        store = self.store

        def read() -> Candles:
            return [
                store.candles(
                    r.range.source,
                    r.range.symbol,
                    r.interval_ms,
                    r.range.from_ms,
                    r.range.to_ms,
                    r.limit,
                    r.newest_first,
                )
                for r in reads
            ]

        answer: Candles = await self._shared(
            ("candles", *reads), lambda: self._read(read), keep=False
        )
        return answer

    def _check_ranges(self, ranges: Sequence[StoreRange]) -> None:
        self._check_up()
        for r in ranges:
            unwritten = self.unwritten_from((r.source, r.symbol))
            if unwritten is not None and r.to_ms > unwritten:
                raise QueryError(
                    503,
                    f"minutes from {rfc3339(unwritten)} are not yet committed to PostgreSQL "
                    "(it was unreachable); try again shortly or ask for a shorter period",
                )

    async def _shared(
        self, key: Hashable, read: Callable[[], Awaitable[Any]], *, keep: bool = True
    ) -> Any:
        """`await read()`, or the answer of an identical read (same `key`) in flight, or done
        within `ttl_s` (`keep=False`: in flight only)."""
        while True:
            cached = self._answers.get(key)
            if cached is not None and trio.current_time() - cached[0] < self.ttl_s:
                return cached[1]
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.ok:
                return flight.answer
            # it failed: try ourselves
        flight = self._inflight[key] = _Flight()
        try:
            flight.answer = answer = await read()
            flight.ok = True
            if keep:
                self._keep(key, answer)
            return answer
        finally:
            del self._inflight[key]
            flight.done.set()

    def _keep(self, key: Hashable, answer: Any) -> None:
        """Keep `answer` for `ttl_s`. Expired answers leave one by one as new ones arrive (the
        dict stays in time order), so neither memory nor a pause to free them grows with the
        request rate."""
        now = trio.current_time()
        answers = self._answers
        answers.pop(key, None)  # re-inserted last
        for oldest in list(answers):
            if now - answers[oldest][0] < self.ttl_s and len(answers) < self.max_entries:
                break
            del answers[oldest]
        answers[key] = (now, answer)

    def _check_up(self) -> None:
        if self.health.checked and not self.health.up:
            raise QueryError(503, UNAVAILABLE)

    async def _read[T](self, read: Callable[[], T]) -> T:
        self._check_up()
        with trio.move_on_after(QUERY_TIMEOUT_S) as scope:
            try:
                return await trio.to_thread.run_sync(read, limiter=self.limiter)
            except Exception as exc:
                if rate_limited("queries.postgres_failed", 10.0):
                    log.warning("query failed on postgres", extra={"ctx": {"error": describe(exc)}})
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
