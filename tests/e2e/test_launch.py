"""How users launch marketflow: the command, its errors, Hypercorn's own command, stores down."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import Factory, base_config
from tests.procs import (
    PYTHON,
    Marketflow,
    TcpProxy,
    child_environment,
    free_port,
    wait_for,
    write_config,
)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "marketflow", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=child_environment(),
    )


def test_help_prints_usage_and_exits_0() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    assert "marketflow [--port <N>]" in done.stdout
    assert "simulate" in done.stdout


def test_bad_arguments_exit_2_with_one_line() -> None:
    done = run_cli("--port", "notaport")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "notaport" in done.stderr
    assert run_cli("--mode", "paper").returncode == 2


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[app]\nwindow_seconds = 'long'\n")
    done = run_cli("--config", str(path))
    assert done.returncode == 2
    assert "window_seconds" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_port_in_use_exits_1_without_traceback(tmp_path: Path, prefix: str, dbname: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = base_config(tmp_path, prefix, dbname)
        config["http"] = {"port": port}
        path = write_config(tmp_path / "c.toml", config)
        done = run_cli("--config", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_hypercorn_command_runs_the_pipeline_in_the_lifespan(
    tmp_path: Path, prefix: str, dbname: str
) -> None:
    config = base_config(tmp_path, prefix, dbname)
    port = free_port()
    config["http"] = {"port": port}
    hypercorn = str(Path(PYTHON).with_name("hypercorn"))
    mf = Marketflow(
        tmp_path,
        config,
        command=[
            hypercorn,
            "--worker-class",
            "trio",
            "--bind",
            f"127.0.0.1:{port}",
            "marketflow.asgi:create_app()",
        ],
    )
    try:
        wait_for(lambda: mf.health()["pipeline"]["updates_total"] > 50, 10, "test-mode data")
        assert mf.get("/mode").json()["mode"] == "test"
        mf.signal(signal.SIGTERM)
        assert mf.wait(15) == 0, mf.output
        assert "shutdown complete" in mf.output
    finally:
        mf.close()


def test_with_postgres_unreachable_at_start_it_waits_says_so_then_resumes(
    marketflow: Factory, dbname: str
) -> None:
    """No source starts before the stored rows of the open minutes are read (a minute resumed
    without its row would later be overwritten with fewer ticks): /health says `starting`
    (503) with PostgreSQL's error, /health/ready is 503, one clear line per retry period; once
    PostgreSQL answers, the node restores and ingests. Redis unreachable does not hold it."""
    proxy = TcpProxy(5432)
    proxy.cut()
    dead_redis = free_port()
    try:
        started = time.monotonic()
        mf = marketflow(
            {"postgres": {"port": proxy.port}, "redis": {"port": dead_redis}}, wait_ready=False
        )
        health = wait_for(
            lambda: (h := mf.health())["postgres"]["error"] and h, 10, "postgres error shown"
        )
        assert time.monotonic() - started < 15
        response = mf.get("/health")
        assert response.status_code == 503 and health["status"] == "starting"
        assert health["role"] == "all" and health["instance"]
        assert health["pipeline"]["updates_total"] == 0
        assert mf.get("/health/ready").status_code == 503
        assert mf.get("/prices/latest/BTCUSDT").status_code == 503
        wait_for(lambda: mf.health()["uptime_s"] >= 5, 15, "five seconds of retries")
        waits = [ln for ln in mf.lines if "waiting for postgres" in ln]
        assert 1 <= len(waits) <= 6, "\n".join(waits)
        assert mf.health()["pipeline"]["updates_total"] == 0  # still nothing ingested
        proxy.restore()
        wait_for(lambda: mf.health()["pipeline"]["updates_total"] > 100, 15, "ingesting")
        assert mf.get("/health/ready").status_code == 200
        health = mf.health()
        assert health["status"] == "degraded" and health["redis"]["status"] == "down"
        assert health["postgres"]["status"] == "ok"
        assert "Traceback" not in mf.output
    finally:
        proxy.close()
