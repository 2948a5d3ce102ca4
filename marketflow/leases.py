"""One source, one ingester (contract: roles): file locks, leases, epochs and hot standby.

Before a process ingests a source it takes, in order:
1. a file lock per source in `data_dir/locks/` (fcntl, released when the process ends): two
   processes on one machine never ingest one source, even while Redis is unreachable;
2. `lease:{SOURCE}` in Redis (`SET NX PX lease_ttl_ms`, value = instance id), renewed every
   third of the TTL by a compare-and-renew, with a new epoch from `INCR epoch:{SOURCE}` stamped
   on every row it writes (PostgreSQL refuses older epochs: fencing).

When the lease is held elsewhere: role `all` serves that source as `api` (its keys mirrored; one
log line names the holder); role `ingest` waits as a hot standby and takes over once the lease
has been free for a renewal period, resuming the open minutes by the restore rule.

A holder that cannot renew for `lease_ttl_ms`: role `ingest` stops the source (another process
may have taken it); role `all` keeps ingesting (availability first, the guard off) and takes the
lease again when Redis answers — unless another instance holds it by then, then it stops too.
Redis unreachable at the first attempt: role `all` ingests with epoch 0 (unfenced) and logs that
the guard is off; role `ingest` waits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import trio

from marketflow.health import describe
from marketflow.logs import rate_limited
from marketflow.ports import LeaseStore

log = logging.getLogger("marketflow.leases")

GUARD_OFF: Final = 0  # the epoch of rows written without a lease


class FileLocks:
    """Owns one lock file per source under `data_dir/locks/`, locked while held."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(data_dir) / "locks"
        self._fds: dict[str, int] = {}

    def try_lock(self, name: str) -> bool:
        """True when this process holds (or now takes) the lock of `name`."""
        if name in self._fds:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{_safe(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fds[name] = fd
        return True

    def unlock(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def unlock_all(self) -> None:
        for name in list(self._fds):
            self.unlock(name)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


TakeOver = Callable[[str, int], Awaitable[None]]
Release = Callable[[str], None]
SetEpoch = Callable[[str, int], Awaitable[None]]


class Ownership:
    """Decides, source by source, whether this process ingests it (module docstring).

    `hold(source, run)` is started in the source's own nursery by the pipeline; it runs `run`
    (the reader or generator) only while this process holds the source.
    """

    def __init__(
        self,
        *,
        store: LeaseStore | None,
        instance: str,
        role: str,
        ttl_ms: int,
        locks: FileLocks,
        take_over: TakeOver,
        give_up: Release,
        set_epoch: SetEpoch,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.store = store
        self.instance = instance
        self.role = role
        self.ttl_ms = ttl_ms
        self.renewal_s = ttl_ms / 3000
        self.locks = locks
        self.take_over = take_over
        self.give_up = give_up
        self.set_epoch = set_epoch
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.held: dict[str, int] = {}  # source -> epoch (GUARD_OFF without a lease)
        # Sources found held by another process, this one standing by for them (health):
        # source -> the holder's instance id, or None for a process on this machine.
        self.elsewhere: dict[str, str | None] = {}
        self.shutting_down = False  # set before the final flush: leases are kept until after it
        self.takeovers = 0

    @property
    def standby(self) -> bool:
        """A role-ingest process holding nothing: a hot standby (health `standby`)."""
        return self.role == "ingest" and not self.held

    async def _redis[T](self, fn: Callable[..., T], *args: object) -> T:
        assert self.store is not None
        return await trio.to_thread.run_sync(lambda: fn(*args), limiter=self.limiter)

    async def hold(self, source: str, run: Callable[[], Awaitable[None]]) -> None:
        """Acquire `source`, run it while held, wait and retry when it is held elsewhere or
        lost; until cancelled (a mode switch or the shutdown)."""
        noted: str | None = None
        try:
            while True:
                if not self.locks.try_lock(source):
                    if noted != "local":
                        what = "serving it from redis" if self.role == "all" else "standing by"
                        log.info(
                            f"source held by another process on this machine; {what}",
                            extra={"ctx": {"source": source}},
                        )
                        noted = "local"
                    self.elsewhere[source] = None
                    self.give_up(source)
                    await trio.sleep(self.renewal_s)
                    continue
                epoch = await self._acquire(source)
                if epoch is None:
                    holder = await self._holder(source)
                    if noted != holder:
                        what = "serving it from redis" if self.role == "all" else "standing by"
                        log.info(
                            f"source held by another instance; {what}",
                            extra={"ctx": {"source": source, "holder": holder}},
                        )
                        noted = holder
                    if holder is not None:  # else Redis did not answer: not a standby
                        self.elsewhere[source] = holder
                    self.locks.unlock(source)
                    self.give_up(source)
                    await self._wait_free(source)
                    continue
                noted = None
                self.elsewhere.pop(source, None)
                await self.take_over(source, epoch)
                self.held[source] = epoch
                self.takeovers += 1
                await self._run_holding(source, run)
                self.held.pop(source, None)
                self.give_up(source)
        finally:
            self.elsewhere.pop(source, None)
            if not self.shutting_down and source in self.held:
                epoch = self.held.pop(source)
                with trio.CancelScope(shield=True):
                    await self._release(source, epoch)
                self.locks.unlock(source)

    async def _acquire(self, source: str) -> int | None:
        """The new epoch; GUARD_OFF when role `all` cannot reach Redis; None when held."""
        if self.store is None:
            return GUARD_OFF
        try:
            return await self._redis(self.store.acquire_lease, source, self.instance, self.ttl_ms)
        except Exception as exc:
            if self.role == "all":
                log.warning(
                    "redis unreachable: ingesting without a lease (guard off, epoch 0)",
                    extra={"ctx": {"source": source, "error": describe(exc)}},
                )
                return GUARD_OFF
            if rate_limited(f"lease:{source}", 30.0):
                log.warning(
                    "redis unreachable: cannot take the lease; waiting",
                    extra={"ctx": {"source": source, "error": describe(exc)}},
                )
            return None

    async def _holder(self, source: str) -> str | None:
        try:
            return await self._redis(self.store.lease_holder, source) if self.store else None
        except Exception:
            return None

    async def _wait_free(self, source: str) -> None:
        """Until the lease has been free for a renewal period (a holder's last renewal may be
        in flight), polled every renewal period."""
        free_since: float | None = None
        while True:
            await trio.sleep(self.renewal_s)
            holder = await self._holder_or_error(source)
            if holder is None:
                now = trio.current_time()
                free_since = free_since if free_since is not None else now
                if now - free_since >= self.renewal_s:
                    return
            else:
                free_since = None

    async def _holder_or_error(self, source: str) -> str | bool | None:
        """The holder, None when free, False when Redis does not answer (not free)."""
        try:
            return await self._redis(self.store.lease_holder, source) if self.store else None
        except Exception:
            return False

    async def _run_holding(self, source: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run the source and renew its lease; return when the lease is lost (the source then
        stopped). Cancelled by a mode switch or the shutdown."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await self._renew(source)
            nursery.cancel_scope.cancel()
        log.warning("lease lost: source stopped", extra={"ctx": {"source": source}})

    async def _renew(self, source: str) -> None:
        """Renew every third of the TTL; return when the source must stop."""
        last_ok = trio.current_time()
        while True:
            await trio.sleep(self.renewal_s)
            if self.store is None:
                continue
            epoch = self.held.get(source, GUARD_OFF)
            try:
                if epoch != GUARD_OFF and await self._redis(
                    self.store.renew_lease, source, self.instance, self.ttl_ms
                ):
                    last_ok = trio.current_time()
                    continue
                # No lease (the guard was off), or it expired: take it again if it is free.
                new = await self._redis(
                    self.store.acquire_lease, source, self.instance, self.ttl_ms
                )
            except Exception as exc:
                if rate_limited(f"renew:{source}", 10.0):
                    log.warning(
                        "lease not renewed",
                        extra={"ctx": {"source": source, "error": describe(exc)}},
                    )
                if self.role == "ingest" and trio.current_time() - last_ok >= self.ttl_ms / 1000:
                    return  # cut off for a whole TTL: another process may hold it now
                # Role all: availability first, keep ingesting. Rows keep this epoch; fencing
                # refuses them only if another instance takes the lease meanwhile.
                continue
            if new is not None and self.role == "ingest" and epoch != GUARD_OFF:
                # Our lease expired (cut off for a while): another process may have ingested
                # meanwhile. Hand it back and start over from the restore.
                await self._release(source, new)
                return
            if new is None:
                holder = await self._holder(source)
                log.warning(
                    "lease held by another instance: source stopped",
                    extra={"ctx": {"source": source, "holder": holder}},
                )
                return
            self.held[source] = new
            await self.set_epoch(source, new)
            last_ok = trio.current_time()
            log.info(
                "lease taken again; rows carry the new epoch",
                extra={"ctx": {"source": source, "epoch": new}},
            )

    async def _release(self, source: str, epoch: int) -> None:
        if self.store is None or epoch == GUARD_OFF:
            return
        with trio.move_on_after(2):
            try:
                await self._redis(self.store.release_lease, source, self.instance)
            except Exception as exc:
                log.warning("lease not released", extra={"ctx": {"error": describe(exc)}})

    async def release_all(self) -> None:
        """After the final flush: hand every lease back at once (a standby need not wait for
        them to expire)."""
        for source, epoch in list(self.held.items()):
            await self._release(source, epoch)
        self.held.clear()
        self.locks.unlock_all()
