"""How processes agree through Redis (contract: roles): the shared mode, each ingesting
instance's status, and mode switches asked over the `control` channel.

Ingest side (`Coordinator`, in every process that ingests): writes `status:{INSTANCE}` every
second (TTL 5 s), follows the `mode` key, and answers `control` requests by switching and
publishing the body `POST /mode/*` answers on the request's reply channel.

API side (`request_mode`): a process that ingests nothing forwards `POST /mode/*` over `control`
and answers once every live ingesting instance replied (503 after 5 s when none did).

Without Redis, none of this runs and a process keeps its own mode (contract: modes).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
import trio

from marketflow.backoff import Backoff
from marketflow.health import describe
from marketflow.live import encode_control
from marketflow.logs import rate_limited
from marketflow.models import Mode
from marketflow.ports import LiveStore
from marketflow.queries import QueryError

log = logging.getLogger("marketflow.coordination")

STATUS_INTERVAL_S: Final = 1.0
STATUS_TTL_MS: Final = 5_000
MODE_TTL_MS: Final = 10_000  # the shared mode outlives its last ingesting process by this
CONTROL_TIMEOUT_S: Final = 5.0

Switch = Callable[[Mode], Awaitable[dict[str, Any]]]


class Coordinator:
    """An ingesting instance's part in the shared state (see the module docstring)."""

    def __init__(
        self,
        store: LiveStore,
        instance: str,
        *,
        status: Callable[[], dict[str, Any]],
        mode: Callable[[], Mode],
        switch: Switch,
    ) -> None:
        self.store = store
        self.instance = instance
        self.status = status
        self.mode = mode
        self._switch_here = switch
        self.limiter = trio.CapacityLimiter(1)
        # A switch and the shared key change together: the status loop never reads the key
        # between a local switch and its announcement (it would switch back).
        self._lock = trio.Lock()

    async def switch(self, mode: Mode) -> dict[str, Any]:
        """Switch here (`POST /mode/*` on this process), then announce it to the others."""
        async with self._lock:
            body = await self._switch_here(mode)
            if body["changed"]:
                await self.announce(mode)
        return body

    async def shared_mode(self, default: Mode) -> Mode:
        """The shared mode at start: the `mode` key, written with `default` when absent; the
        default alone when Redis does not answer."""
        try:
            found = await trio.to_thread.run_sync(self.store.get_mode, limiter=self.limiter)
            if found is None:
                await trio.to_thread.run_sync(
                    self.store.set_mode, default.value, MODE_TTL_MS, limiter=self.limiter
                )
                return default
        except Exception as exc:
            log.warning(
                "redis unavailable: starting in the configured mode",
                extra={"ctx": {"mode": default.value, "error": describe(exc)}},
            )
            return default
        if found != default.value:
            log.info("following the shared mode", extra={"ctx": {"mode": found}})
        return Mode(found)

    async def announce(self, mode: Mode) -> None:
        """After a local switch: the shared key, and a request for every other instance."""
        body = encode_control(
            op="mode", mode=mode.value, id=uuid.uuid4().hex, reply="", sender=self.instance
        )
        try:
            await trio.to_thread.run_sync(
                self.store.set_mode, mode.value, MODE_TTL_MS, limiter=self.limiter
            )
            await trio.to_thread.run_sync(
                self.store.publish, self.store.control_channel, body, limiter=self.limiter
            )
        except Exception as exc:
            log.warning(
                "mode switched here, but redis did not take the shared mode",
                extra={"ctx": {"error": describe(exc)}},
            )

    async def run(self) -> None:
        """Status every second, the shared mode followed, control requests answered; forever."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._status_loop)
            nursery.start_soon(self._control_loop)

    async def _status_loop(self) -> None:
        while True:
            try:
                body = orjson.dumps(self.status())
                await trio.to_thread.run_sync(
                    self.store.write_status,
                    self.instance,
                    body,
                    STATUS_TTL_MS,
                    limiter=self.limiter,
                )
                shared = await trio.to_thread.run_sync(
                    self.store.keep_mode, self.mode().value, MODE_TTL_MS, limiter=self.limiter
                )
            except Exception as exc:
                if rate_limited("status-write", 30.0):
                    log.warning("status not written", extra={"ctx": {"error": describe(exc)}})
            else:
                if shared is not None and shared != self.mode().value:
                    await self._follow()
            await trio.sleep(STATUS_INTERVAL_S)

    async def _follow(self) -> None:
        """Switch to the shared mode, read again under the lock (it may have just changed)."""
        async with self._lock:
            try:
                shared = await trio.to_thread.run_sync(self.store.get_mode, limiter=self.limiter)
            except Exception:
                return
            if shared is not None and shared != self.mode().value:
                log.info("following the shared mode", extra={"ctx": {"mode": shared}})
                await self._switch_here(Mode(shared))

    async def _control_loop(self) -> None:
        backoff = Backoff(0.5, 5.0)
        while True:
            try:
                sub = await trio.to_thread.run_sync(
                    self.store.subscribe, self.store.control_channel
                )
            except Exception as exc:
                await trio.sleep(backoff.next())
                if rate_limited("control-subscribe", 30.0):
                    log.warning(
                        "control channel unavailable", extra={"ctx": {"error": describe(exc)}}
                    )
                continue
            backoff.reset()
            try:
                while True:
                    messages = await trio.to_thread.run_sync(sub.drain, 1.0, abandon_on_cancel=True)
                    for raw in messages:
                        await self._handle(raw)
            except Exception as exc:
                if rate_limited("control-read", 30.0):
                    log.warning("control channel lost", extra={"ctx": {"error": describe(exc)}})
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(sub.close)

    async def _handle(self, raw: bytes) -> None:
        try:
            request = orjson.loads(raw)
            op, mode, reply = request["op"], request["mode"], request.get("reply", "")
            sender = request.get("sender")
        except (ValueError, KeyError, TypeError):
            return  # not ours
        if op != "mode" or mode not in ("live", "test") or sender == self.instance:
            return
        async with self._lock:
            body = await self._switch_here(Mode(mode))
        if reply:
            answer = orjson.dumps({**body, "instance": self.instance, "id": request.get("id")})
            await trio.to_thread.run_sync(self.store.publish, reply, answer, limiter=self.limiter)


async def request_mode(
    store: LiveStore, mode: Mode, instances: Sequence[str], order: Sequence[str]
) -> dict[str, Any]:
    """Ask every live ingesting instance to switch, over `control`; the merged answer once all
    of `instances` replied (or, after 5 s, those that did). 503 when none answered."""
    request_id = uuid.uuid4().hex
    reply_channel = f"{store.control_channel}:reply:{request_id}"
    sub = await trio.to_thread.run_sync(store.subscribe, reply_channel)
    replies: dict[str, dict[str, Any]] = {}
    try:
        body = encode_control(
            op="mode", mode=mode.value, id=request_id, reply=reply_channel, sender="api"
        )
        await trio.to_thread.run_sync(store.set_mode, mode.value, MODE_TTL_MS)
        await trio.to_thread.run_sync(store.publish, store.control_channel, body)
        with trio.move_on_after(CONTROL_TIMEOUT_S):
            # Every instance known from its status, or (none known yet) the first to answer.
            while not (replies and set(instances) <= set(replies)):
                for raw in await trio.to_thread.run_sync(sub.drain, 0.25, abandon_on_cancel=True):
                    try:
                        answer = orjson.loads(raw)
                        replies[str(answer["instance"])] = answer
                    except (ValueError, KeyError, TypeError):
                        continue
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sub.close)
    if not replies:
        raise QueryError(503, "no ingest process answered")
    answers = list(replies.values())
    sources = {s for a in answers for s in a.get("sources", ())}
    return {
        "mode": mode.value,
        "previous": answers[0].get("previous", mode.value),
        "changed": any(a.get("changed") for a in answers),
        "sources": [s for s in order if s in sources],
    }
