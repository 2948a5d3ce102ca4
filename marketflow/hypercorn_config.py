"""Hypercorn's own command with the `marketflow` command's server settings:

    MARKETFLOW_CONFIG=config.toml hypercorn --config python:marketflow.hypercorn_config \\
        --worker-class trio --workers 2 'marketflow.asgi:create_app()'

Hypercorn reads this module's names as its settings: the bind address from `[http]` host and
port, the timeouts, message and body limits and the WebSocket ping of `app.hypercorn_settings`.
With several workers each one is a marketflow process: leases and file locks make one of them
ingest each source and the others serve it as `api` (docs/architecture.md).
"""

from __future__ import annotations


def _settings() -> dict[str, object]:
    import os

    from marketflow.app import hypercorn_settings
    from marketflow.config import config_path, load_config

    return hypercorn_settings(load_config(config_path(None, os.environ)))


globals().update(_settings())
