"""Placeholder: routes are registered by `register`."""

from __future__ import annotations

from quart_trio import QuartTrio

from marketflow.config import Config


def register(app: QuartTrio, config: Config) -> None:
    """Add this module's routes to `app`."""
