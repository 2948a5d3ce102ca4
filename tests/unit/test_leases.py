"""Ownership: a source held by another process is one this process stands by for (health)."""

from __future__ import annotations

from pathlib import Path

import trio

from marketflow.leases import FileLocks, Ownership


class OneLease:
    """A lease store holding one source for `holder` until `free()` is called."""

    def __init__(self, holder: str | None) -> None:
        self.holder = holder
        self.epoch = 0

    def acquire_lease(self, source: str, instance: str, ttl_ms: int) -> int | None:
        if self.holder not in (None, instance):
            return None
        self.holder = instance
        self.epoch += 1
        return self.epoch

    def renew_lease(self, source: str, instance: str, ttl_ms: int) -> bool:
        return self.holder == instance

    def release_lease(self, source: str, instance: str) -> None:
        if self.holder == instance:
            self.holder = None

    def lease_holder(self, source: str) -> str | None:
        return self.holder


async def test_a_source_held_elsewhere_is_stood_by_for_until_taken(tmp_path: Path) -> None:
    store = OneLease("other-instance")
    taken: list[tuple[str, int]] = []
    running = trio.Event()

    async def take_over(source: str, epoch: int) -> None:
        taken.append((source, epoch))

    async def set_epoch(source: str, epoch: int) -> None:
        pass

    async def run() -> None:
        running.set()
        await trio.sleep_forever()

    ownership = Ownership(
        store=store,
        instance="me",
        role="ingest",
        ttl_ms=30,
        locks=FileLocks(tmp_path),
        take_over=take_over,
        give_up=lambda source: None,
        set_epoch=set_epoch,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ownership.hold, "exchange2", run)
            while "exchange2" not in ownership.elsewhere:
                await trio.sleep(0.005)
            assert ownership.elsewhere == {"exchange2": "other-instance"}
            assert ownership.standby and not ownership.held
            store.holder = None  # the holder let it go
            await running.wait()
            assert ownership.elsewhere == {} and ownership.held == {"exchange2": 1}
            assert taken == [("exchange2", 1)]
            nursery.cancel_scope.cancel()
    assert store.holder is None  # released when cancelled
