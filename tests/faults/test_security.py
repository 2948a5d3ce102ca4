"""Security properties, each shown against the real process (docs/security.md maps them).

The default bind (127.0.0.1) and compose's explicit 0.0.0.0 are also checked statically in
tests/unit/test_packaging.py; here the running process is looked at.
"""

from __future__ import annotations

import ast
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.conftest import Rig, assert_healthy_process
from tests.faults.test_http import raw_status
from tests.procs import (
    PYTHON,
    REPO,
    Marketflow,
    Process,
    RawFeed,
    ScriptedFeed,
    TcpProxy,
    child_environment,
    free_port,
    postgres_database,
    redis_prefix,
    wait_for,
    write_config,
)

TOKEN = "Adm1n-T0ken-Zq77w"
PG_PASSWORD = "Pg-Passw0rd-Kx29v"
REDIS_PASSWORD = "R3dis-Passw0rd-Lm44t"
SECRETS = (TOKEN, PG_PASSWORD, REDIS_PASSWORD)


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Callable[..., dict[str, Any]]]:
    """Configs on this test's own database and key prefix (dropped afterwards), test mode."""
    with postgres_database() as dbname, redis_prefix() as prefix:

        def config(tmp: Path, **tables: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {
                "http": {},
                "postgres": {"dbname": dbname},
                "redis": {"key_prefix": prefix},
                "app": {"data_dir": str(tmp / "data")},
            }
            for table, values in tables.items():
                out.setdefault(table, {}).update(values)
            return out

        yield config


@pytest.fixture
def started(tmp_path: Path) -> Any:
    procs: list[Process] = []

    def start(config: dict[str, Any], **kw: Any) -> Marketflow:
        mf = Marketflow(tmp_path, config, **kw)
        procs.append(mf)
        return mf

    yield start
    for proc in procs:
        proc.close()


def post(mf: Marketflow, path: str, **kw: Any) -> httpx.Response:
    with httpx.Client(base_url=mf.url, timeout=10) as client:
        return client.post(path, **kw)


# --- the admin token ---------------------------------------------------------------------------


def test_admin_token_guards_mode_switches_and_nothing_else(
    tmp_path: Path, started: Any, isolated: Any
) -> None:
    mf = started(isolated(tmp_path, http={"admin_token": TOKEN}))
    refused = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix
        {"Authorization": f"Bearer {TOKEN}x"},  # an extension
        {"Authorization": f"Bearer  {TOKEN}"},
        {"Authorization": f"bearer {TOKEN.lower()}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Admin-Token": TOKEN},
    ]
    for headers in refused:
        response = post(mf, "/mode/live", headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"error": "missing or wrong admin token"}
        assert TOKEN not in response.text
        assert mf.get("/mode").json()["mode"] == "test"
    assert post(mf, f"/mode/live?token={TOKEN}").status_code == 401
    assert mf.get("/mode").json()["mode"] == "test"
    # Reads need no token.
    assert mf.get("/prices/latest/BTCUSDT").status_code in (200, 404)
    assert mf.get("/mode").status_code == 200
    right = {"Authorization": f"Bearer {TOKEN}"}
    response = post(mf, "/mode/live", headers=right)
    assert response.status_code == 200 and response.json()["changed"] is True
    assert mf.get("/mode").json()["mode"] == "live"
    assert post(mf, "/mode/live", headers=right).json()["changed"] is False
    # The feed readers started by that request outlive it: their lines carry no request id.
    failed = wait_for(
        lambda: [line for line in mf.lines if "feed connect failed" in line], 10, "feed logs"
    )
    assert all("request_id" not in line for line in failed), failed
    assert_healthy_process(mf)


# --- where it listens --------------------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for row in f:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_the_default_config_listens_on_loopback_only(
    tmp_path: Path, started: Any, isolated: Any
) -> None:
    config = isolated(tmp_path)
    assert "host" not in config["http"]
    mf = started(config)
    assert listening_addresses(mf.port) == {"0100007F"}  # 127.0.0.1, nothing else


# --- secrets -----------------------------------------------------------------------------------


def private_redis_with_another_password(port: int) -> Process:
    server = Process(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "somebody-elses-password",
        ]
    )
    wait_for(
        lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True,
        10,
        "redis-server listening",
    )
    return server


@pytest.mark.parametrize(
    ("launcher", "log_format"),
    [("marketflow", "logfmt"), ("hypercorn", "json")],
    ids=["marketflow-logfmt", "hypercorn-json"],
)
def test_secrets_never_appear_in_logs_error_bodies_or_health(
    tmp_path: Path, started: Any, isolated: Any, launcher: str, log_format: str
) -> None:
    redis_port = free_port()
    redis_server = private_redis_with_another_password(redis_port)
    feed = RawFeed()
    # PostgreSQL (trust auth: the password is sent and ignored) behind a proxy, cut once the
    # restore has read it, so its errors appear too.
    proxy = TcpProxy(5432)
    try:
        config = isolated(
            tmp_path,
            http={"admin_token": TOKEN},
            postgres={"password": PG_PASSWORD, "port": proxy.port},
            redis={"password": REDIS_PASSWORD, "port": redis_port},
            log={"level": "debug", "format": log_format},
            app={"mode": "live"},
        )
        config["exchanges"] = [{"name": "exchange1", "host": "127.0.0.1", "port": feed.port}]
        command = None
        if launcher == "hypercorn":
            port = config["http"]["port"] = free_port()
            hypercorn = str(Path(PYTHON).with_name("hypercorn"))
            command = [hypercorn, "--worker-class", "trio", "--bind", f"127.0.0.1:{port}"]
            command.append("marketflow.asgi:create_app()")
        mf = started(config, command=command)
        feed.wait_client()  # restored and running: from now on PostgreSQL may go
        proxy.cut()
        health = wait_for(
            lambda: (h := mf.health())["redis"]["error"] and h["postgres"]["error"] and h,
            10,
            "both stores failing",
        )
        answers: list[httpx.Response] = []
        with httpx.Client(base_url=mf.url, timeout=10) as client:
            for path in ("/health", "/metrics", "/mode", "/openapi.json", "/nowhere"):
                answers.append(client.get(path))
            answers.append(client.get("/prices/average/BTCUSDT?period=3650d"))
            answers.append(client.get("/prices/highest/exchange1/BTCUSDT?period=30d"))
            for auth in ("", f"Bearer {TOKEN[:-2]}", f"Bearer {PG_PASSWORD}", f"Basic {TOKEN}"):
                answers.append(client.post("/mode/live", headers={"Authorization": auth}))
            right = client.post("/mode/live", headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code == 200
            answers.append(right)
            answers.append(client.post("/mode/nope", headers={"Authorization": f"Bearer {TOKEN}"}))
            # Secrets the client itself sends: they must not end up in the logs either.
            client.get(f"/prices/latest/{PG_PASSWORD}", headers={"X-Request-ID": TOKEN})
            client.get(f"/mode?password={REDIS_PASSWORD}")
        # A feed line carrying the secrets: its excerpt is logged ("feed line rejected"), and
        # only the configured secrets' registration (cli.py, asgi.py) can mask it there.
        feed.wait_client()
        now = int(time.time() * 1000)
        feed.send_raw(
            b'{"symbol":"%s","price":1,"timestamp":%d}\n' % (" ".join(SECRETS).encode(), now)
        )
        wait_for(lambda: "feed line rejected" in mf.output, 10, "the bad line logged")
        # A few more probe and retry rounds, with their warnings.
        wait_for(lambda: mf.health()["uptime_s"] > 4, 10, "a few retry rounds")
        answers.append(mf.get("/health"))
        mf.signal(signal.SIGTERM)
        assert mf.wait(15) == 0, mf.output
    finally:
        redis_server.close()
        feed.close()
        proxy.close()
    assert health["redis"]["error"] and health["postgres"]["error"]
    rejected = [line for line in mf.lines if "feed line rejected" in line]
    assert rejected and "***" in rejected[0], rejected
    texts = [mf.output] + [r.text for r in answers]
    texts += [str({k: v for k, v in r.headers.items() if k != "x-request-id"}) for r in answers]
    for secret in SECRETS:
        for text in texts:
            assert secret not in text, (secret, text[:2000])
    assert "Traceback" not in mf.output


# --- bounded bodies and headers ----------------------------------------------------------------


def test_request_bodies_and_headers_are_bounded(
    tmp_path: Path, started: Any, isolated: Any
) -> None:
    mf = started(isolated(tmp_path))
    response = post(mf, "/mode/live", content=b"x" * 1_000_000)
    assert response.status_code == 413
    assert response.json() == {"error": "request body too large"}

    def chunks() -> Any:
        for _ in range(100):
            yield b"y" * 10_000

    response = post(mf, "/mode/live", content=chunks())
    assert response.status_code == 413 and response.json()["error"] == "request body too large"
    # A chunked body that never finishes is given BODY_TIMEOUT_S (5 s), then 408.
    with socket.create_connection(("127.0.0.1", mf.port), timeout=15) as sock:
        sock.sendall(
            b"POST /mode/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        started_at = time.monotonic()
        answer = sock.recv(4096)
        waited = time.monotonic() - started_at
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 4 < waited < 10, waited
    assert mf.get("/mode").json()["mode"] == "test"  # none of them switched the mode
    # Request line and headers: h11_max_incomplete_size (16 KiB) while they are incomplete.
    with httpx.Client(base_url=mf.url, timeout=10) as client:
        try:
            refused = client.get("/health", headers={"X-Big": "a" * 100_000}).status_code
        except httpx.RemoteProtocolError:
            refused = 0  # closed without an answer: refused too
    assert refused in (0, 400, 431)
    assert mf.get("/health").status_code in (200, 503)
    assert_healthy_process(mf)


# --- names that become Redis keys --------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "marketflow", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=child_environment(),
    )


@pytest.mark.parametrize(
    "config",
    [
        {"exchanges": [{"name": "ex:1", "host": "127.0.0.1", "port": 1}]},
        {"exchanges": [{"name": "a}b", "host": "127.0.0.1", "port": 1}]},
        {"exchanges": [{"name": "../x", "host": "127.0.0.1", "port": 1}]},
        {"exchanges": [{"name": "x y", "host": "127.0.0.1", "port": 1}]},
        {"exchanges": [{"name": "a" * 33, "host": "127.0.0.1", "port": 1}]},
        {"exchanges": [{"name": "", "host": "127.0.0.1", "port": 1}]},
        {"test": {"sources": ["test*"]}},
        {"app": {"symbols": ["BTC}USDT"]}},
        {"app": {"symbols": ["btcusdt"]}},
        {"app": {"symbols": ["BTC\nUSDT"]}},
    ],
    ids=[
        "colon",
        "brace",
        "dots",
        "space",
        "too-long",
        "empty",
        "glob",
        "sym-brace",
        "lower",
        "nl",
    ],
)
def test_config_with_unsafe_names_is_refused(tmp_path: Path, config: dict[str, Any]) -> None:
    path = write_config(tmp_path / "bad.toml", config)
    done = run_cli("--config", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# Data keys carry a validated source and symbol, leases and epochs a validated source, status
# keys the instance id (host-pid-hex, sanitised); the rest are constants.
KEY_RE = re.compile(
    r"^(latest|window|meta):\{[A-Za-z0-9_-]{1,32}:[A-Z0-9]{2,20}\}$"
    r"|^(lease|epoch):\{[A-Za-z0-9_-]{1,32}\}$"
    r"|^status:[A-Za-z0-9_.-]+-[0-9]+-[0-9a-f]{6}$"
    r"|^(health:probe|mode)$"
)


def test_redis_keys_come_only_from_validated_names(rig: Rig) -> None:
    feed = rig.own(ScriptedFeed())
    quiet = rig.counting_feeds(2, 20)
    mf = rig.start(rig.config([feed, *quiet]))
    feed.wait_client()
    now = int(time.time() * 1000)
    evil = [
        "BTCUSDT}",
        "{x:y}",
        "BTCUSDT\r\nFLUSHALL",
        "*",
        "latest:{exchange1:BTCUSDT}",
        "BTC USDT",
        "btcu\u017fdt",
        "X" * 5000,
    ]
    feed.send([(s, 1.0, now) for s in evil] + [("btcusdt", 2.0, now), ("ETHUSDT", 3.0, now)])
    wait_for(lambda: mf.health()["sources"]["exchange1"]["messages"] == 2, 10, "good lines")
    src = mf.health()["sources"]["exchange1"]
    assert src["rejected_by_reason"]["unknown_symbol"] == len(evil)
    with rig.redis_client() as r:
        wait_for(lambda: r.exists("latest:{exchange1:BTCUSDT}"), 5, "flushed")
        keys = list(r.scan_iter(count=1000))
    assert keys and all(KEY_RE.fullmatch(k) for k in keys), keys
    assert {k for k in keys if "exchange1" in k and not k.startswith("meta:")} == {
        "latest:{exchange1:BTCUSDT}",
        "latest:{exchange1:ETHUSDT}",
        "window:{exchange1:BTCUSDT}",
        "window:{exchange1:ETHUSDT}",
        "lease:{exchange1}",
        "epoch:{exchange1}",
    }


# --- SQL ---------------------------------------------------------------------------------------


def test_sql_reaches_postgres_only_through_parameters() -> None:
    """No statement is built from data: every execute() gets a constant, a packaged migration
    script, psycopg's sql.SQL composition with sql.Identifier, or an entry of a statement table
    built once at import from the module's own templates (CANDLE_SQL: no request can reach it);
    values go as parameters."""
    from marketflow.store import postgres

    path = REPO / "marketflow" / "store" / "postgres.py"
    tree = ast.parse(path.read_text())
    constants = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, str)
    }
    tables = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.DictComp)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert tables == {"CANDLE_SQL"}
    for text in postgres.CANDLE_SQL.values():  # complete statements, parameters left to psycopg
        assert isinstance(text, str) and "{" not in text and "%(limit)s" in text
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("execute", "executemany")
        and node.args
    ]
    assert len(calls) >= 8
    for call in calls:
        statement = call.args[0]
        text = ast.unparse(statement)
        if isinstance(statement, ast.Constant):
            assert isinstance(statement.value, str), text
        elif isinstance(statement, ast.Name):
            assert statement.id in constants, text
        elif isinstance(statement, ast.Attribute):
            assert text == "migration.script", text  # the packaged sql/NNNN_*.sql files
        elif isinstance(statement, ast.Subscript):
            assert isinstance(statement.value, ast.Name) and statement.value.id in tables, text
        else:
            assert text.startswith("sql.SQL(") and "sql.Identifier(" in text, text
        assert not any(isinstance(n, ast.JoinedStr | ast.BinOp) for n in ast.walk(statement))


# --- a WebSocket upgrade with trailing bytes (pgjones/hypercorn#225) ------------------------------

UPGRADE_WITH_TRAILING_BYTES = (
    b"GET /ws/prices HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: bKdPyn3u98cTfZJSh4TNeQ==\r\n\r\nx\r\n"
)


def test_a_malformed_websocket_upgrade_does_not_stop_the_server(
    tmp_path: Path, started: Any, isolated: Any
) -> None:
    """Before marketflow/hypercorn_guard.py, the first such request ended the process (exit 1)."""
    mf = started(isolated(tmp_path))
    for _ in range(5):
        status = raw_status(mf.port, UPGRADE_WITH_TRAILING_BYTES)
        assert status is None or status < 500
    assert mf.proc.poll() is None, mf.output
    assert mf.get("/health").status_code in (200, 503)
    ticks = mf.health()["pipeline"]["updates_total"]
    wait_for(lambda: mf.health()["pipeline"]["updates_total"] > ticks, 5, "ingest goes on")


def test_a_malformed_websocket_upgrade_logs_no_traceback(
    tmp_path: Path, started: Any, isolated: Any
) -> None:
    mf = started(isolated(tmp_path))
    raw_status(mf.port, UPGRADE_WITH_TRAILING_BYTES)
    wait_for(lambda: mf.get("/health").status_code in (200, 503), 5, "answering")
    assert "unhandled error" not in mf.output and "Traceback" not in mf.output
