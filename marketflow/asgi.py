"""Entry point for Hypercorn's own command:

    MARKETFLOW_CONFIG=config.toml hypercorn --worker-class trio 'marketflow.asgi:create_app()'

The ASGI lifespan owns the node here: startup builds and starts it in the app's nursery,
shutdown drains it exactly as the `marketflow` command does.
"""

from __future__ import annotations

import os

from marketflow.api.app import create_app as _create_api
from marketflow.api.http import HttpApp
from marketflow.app import build_node
from marketflow.config import config_path, load_config
from marketflow.hypercorn_guard import guard_hypercorn_connections
from marketflow.logs import configure_logging


def create_app() -> HttpApp:
    config = load_config(config_path(None, os.environ))
    configure_logging(config.log.level, config.log.format, secrets=config.secrets)
    guard_hypercorn_connections()
    return _create_api(config, node_factory=lambda: build_node(config))
