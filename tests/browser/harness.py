"""Headless Debian chromium driven by Playwright, and a test-mode marketflow to point it at.

Playwright never downloads a browser here: it launches the system one (`CHROMIUM`) with the
flags a machine with a closed network needs (no background connections, no component updates)
and a fresh profile per launch. Used by the browser tests, `make screenshot` and the dashboard
benchmark.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.procs import Marketflow, postgres_database, redis_prefix

CHROMIUM = Path(os.environ.get("MARKETFLOW_CHROMIUM", "/usr/bin/chromium"))
MISSING = f"browser tests need Debian's chromium at {CHROMIUM}: apt-get install chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_problem() -> str | None:
    """Why the browser cannot run here (one line), or None."""
    if not CHROMIUM.exists():
        return MISSING
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "browser tests need Playwright's Python API: pip install -e '.[test]'"
    return None


def launch(playwright: Any) -> Any:
    """The system chromium, headless, with a fresh profile (Playwright makes one per launch)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )


def browser_config(tmp: Path, prefix: str, dbname: str, **tables: dict[str, Any]) -> dict[str, Any]:
    """A test-mode marketflow with its own database, key prefix and data folder."""
    config: dict[str, Any] = {
        "http": {},
        "postgres": {"dbname": dbname},
        "redis": {"key_prefix": prefix},
        "app": {"mode": "test", "data_dir": str(tmp / "data")},
        "log": {"level": "warning"},
    }
    for table, values in tables.items():
        config.setdefault(table, {}).update(values)
    return config


@contextlib.contextmanager
def marketflow_for_browser(**tables: dict[str, Any]) -> Iterator[Marketflow]:
    """A test-mode marketflow outside pytest (screenshot, benchmark); stopped and cleaned after."""
    with (
        tempfile.TemporaryDirectory(prefix="mf-browser-") as tmp,
        redis_prefix() as prefix,
        postgres_database() as dbname,
    ):
        mf = Marketflow(Path(tmp), browser_config(Path(tmp), prefix, dbname, **tables))
        try:
            yield mf
        finally:
            mf.close()
