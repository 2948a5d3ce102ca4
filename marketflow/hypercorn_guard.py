"""Keep one bad HTTP connection from stopping Hypercorn's whole Trio server, and a closed one
from lingering.

Hypercorn 0.18 runs each connection's `TCPServer.run` in the server's handler nursery and lets
any exception other than OSError escape from it; Trio then cancels the nursery and the server
(here: the whole marketflow process) stops. One malformed request is enough, e.g. a WebSocket
upgrade with trailing bytes (pgjones/hypercorn#225: AttributeError/LocalProtocolError) or a bad
chunk header racing the answer (BusyResourceError from `send_eof` and `send_all` at once).
Upstream's fix (pgjones/hypercorn#228) is not in a release yet; this is the same idea: the
error ends that connection only (its socket is closed by `run`'s own `finally`) and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from marketflow.health import describe
from marketflow.logs import rate_limited

log = logging.getLogger("marketflow.http")
_GUARDED = "_marketflow_guarded"


def guard_hypercorn_connections() -> None:
    """Wrap `hypercorn.trio.tcp_server.TCPServer.run` and `_read_data` once per process
    (idempotent)."""
    from hypercorn.trio.tcp_server import TCPServer

    original: Callable[[Any], Coroutine[Any, Any, None]] = TCPServer.run
    if getattr(original, _GUARDED, False):
        return
    read_data: Callable[[Any], Coroutine[Any, Any, None]] = TCPServer._read_data

    async def _read_data(self: Any) -> None:
        """When the client closes an idle keep-alive connection, Hypercorn 0.18 (trio) leaves
        the connection's keep-alive timer running, and the connection's task group waits for it:
        the socket stays in CLOSE-WAIT for `keep_alive_timeout` (30 s). A client polling with a
        new connection per request piled up one socket per request (tests/faults/test_http.py).
        Once reading has ended, nothing is left for the timer to guard: stop it."""
        try:
            await read_data(self)
        finally:
            await self.idle_task.stop()

    async def run(self: Any) -> None:
        try:
            await original(self)
        except* Exception as group:  # cancellation (a BaseException) still propagates
            if rate_limited("hypercorn-connection-error", 10.0):
                log.warning(
                    "http connection failed inside hypercorn; closed it",
                    extra={"ctx": {"error": describe(_first_leaf(group))}},
                )

    setattr(run, _GUARDED, True)
    TCPServer.run = run  # type: ignore[method-assign]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
