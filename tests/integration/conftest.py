"""Integration fixtures: a real PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from marketflow.config import PostgresConfig

PG_SERVER = PostgresConfig(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")


def admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    c = PG_SERVER
    return psycopg.connect(
        host=c.host, port=c.port, user=c.user, dbname="postgres", autocommit=True, connect_timeout=2
    )


@pytest.fixture
def pg_missing_config() -> Iterator[PostgresConfig]:
    """A PostgresConfig naming a database that does not exist yet; dropped afterwards if made."""
    name = f"mf_test_{uuid.uuid4().hex[:12]}"
    yield PostgresConfig(host=PG_SERVER.host, port=PG_SERVER.port, user=PG_SERVER.user, dbname=name)
    with admin_connection() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def pg_config(pg_missing_config: PostgresConfig) -> PostgresConfig:
    """A PostgresConfig pointing at a fresh, empty database of its own, dropped afterwards."""
    with admin_connection() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(pg_missing_config.dbname)))
    return pg_missing_config
