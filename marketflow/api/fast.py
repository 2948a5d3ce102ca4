"""The hot read routes as plain ASGI, in front of the Quart app.

`GET /prices/latest/...`, `GET /prices/{highest,lowest,average}/...` and `GET /prices/candles/...`
are what dashboards poll.
Under wrk, Quart's per-request machinery (contexts, signals, Werkzeug routing, hooks, Response
objects) cost more than the answer itself (docs/performance.md), so these paths are answered here
with the very same `Catalog` checks and `queries` functions the Quart routes use; the answers,
status codes, errors and `X-Request-ID` are identical. Anything else — other methods, other
paths, a service that is not ready — passes through to Quart unchanged.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from marketflow import queries
from marketflow.candles import candle_answer, parse_candle_query
from marketflow.config import Config
from marketflow.logs import set_context
from marketflow.queries import STATS, Catalog, QueryError

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("marketflow.api")
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
_JSON = (b"content-type", b"application/json")
_ROUTES = ("latest", "candles", *STATS)


class FastRoutes:
    """ASGI callable: the read routes above answered directly, the rest delegated to `app`."""

    def __init__(self, app: Any, config: Config) -> None:
        self.app = app
        self.catalog = Catalog(config)
        self.window_seconds = config.app.window_seconds
        self.grace_ms = config.app.grace_ms

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI entry point (typed loosely: Hypercorn's scope types are TypedDicts)."""
        if scope["type"] == "http" and scope["method"] == "GET" and not _has_body(scope):
            parts = scope["path"].split("/")
            # ["", "prices", route, a] or ["", "prices", route, a, b]
            if len(parts) in (4, 5) and parts[1] == "prices" and parts[2] in _ROUTES:
                service = self.app.extensions.get("marketflow")
                if service is not None and service.ready.is_set() and all(parts[3:]):
                    await self._answer(service, scope, parts[2], parts[3:], send)
                    return
        await self.app(scope, receive, send)

    async def _answer(
        self, service: Any, scope: Scope, route: str, names: list[str], send: Send
    ) -> None:
        request_id = _request_id(scope)
        set_context(request_id=request_id)
        try:
            body = await self._body(service, scope, route, names)
            status = 200
        except QueryError as exc:
            body, status = {"error": exc.message}, exc.status
        except Exception:  # a bug: JSON 500 and a traceback, as the Quart app would give
            log.exception("unhandled error", extra={"ctx": {"path": scope["path"]}})
            body, status = {"error": "internal error"}, 500
        payload = orjson.dumps(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    _JSON,
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", request_id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _body(
        self, service: Any, scope: Scope, route: str, names: list[str]
    ) -> dict[str, Any]:
        catalog = self.catalog
        if route == "latest":
            if len(names) == 2:
                source, symbol = catalog.source(names[0]), catalog.symbol(names[1])
                return queries.latest_for_source(service.state, source, symbol)
            symbol = catalog.symbol(names[0])
            return queries.latest_across(service.state, service.pipeline.sources(), symbol)
        if len(names) == 2:
            source = catalog.source(names[0])
            sources, label = [source], source
        else:
            sources, label = service.pipeline.sources(), "all"
        symbol = catalog.symbol(names[-1])
        query = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if route == "candles":
            candles = parse_candle_query(lambda name: query.get(name, []))
            return await candle_answer(
                service,
                symbol=symbol,
                sources=sources,
                exchange_label=label,
                interval=candles.interval,
                start=candles.start,
                end=candles.end,
                limit=candles.limit,
                now=service.clock(),
                window_seconds=self.window_seconds,
                grace_ms=self.grace_ms,
            )
        period = catalog.period(query.get("period", []))
        return await queries.statistic(
            service,
            stat=route,  # type: ignore[arg-type]  # checked against STATS above
            symbol=symbol,
            sources=sources,
            exchange_label=label,
            period=period,
            now=service.clock(),
            window_seconds=self.window_seconds,
        )


def _has_body(scope: Scope) -> bool:
    """A GET that carries a body goes to Quart, whose size and time limits apply to it."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID_RE.fullmatch(value):
            return str(value.decode())
    return uuid.uuid4().hex
