"""The ceiling for the API benchmark: a bare ASGI app answering a fixed JSON body.

    .venv/bin/hypercorn --worker-class trio --bind 127.0.0.1:8090 benchmarks.bare_asgi:app

No framework, no routing, no per-request work beyond reading the request and writing a
constant answer of about the size of a `/prices/latest` one, on the same Hypercorn Trio worker
marketflow uses. Whatever marketflow's API loses against this is Quart and marketflow itself.
`BARE_ASGI_BODY_BYTES` sets another size (bench_candles: a thousand candles, ~160 kB).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

BODY = (
    b'{"symbol":"BTCUSDT","exchange":"exchange1","price":100152.53531348541,'
    b'"timestamp":1795646511826,"time":"2026-11-24T19:21:51.826Z"}'
)
if size := int(os.environ.get("BARE_ASGI_BODY_BYTES", "0")):
    BODY = b'{"pad":"' + b"x" * max(0, size - 10) + b'"}'

HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
