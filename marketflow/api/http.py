"""The HTTP front: one route table, answered as plain ASGI; everything else goes to Quart-Trio.

Every HTTP request — the hot price reads and the rest alike — goes through `HttpApp`, so a
request id, a body limit, an error shape or an access log line can never miss a route:

- `X-Request-ID` is taken from the request when it is a safe token (else generated), bound to
  the log context, and echoed on every answer;
- a body is refused when announced over `MAX_BODY_BYTES` (413), and a chunked one is read here,
  capped in size and time (413 / 408), since no endpoint reads a body;
- an unknown path is 404, a known path with another method 405 with `Allow`, HEAD answers as GET
  without the body; a `HttpError` (or `queries.QueryError`) is its status with `{"error": ...}`;
  anything else is a bug: a JSON 500 and a logged traceback;
- at debug level, one access-log line per request.

WebSocket connections and the ASGI lifespan are Quart-Trio's (`api/app.py`): Quart's
per-request machinery costs more than the answers themselves (docs/performance.md), so the
route table is answered here, in front of it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qs

import attrs
import orjson
import trio

from marketflow.logs import bind
from marketflow.queries import QueryError

log = logging.getLogger("marketflow.http")

MAX_BODY_BYTES: Final = 16 * 1024
BODY_TIMEOUT_S: Final = 5.0  # a chunked body must arrive within this (slow uploads hold no socket)
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
JSON: Final = b"application/json"

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class HttpError(QueryError):
    """An answer other than 200, with its JSON error message (and extra headers)."""

    def __init__(
        self, status: int, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(status, message)
        self.headers = list(headers)


@attrs.frozen(slots=True)
class Request:
    """What a handler sees of a request: method, path parameters, query string and headers."""

    method: str
    path: str
    params: tuple[str, ...]
    query_string: bytes
    headers: Sequence[tuple[bytes, bytes]]
    request_id: str

    def query(self, name: str) -> list[str]:
        """Every value of query parameter `name` (blank values kept: `?period` is `[""]`)."""
        return self.queries().get(name, []) if self.query_string else []

    def queries(self) -> dict[str, list[str]]:
        """Every query parameter with every value (for a handler that reads several)."""
        if not self.query_string:
            return {}
        return parse_qs(self.query_string.decode("latin-1"), keep_blank_values=True)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_text(self, name: bytes) -> str | None:
        value = self.header(name)
        return None if value is None else value.decode("latin-1")


@attrs.frozen(slots=True)
class Reply:
    """An answer; `content_type` None leaves the header out (a 304), `headers` are extra."""

    status: int
    body: bytes
    content_type: bytes | None = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_reply(body: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(body))


Handler = Callable[[Request], Awaitable[Reply]]


@attrs.frozen
class Route:
    """`GET /prices/latest/{exchange}/{symbol}` -> handler; `{...}` is one path segment."""

    method: str
    pattern: str
    handler: Handler
    segments: tuple[str | None, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        parts = tuple(
            None if part.startswith("{") and part.endswith("}") else part
            for part in self.pattern.split("/")[1:]
        )
        object.__setattr__(self, "segments", parts)


class Router:
    """Matches a path against the route table: literal segments equal, `{param}` non-empty."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._by_length: dict[int, list[Route]] = {}
        for route in self.routes:
            self._by_length.setdefault(len(route.segments), []).append(route)

    def match(self, path: str) -> tuple[dict[str, Handler], tuple[str, ...]] | None:
        """The handlers by method of the first pattern `path` matches, and its parameters."""
        parts = path.split("/")[1:]
        found: dict[str, Handler] = {}
        params: tuple[str, ...] | None = None
        for route in self._by_length.get(len(parts), ()):
            got = _match(route.segments, parts)
            if got is None or (params is not None and got != params):
                continue
            if params is None:
                params = got
            found.setdefault(route.method, route.handler)
        return None if params is None else (found, params)


def _match(segments: tuple[str | None, ...], parts: list[str]) -> tuple[str, ...] | None:
    params: list[str] = []
    for want, got in zip(segments, parts, strict=True):
        if want is None:
            if not got:
                return None
            params.append(got)
        elif want != got:
            return None
    return tuple(params)


class HttpApp:
    """The ASGI application: HTTP through the route table, the rest to `fallback`."""

    def __init__(self, router: Router, fallback: ASGIApp) -> None:
        self.router = router
        self.fallback = fallback

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope["headers"])
        with bind(request_id=request_id):
            status = await self._answer(scope, receive, send, request_id)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "http request",
                    extra={
                        "ctx": {
                            "method": scope["method"],
                            "path": scope["path"][:200],
                            "status": status,
                            "ms": round((time.perf_counter() - started) * 1000, 2),
                        }
                    },
                )

    async def _answer(self, scope: Any, receive: Any, send: Any, request_id: str) -> int:
        method: str = scope["method"]
        path: str = scope["path"]
        head = method == "HEAD"
        try:
            await _bound_body(scope["headers"], receive)
            matched = self.router.match(path)
            if matched is None:
                raise HttpError(404, "not found")
            handlers, params = matched
            handler = handlers.get("GET" if head else method)
            if handler is None:
                allowed = ", ".join(sorted({*handlers, *(("HEAD",) if "GET" in handlers else ())}))
                raise HttpError(405, "method not allowed", [(b"allow", allowed.encode())])
            request = Request(
                method, path, params, scope["query_string"], scope["headers"], request_id
            )
            reply = await handler(request)
        except QueryError as exc:
            extra = exc.headers if isinstance(exc, HttpError) else []
            reply = Reply(exc.status, orjson.dumps({"error": exc.message}), headers=tuple(extra))
        except Exception:
            log.exception("unhandled error", extra={"ctx": {"path": path[:200]}})
            reply = Reply(500, b'{"error":"internal error"}')
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    *(
                        ()
                        if reply.content_type is None
                        else [(b"content-type", reply.content_type)]
                    ),
                    (b"content-length", str(len(reply.body)).encode()),
                    (b"x-request-id", request_id.encode()),
                    *reply.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head else reply.body})
        return reply.status


async def _bound_body(headers: Sequence[tuple[bytes, bytes]], receive: Any) -> None:
    """No endpoint reads a body: refuse an announced oversized one at once, and read a chunked
    one here, capped in size and time, so a slow upload cannot hold a socket."""
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise HttpError(400, "bad content-length") from None
            if length > MAX_BODY_BYTES:
                raise HttpError(413, "request body too large")
            return
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return
    received = 0
    with trio.move_on_after(BODY_TIMEOUT_S) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HttpError(400, "request body incomplete")
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise HttpError(413, "request body too large")
            if not message.get("more_body", False):
                return
    if scope.cancelled_caught:
        raise HttpError(408, "request body too slow")


def _request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and _REQUEST_ID_RE.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex
