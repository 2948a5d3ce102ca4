"""`GET /openapi.json`: the OpenAPI 3.1 document shipped inside the package."""

from __future__ import annotations

from importlib.resources import files

import orjson
from quart import Response
from quart_trio import QuartTrio

from marketflow.config import Config


def openapi_document() -> bytes:
    """The document's bytes, checked to be JSON (a broken file fails at start-up, not later)."""
    raw = files("marketflow.api").joinpath("openapi.json").read_bytes()
    orjson.loads(raw)
    return raw


def register(app: QuartTrio, config: Config) -> None:
    document = openapi_document()

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(document, content_type="application/json")
