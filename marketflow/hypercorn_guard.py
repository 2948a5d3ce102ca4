"""Keep one bad HTTP connection from stopping Hypercorn's whole Trio server.

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
    """Wrap `hypercorn.trio.tcp_server.TCPServer.run` once per process (idempotent)."""
    from hypercorn.trio.tcp_server import TCPServer

    original: Callable[[Any], Coroutine[Any, Any, None]] = TCPServer.run
    if getattr(original, _GUARDED, False):
        return

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


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
