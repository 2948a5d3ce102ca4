"""The Quart-Trio application (contract: HTTP API, health): JSON everywhere, X-Request-ID on every
answer."""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from typing import Any

import orjson
import trio
from quart import Response, g, has_websocket_context, request, websocket
from quart.wrappers.base import ClientDisconnectedError
from quart_trio import QuartTrio
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, RequestTimeout

from marketflow.config import Config
from marketflow.logs import bind, set_context
from marketflow.models import Mode
from marketflow.service import Service

log = logging.getLogger("marketflow.api")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_BODY_BYTES = 16 * 1024
BODY_TIMEOUT_S = 5.0  # a chunked body must arrive within this (slow uploads hold no socket)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def service_of(app: Any) -> Service:
    service: Service | None = app.extensions.get("marketflow")
    if service is None or not service.ready.is_set():
        raise ServiceUnavailable("marketflow is starting")
    return service


class ServiceUnavailable(Exception):
    """No store (and no memory) can answer right now: 503."""


class ClientError(Exception):
    """Client input was refused: 400/401/404 with a JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_app(config: Config, *, service: Service | None) -> QuartTrio:
    """Build the app. With `service=None` the ASGI lifespan creates and owns the service
    (Hypercorn's own command); otherwise the caller runs it (the `marketflow` command)."""
    app = QuartTrio("marketflow")
    # `//` in a path is a 404 like any other unknown path, not an HTML 308 redirect.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = config.app.shutdown_timeout_s + 1
    app.config["marketflow_config"] = config
    app.extensions["marketflow"] = service

    if service is None:

        @app.before_serving
        async def start_service() -> None:
            owned = Service(config)
            app.extensions["marketflow"] = owned
            await app.nursery.start(owned.run)

        @app.after_serving
        async def stop_service() -> None:
            owned: Service = app.extensions["marketflow"]
            owned.stop()
            await owned.finished.wait()

    @app.before_request
    async def assign_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        set_context(request_id=g.request_id)

    @app.before_request
    async def bound_body() -> None:
        """No endpoint reads a body, so Quart's MAX_CONTENT_LENGTH (checked only on read) never
        fired and a 1 MB POST was served: refuse an announced oversized body at once, and read a
        chunked one here, capped in size and time."""
        length = request.content_length
        if length is not None:
            if length > MAX_BODY_BYTES:
                raise RequestEntityTooLarge()
            return
        if "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
            return
        received = 0
        with trio.move_on_after(BODY_TIMEOUT_S) as scope:
            try:
                async for chunk in request.body:
                    received += len(chunk)
                    if received > MAX_BODY_BYTES:
                        raise RequestEntityTooLarge()
            except ClientDisconnectedError:
                raise BadRequest("request body incomplete") from None
        if scope.cancelled_caught:
            raise RequestTimeout()

    @app.after_request
    async def add_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = getattr(g, "request_id", None) or uuid.uuid4().hex
        return response

    @app.errorhandler(ClientError)
    async def client_error(exc: ClientError) -> Response:
        return error(exc.status, exc.message)

    @app.errorhandler(ServiceUnavailable)
    async def unavailable(exc: ServiceUnavailable) -> Response:
        return error(503, str(exc))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        messages = {
            404: "not found",
            405: "method not allowed",
            408: "request body too slow",
            413: "request body too large",
        }
        status = exc.code or 500
        response = error(status, messages.get(status, exc.description or exc.name))
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        path = websocket.path if has_websocket_context() else request.path
        log.exception("unhandled error", extra={"ctx": {"path": path}})
        return error(500, "internal error")

    @app.get("/health")
    async def health() -> Response:
        svc = app.extensions.get("marketflow")
        if svc is None or not svc.ready.is_set():
            return json_response({"status": "starting"}, 503)
        body = svc.health()
        return json_response(body, 200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        svc = service_of(app)
        return Response(svc.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/mode")
    async def get_mode() -> Response:
        svc = service_of(app)
        return json_response({"mode": svc.pipeline.mode.value, "sources": svc.pipeline.sources()})

    @app.post("/mode/<name>")
    async def set_mode(name: str) -> Response:
        check_admin(config)
        if name not in ("test", "live"):
            raise ClientError(404, f"unknown mode {name[:32]!r}: use test or live")
        svc = service_of(app)
        if svc.stopping.is_set():
            raise ServiceUnavailable("marketflow is shutting down")
        # The sources started now outlive this request: they must not log its request id.
        with bind(request_id=None):
            previous, changed = await svc.switch_mode(Mode(name))
        return json_response(
            {
                "mode": name,
                "previous": previous.value,
                "changed": changed,
                "sources": svc.pipeline.sources(),
            }
        )

    @app.get("/")
    @app.get("/assets/<path:name>")
    async def dashboard(name: str = "") -> Response:
        """Temporary: the route table will call `marketflow.dashboard.respond` directly."""
        from marketflow.dashboard import respond

        reply = respond(
            request.path,
            host=request.headers.get("Host"),
            if_none_match=request.headers.get("If-None-Match"),
            accept_encoding=request.headers.get("Accept-Encoding"),
        )
        if reply is None:
            raise ClientError(404, "not found")
        headers = dict(reply.headers)
        content_type = headers.pop("Content-Type", None)
        return Response(reply.body, reply.status, headers, content_type=content_type)

    register_routes(app, config)
    return app


def check_admin(config: Config) -> None:
    token = config.http.admin_token
    if not token:
        return
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ClientError(401, "missing or wrong admin token")


def register_routes(app: QuartTrio, config: Config) -> None:
    """Price, statistics, WebSocket and OpenAPI routes live in their own modules."""
    from marketflow.api import docs, prices, ws

    docs.register(app, config)
    prices.register(app, config)
    ws.register(app, config)
