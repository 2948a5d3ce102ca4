"""Price, statistics and candle routes (contract: HTTP API). Handlers only parse and delegate
to `queries` and `candles`.

Every name is checked against the config before the service is touched, so malformed or
unknown input gets its 400/404 even while the service is starting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from quart import Response, request
from quart_trio import QuartTrio

from marketflow import queries
from marketflow.api.app import error, json_response, service_of
from marketflow.candles import candle_answer, parse_candle_query
from marketflow.config import Config
from marketflow.queries import STATS, Catalog, QueryError, Stat


def register(app: QuartTrio, config: Config) -> None:
    """Add the latest-price and statistics routes and the `QueryError` handler to `app`."""
    catalog = Catalog(config)
    window_seconds = config.app.window_seconds

    @app.errorhandler(QueryError)
    async def query_error(exc: QueryError) -> Response:
        return error(exc.status, exc.message)

    @app.get("/prices/latest/<exchange>/<symbol>")
    async def latest_for_source(exchange: str, symbol: str) -> Response:
        source = catalog.source(exchange)
        sym = catalog.symbol(symbol)
        service = service_of(app)
        return json_response(queries.latest_for_source(service.state, source, sym))

    @app.get("/prices/latest/<symbol>")
    async def latest_across(symbol: str) -> Response:
        sym = catalog.symbol(symbol)
        service = service_of(app)
        return json_response(queries.latest_across(service.state, service.pipeline.sources(), sym))

    def statistic_routes(stat: Stat) -> None:
        async def one_source(exchange: str, symbol: str) -> Response:
            source = catalog.source(exchange)
            return await answer(stat, symbol, [source], source)

        async def across(symbol: str) -> Response:
            return await answer(stat, symbol, None, "all")

        _route(app, f"/prices/{stat}/<exchange>/<symbol>", f"{stat}_for_source", one_source)
        _route(app, f"/prices/{stat}/<symbol>", f"{stat}_across", across)

    async def answer(
        stat: Stat, symbol: str, sources: list[str] | None, exchange_label: str
    ) -> Response:
        sym = catalog.symbol(symbol)
        period = catalog.period(request.args.getlist("period"))
        service = service_of(app)
        body = await queries.statistic(
            service,
            stat=stat,
            symbol=sym,
            sources=service.pipeline.sources() if sources is None else sources,
            exchange_label=exchange_label,
            period=period,
            now=service.clock(),
            window_seconds=window_seconds,
        )
        return json_response(body)

    for stat in STATS:
        statistic_routes(stat)

    async def candles_for_source(exchange: str, symbol: str) -> Response:
        source = catalog.source(exchange)
        return await candle_route(symbol, [source], source)

    async def candles_across(symbol: str) -> Response:
        return await candle_route(symbol, None, "all")

    async def candle_route(symbol: str, sources: list[str] | None, label: str) -> Response:
        sym = catalog.symbol(symbol)
        query = parse_candle_query(request.args.getlist)
        service = service_of(app)
        body = await candle_answer(
            service,
            symbol=sym,
            sources=service.pipeline.sources() if sources is None else sources,
            exchange_label=label,
            interval=query.interval,
            start=query.start,
            end=query.end,
            limit=query.limit,
            now=service.clock(),
            window_seconds=window_seconds,
            grace_ms=config.app.grace_ms,
        )
        return json_response(body)

    _route(app, "/prices/candles/<exchange>/<symbol>", "candles_for_source", candles_for_source)
    _route(app, "/prices/candles/<symbol>", "candles_across", candles_across)


def _route(
    app: QuartTrio, rule: str, endpoint: str, handler: Callable[..., Awaitable[Response]]
) -> None:
    app.add_url_rule(rule, endpoint, handler, methods=["GET"])
