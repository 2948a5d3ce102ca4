from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Marketflow, postgres_database, redis_prefix

Factory = Callable[..., Marketflow]


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix() as p:
        yield p


@pytest.fixture
def dbname() -> Iterator[str]:
    with postgres_database() as name:
        yield name


def base_config(tmp_path: Path, prefix: str, dbname: str, **app: Any) -> dict[str, Any]:
    return {
        "http": {},
        "postgres": {"dbname": dbname},
        "redis": {"key_prefix": prefix},
        "app": {"data_dir": str(tmp_path / "data"), **app},
        "log": {"level": "info"},
    }


@pytest.fixture
def marketflow(tmp_path: Path, prefix: str, dbname: str) -> Iterator[Factory]:
    """Start real marketflow processes with this test's prefix and database; stop them after."""
    started: list[Marketflow] = []

    def start(config: dict[str, Any] | None = None, **kw: Any) -> Marketflow:
        cfg = base_config(tmp_path, prefix, dbname)
        for table, values in (config or {}).items():
            if isinstance(values, dict):
                cfg.setdefault(table, {}).update(values)
            else:
                cfg[table] = values
        proc = Marketflow(tmp_path, cfg, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()
