"""The route table and its handlers (contract: HTTP API, health).

Handlers only parse and delegate: names are checked against the config (`queries.Catalog`)
before the node is touched, so malformed or unknown input gets its 400/404 even while the node is
starting; answers come from `queries` through the read port (`ports.MarketView`); the node's
other duties (health, mode, metrics) through `ports.NodePort`.
"""

from __future__ import annotations

import hmac
from importlib.resources import files
from typing import Final

import orjson

from marketflow import dashboard, queries
from marketflow.api.http import HttpError, Reply, Request, Route, json_reply
from marketflow.candles import candle_answer, parse_candle_query
from marketflow.config import Config
from marketflow.logs import bind
from marketflow.models import Mode
from marketflow.ports import NodePort
from marketflow.queries import STATS, Catalog, Stat

PROMETHEUS: Final = b"text/plain; version=0.0.4"


class NodeRef:
    """The node the API answers for; None until the ASGI lifespan has built it."""

    def __init__(self, node: NodePort | None = None) -> None:
        self.node = node

    def ready(self) -> NodePort:
        """The node, or 503 while it is starting or stopping."""
        node = self.node
        if node is None or not node.is_ready():
            raise HttpError(503, "marketflow is starting")
        return node


def openapi_document() -> bytes:
    """The OpenAPI document shipped in the package, checked to be JSON (a broken file fails at
    start-up, not later)."""
    raw = files("marketflow.api").joinpath("openapi.json").read_bytes()
    orjson.loads(raw)
    return raw


def build_routes(config: Config, ref: NodeRef) -> list[Route]:
    """Every HTTP route of the API."""
    catalog = Catalog(config)
    window_seconds = config.app.window_seconds
    grace_ms = config.app.grace_ms
    admin = f"Bearer {config.http.admin_token}".encode() if config.http.admin_token else None
    document = openapi_document()

    async def latest_for_source(req: Request) -> Reply:
        source, symbol = catalog.source(req.params[0]), catalog.symbol(req.params[1])
        view = ref.ready().view
        if view.fallback:
            return json_reply(await queries.latest_fallback(view, [source], symbol, across=False))
        since = int(view.now() * 1000) - view.fresh_ms
        return json_reply(queries.latest_for_source(view.state, source, symbol, since))

    async def latest_across(req: Request) -> Reply:
        symbol = catalog.symbol(req.params[0])
        view = ref.ready().view
        if view.fallback:
            body = await queries.latest_fallback(view, view.sources(), symbol, across=True)
            return json_reply(body)
        since = int(view.now() * 1000) - view.fresh_ms
        return json_reply(queries.latest_across(view.state, view.sources(), symbol, since))

    def statistic(stat: Stat, *, one_source: bool) -> Route:
        async def handler(req: Request) -> Reply:
            source = catalog.source(req.params[0]) if one_source else None
            symbol = catalog.symbol(req.params[-1])
            period = catalog.period(req.query("period"))
            view = ref.ready().view
            body = await queries.statistic(
                view,
                stat=stat,
                symbol=symbol,
                sources=view.sources() if source is None else [source],
                exchange_label=source or "all",
                period=period,
                now=view.now(),
                window_seconds=window_seconds,
            )
            return json_reply(body)

        pattern = (
            f"/prices/{stat}/{{exchange}}/{{symbol}}"
            if one_source
            else f"/prices/{stat}/{{symbol}}"
        )
        return Route("GET", pattern, handler)

    def candles(*, one_source: bool) -> Route:
        async def handler(req: Request) -> Reply:
            source = catalog.source(req.params[0]) if one_source else None
            symbol = catalog.symbol(req.params[-1])
            values = req.queries()
            query = parse_candle_query(lambda name: values.get(name, []))
            view = ref.ready().view
            body = await candle_answer(
                view,
                symbol=symbol,
                sources=view.sources() if source is None else [source],
                exchange_label=source or "all",
                interval=query.interval,
                start=query.start,
                end=query.end,
                limit=query.limit,
                now=view.now(),
                window_seconds=window_seconds,
                grace_ms=grace_ms,
            )
            return json_reply(body)

        pattern = (
            "/prices/candles/{exchange}/{symbol}" if one_source else "/prices/candles/{symbol}"
        )
        return Route("GET", pattern, handler)

    async def health(req: Request) -> Reply:
        node = ref.node
        if node is None:
            return json_reply({"status": "starting"}, 503)
        body = node.health()
        return json_reply(body, 200 if body["status"] in ("ok", "standby") else 503)

    async def ready(req: Request) -> Reply:
        node = ref.node
        ok = node is not None and node.is_ready()
        return json_reply({"ready": ok}, 200 if ok else 503)

    async def metrics(req: Request) -> Reply:
        return Reply(200, ref.ready().metrics(), PROMETHEUS)

    async def get_mode(req: Request) -> Reply:
        node = ref.ready()
        return json_reply({"mode": node.mode().value, "sources": node.view.sources()})

    async def set_mode(req: Request) -> Reply:
        if admin is not None and not hmac.compare_digest(
            req.header(b"authorization") or b"", admin
        ):
            raise HttpError(401, "missing or wrong admin token")
        name = req.params[0]
        if name not in ("test", "live"):
            raise HttpError(404, f"unknown mode {name[:32]!r}: use test or live")
        node = ref.ready()
        # The sources started now outlive this request: they must not log its request id.
        with bind(request_id=None):
            return json_reply(await node.switch_mode(Mode(name)))

    async def openapi(req: Request) -> Reply:
        return Reply(200, document)

    async def dashboard_file(req: Request) -> Reply:
        found = dashboard.respond(
            req.path,
            host=req.header_text(b"host"),
            if_none_match=req.header_text(b"if-none-match"),
            accept_encoding=req.header_text(b"accept-encoding"),
        )
        if found is None:
            raise HttpError(404, "not found")
        headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in found.headers]
        content_type = dict(headers).pop(b"content-type", None)
        extra = tuple(h for h in headers if h[0] != b"content-type")
        return Reply(found.status, found.body, content_type, extra)

    operations = [
        Route("GET", "/health", health),
        Route("GET", "/health/ready", ready),
        Route("GET", "/metrics", metrics),
        Route("GET", "/mode", get_mode),
        Route("POST", "/mode/{name}", set_mode),
        Route("GET", "/openapi.json", openapi),
    ]
    return [
        *operations,
        Route("GET", "/prices/latest/{exchange}/{symbol}", latest_for_source),
        Route("GET", "/prices/latest/{symbol}", latest_across),
        *(statistic(stat, one_source=True) for stat in STATS),
        *(statistic(stat, one_source=False) for stat in STATS),
        candles(one_source=True),
        candles(one_source=False),
        Route("GET", "/", dashboard_file),
        Route("GET", "/assets/{name}", dashboard_file),
        Route("GET", "/assets/vendor/{name}", dashboard_file),
    ]
