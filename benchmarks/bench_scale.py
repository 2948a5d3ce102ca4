"""The scale model (docs/scaling.md): unit costs measured here, the model's predictions for a run
of `marketflow simulate` feeds through two ingest processes, and that run's measurements.

    .venv/bin/python -m benchmarks.bench_scale [--feeds 10] [--symbols 100] [--rates 2000,10000]
        [--seconds 120] [--ingest-per-core N] [--calibrate-keys 1000]

1. Unit costs, measured in this process against a private redis-server and a database of its own:
   - Redis per key-flush (one key's changes in one flush): `--calibrate-keys` owned keys get
     ticks spread over each 100 ms step of a simulated clock and are flushed by the real
     `RedisFlusher` and `RedisPriceStore`, while one subscriber follows `updates` as an api
     process does. Around the flushes: INFO commandstats (calls per command),
     total_net_input_bytes / total_net_output_bytes, the redis-server's CPU (/proc) and this
     process's CPU in the flushes (the ingest side's cost of a flush). The captured `updates`
     messages are then applied by a `Mirror`: an api process's CPU per key-flush.
   - PostgreSQL: 60 minutes of 1,000 keys upserted through the store in batches of 200
     (`db_batch_size`); pg_total_relation_size of `aggregates` and of the hourly rollup per
     minute row, and the write time per row.
   - Ingest per update: `--ingest-per-core` (updates/s one core folds: bench_ingest at `max`),
     by default the figure recorded in docs/performance.json.
2. The run: `marketflow simulate` serving `--feeds` feeds of `--symbols` symbols at `--rate`
   lines/s each, read by two `ingest` processes (the first half of the feeds, the second half),
   plus one `api` process mirroring every key, all on a private redis-server (its INFO counts
   nothing else) and one database. After a warm-up, over `--seconds`: updates/s folded,
   Redis commands/s and bytes/s, PostgreSQL rows written per closed minute, CPU per process.
3. The model's predictions for that load next to the measurements, and the model for the target
   deployment (100 exchanges x 1,000 symbols at 1,000,000 updates/s).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis
import trio

from benchmarks.common import (
    cpu_seconds,
    emit,
    folded,
    loadavg,
    progress,
    scrape,
    stop,
)
from marketflow.config import PostgresConfig, RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.mirror import Mirror
from marketflow.models import Key, MinuteRow, Mode
from marketflow.ports import FlushPlan
from marketflow.state import MarketState
from marketflow.store.postgres import PostgresAggregateStore
from marketflow.store.redis import RedisPriceStore
from tests.procs import (
    REPO,
    Marketflow,
    RedisServer,
    Simulator,
    postgres_database,
    wait_for,
)

FLUSH_S = 0.1  # flush_interval_ms, the default
WINDOW_S = 300
GRACE_S = 2.0
TARGET = {"exchanges": 100, "symbols": 1000, "updates_per_s": 1_000_000}
# What one Redis node may spend: its command thread is one core; plan at half of it (room for
# the mirrors' full reads, take-overs' restores, replication and persistence).
REDIS_CORE_BUDGET = 0.5
# Network per node, an assumption (not measurable on loopback): a 10 Gbit/s NIC, half of it.
NIC_BYTES_PER_S = 10e9 / 8 * 0.5
YEAR_S = 365 * 86400


# --- unit costs ----------------------------------------------------------------------------------


def redis_info(r: redis.Redis) -> dict[str, Any]:
    info = r.info("all")
    commands = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in info.items()
        if name.startswith("cmdstat_")
    }
    return {
        "commands": commands,
        "in": int(info["total_net_input_bytes"]),
        "out": int(info["total_net_output_bytes"]),
        "total_commands": int(info["total_commands_processed"]),
    }


def info_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    names = set(before["commands"]) | set(after["commands"])
    commands = {
        n: after["commands"].get(n, 0) - before["commands"].get(n, 0)
        for n in names
        if n not in ("info",)
    }
    return {
        "commands": {n: c for n, c in commands.items() if c},
        "in": after["in"] - before["in"],
        "out": after["out"] - before["out"],
        "total_commands": after["total_commands"] - before["total_commands"],
    }


class RecordingStore:
    """The price store, keeping each flush's `updates` message (for the mirror's share)."""

    def __init__(self, inner: RedisPriceStore) -> None:
        self.inner = inner
        self.messages: list[bytes] = []

    def write(self, plan: FlushPlan) -> None:
        if plan.message is not None:
            self.messages.append(plan.message)
        self.inner.write(plan)


def calibrate_redis(n_keys: int, flushes: int, ticks_per_key_flush: int) -> dict[str, Any]:
    """Per key-flush: Redis commands, bytes in and out, redis-server CPU, the flusher's CPU, and
    a mirror's CPU applying the `updates` messages."""
    server = RedisServer()
    prefix = "calibrate:"
    keys: list[Key] = [(f"exchange{i // 100 + 1}", f"SYM{i % 100:03d}USDT") for i in range(n_keys)]
    try:
        store = RedisPriceStore(
            RedisConfig(port=server.port, key_prefix=prefix, timeout_ms=5000),
            window_seconds=WINDOW_S,
            ttl_seconds=70,
        )
        recording = RecordingStore(store)
        # One subscriber in a process of its own, as an api process follows `updates`.
        subscriber = subprocess.Popen(
            ["redis-cli", "-p", str(server.port), "subscribe", f"{prefix}updates"],
            stdout=subprocess.DEVNULL,
        )
        r = redis.Redis(port=server.port)
        wait_for(lambda: r.pubsub_numsub(f"{prefix}updates")[0][1] == 1, 10, "subscribed")
        state = MarketState(WINDOW_S, owned_by_default=True)
        clock = [time.time()]
        flusher = RedisFlusher(
            state,
            recording,  # type: ignore[arg-type]
            StoreHealth("redis"),
            Metrics(),
            interval_s=FLUSH_S,
            instance="calibrate",
            mode=lambda: "live",
            clock=lambda: clock[0],
        )
        step_ms = FLUSH_S * 1000 / ticks_per_key_flush

        def fold_step(i: int) -> None:
            start_ms = int(clock[0] * 1000)
            for j, (source, symbol) in enumerate(keys):
                # Full-precision prices, as a random walk has (their text is most of a member).
                price = 100.0 * (1 + ((i * 7919 + j * 104729) % 100_003) / 10_000_019)
                ticks = [
                    (symbol, price, start_ms + int(k * step_ms)) for k in range(ticks_per_key_flush)
                ]
                state.key(source, symbol).fold(ticks)
            clock[0] += FLUSH_S

        async def flush_all() -> tuple[float, float]:
            # The first flushes write each key's meta once: warm up past them.
            for i in range(5):
                fold_step(i)
                await flusher.flush()
            recording.messages.clear()
            marks["info"] = redis_info(r)
            marks["server_cpu"] = cpu_seconds(server.proc.pid)
            spent = 0.0
            wall = 0.0
            for i in range(flushes):
                fold_step(i + 5)
                c0, w0 = time.process_time(), time.perf_counter()
                await flusher.flush()
                spent += time.process_time() - c0
                wall += time.perf_counter() - w0
            return spent, wall

        marks: dict[str, Any] = {}
        flusher_cpu, flusher_wall = trio.run(flush_all)
        server_cpu = cpu_seconds(server.proc.pid) - marks["server_cpu"]
        delta = info_delta(marks["info"], redis_info(r))
        messages = list(recording.messages)
        subscriber.terminate()
        subscriber.wait(10)
        r.close()
        store.close()
    finally:
        server.close()

    # An api process's mirror applying those messages (decode + merge into its state).
    mirror_state = MarketState(WINDOW_S, owned_by_default=False)
    mirror = Mirror(mirror_state, None, StoreHealth("redis"), keys, mode=Mode.LIVE)  # type: ignore[arg-type]
    c0 = time.process_time()
    for message in messages:
        mirror.apply_messages([message])
    mirror_cpu = time.process_time() - c0

    key_flushes = n_keys * flushes
    publishes = delta["commands"].get("publish", 0)
    per_key = {n: c / key_flushes for n, c in delta["commands"].items() if n != "publish"}
    message_bytes = sum(len(m) for m in messages)
    return {
        "keys": n_keys,
        "flushes": flushes,
        "ticks_per_key_flush": ticks_per_key_flush,
        "commands_per_key_flush": round(sum(per_key.values()), 3),
        "commands_per_key_flush_by_name": {n: round(v, 3) for n, v in sorted(per_key.items())},
        "publishes_per_flush": publishes / flushes,
        "bytes_in_per_key_flush": round(delta["in"] / key_flushes, 1),
        "bytes_out_per_key_flush": round(delta["out"] / key_flushes, 1),
        "updates_message_bytes_per_key_flush": round(message_bytes / key_flushes, 1),
        "redis_cpu_us_per_key_flush": round(server_cpu / key_flushes * 1e6, 3),
        "flusher_cpu_us_per_key_flush": round(flusher_cpu / key_flushes * 1e6, 3),
        "flusher_wall_ms_per_flush": round(flusher_wall / flushes * 1000, 2),
        "mirror_cpu_us_per_key_flush": round(mirror_cpu / key_flushes * 1e6, 3),
    }


def calibrate_postgres(n_keys: int, minutes: int, batch: int = 200) -> dict[str, Any]:
    """Bytes per minute row (the table and its indexes, plus the hourly rollup's share) and the
    write time per row, through the store as the aggregator writes."""
    start = (int(time.time()) // 3600 - 24) * 3_600_000  # whole hours, a day back
    with postgres_database() as dbname:
        store = PostgresAggregateStore(PostgresConfig(dbname=dbname))
        try:
            store.upsert([MinuteRow("warmup", "WARMUP", start - 60_000, 1, 1.0, 1, 1, 1, 1)])
            rows = [
                MinuteRow(
                    f"exchange{k // 100 + 1}",
                    f"SYM{k % 100:03d}USDT",
                    start + m * 60_000,
                    600,
                    600 * (100.0 + k % 7),
                    99.0,
                    101.0,
                    100.0,
                    100.5,
                )
                for m in range(minutes)
                for k in range(n_keys)
            ]
            with psycopg.connect(
                host="127.0.0.1", user="postgres", dbname=dbname, autocommit=True
            ) as conn:
                wal0 = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
                t0 = time.perf_counter()
                for i in range(0, len(rows), batch):
                    store.upsert(rows[i : i + batch])
                elapsed = time.perf_counter() - t0
                wal = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (wal0,)
                ).fetchone()[0]  # type: ignore[index]
                conn.execute("VACUUM ANALYZE aggregates")
                conn.execute("VACUUM ANALYZE aggregates_hourly")
                sizes = conn.execute(
                    "SELECT pg_total_relation_size('aggregates'),"
                    " pg_total_relation_size('aggregates_hourly'),"
                    " (SELECT count(*) FROM aggregates), (SELECT count(*) FROM aggregates_hourly)"
                ).fetchone()
        finally:
            store.close()
    assert sizes is not None
    minute_bytes, hourly_bytes, minute_rows, hourly_rows = (int(v) for v in sizes)
    return {
        "keys": n_keys,
        "minutes": minutes,
        "rows": minute_rows,
        "minute_bytes_per_row": round(minute_bytes / minute_rows, 1),
        "hourly_bytes_per_minute_row": round(hourly_bytes / minute_rows, 1),
        "bytes_per_minute_row": round((minute_bytes + hourly_bytes) / minute_rows, 1),
        "hourly_rows": hourly_rows,
        "write_us_per_row": round(elapsed / len(rows) * 1e6, 1),
        "wal_bytes_per_row_server_wide": round(float(wal) / len(rows), 1),
    }


def recorded_figures() -> dict[str, Any]:
    """Per-core figures of the other benchmarks, as recorded in docs/performance.json."""
    path = REPO / "docs" / "performance.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    out: dict[str, Any] = {}
    ingest = [
        r for r in data.get("ingest", {}).get("records", []) if r.get("design") == "marketflow"
    ]
    if ingest:
        top = max(ingest, key=lambda r: r["updates_per_s"])
        out["ingest_per_core"] = round(top["updates_per_s"] / max(top["cpu_percent"], 1) * 100)
        out["ingest_source"] = f"bench_ingest {top['case']} at {data['ingest']['commit']}"
    api = [
        r
        for r in data.get("api", {}).get("records", [])
        if r.get("server") == "marketflow" and r.get("connections") == 8 and "endpoint" in r
    ]
    if api:
        out["api_req_per_core"] = {
            r["endpoint"]: round(r["requests_per_s"] / max(r["cpu_percent"], 1) * 100) for r in api
        }
        out["api_source"] = f"bench_api 8 connections at {data['api']['commit']}"
    ws = [r for r in data.get("ws", {}).get("records", []) if r.get("bench") == "ws"]
    if ws:
        r = ws[0]
        frames = r["clients"] * r["frames_per_client_per_s"]
        out["ws_frames_per_core"] = round(frames / max(r["marketflow_cpu_percent"], 1) * 100)
        out["ws_source"] = f"bench_ws {r['case']} at {data['ws']['commit']}"
    return out


# --- the model -----------------------------------------------------------------------------------


def model(
    *,
    keys: int,
    updates_per_s: float,
    ingest_processes: int,
    api_processes: int,
    unit: dict[str, Any],
) -> dict[str, Any]:
    """What `keys` keys at `updates_per_s` need, from the unit costs (docs/scaling.md says why
    each term is there)."""
    rate = updates_per_s / keys  # per key
    changed = 1 - math.exp(-rate * FLUSH_S)  # P(a key changed within one flush), Poisson
    key_flushes = keys / FLUSH_S * changed
    flushes = ingest_processes / FLUSH_S
    redis_unit = unit["redis"]
    commands = key_flushes * redis_unit["commands_per_key_flush"] + flushes
    bytes_in = key_flushes * redis_unit["bytes_in_per_key_flush"]
    # Replies to the flushes, plus the `updates` stream to every api process.
    replies = (
        redis_unit["bytes_out_per_key_flush"] - redis_unit["updates_message_bytes_per_key_flush"]
    )
    bytes_out = key_flushes * (
        replies + api_processes * redis_unit["updates_message_bytes_per_key_flush"]
    )
    redis_cores = key_flushes * redis_unit["redis_cpu_us_per_key_flush"] / 1e6
    ingest_cores = (
        updates_per_s / unit["ingest_per_core"]
        + key_flushes * redis_unit["flusher_cpu_us_per_key_flush"] / 1e6
    )
    mirror_cores = key_flushes * redis_unit["mirror_cpu_us_per_key_flush"] / 1e6
    pg = unit["postgres"]
    rows_per_min = keys * (1 - math.exp(-rate * 60))
    rows_per_s = rows_per_min / 60
    return {
        "keys": keys,
        "updates_per_s": round(updates_per_s),
        "key_changed_per_flush": round(changed, 3),
        "key_flushes_per_s": round(key_flushes),
        "ingest_cores": round(ingest_cores, 3),
        "redis_commands_per_s": round(commands),
        "redis_bytes_in_per_s": round(bytes_in),
        "redis_bytes_out_per_s": round(bytes_out),
        "redis_cores": round(redis_cores, 3),
        "redis_nodes": max(
            1,
            math.ceil(redis_cores / REDIS_CORE_BUDGET),
            math.ceil((bytes_in + bytes_out) / NIC_BYTES_PER_S),
        ),
        "mirror_cores_per_api_process": round(mirror_cores, 3),
        "pg_rows_per_min": round(rows_per_min),
        "pg_rows_per_s": round(rows_per_s, 1),
        "pg_mb_per_s": round(rows_per_s * pg["bytes_per_minute_row"] / 1e6, 3),
        "pg_write_cores": round(rows_per_s * pg["write_us_per_row"] / 1e6, 3),
        "pg_gb_per_year": round(rows_per_s * YEAR_S * pg["bytes_per_minute_row"] / 1e9, 1),
        "pg_rows_per_year": round(rows_per_s * YEAR_S),
    }


# --- the run -------------------------------------------------------------------------------------


def healthy(mf: Marketflow) -> bool:
    return bool(mf.health()["status"] == "ok")


def pg_backend_cpu(dbname: str) -> float:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as conn:
        pids = [
            int(p)
            for (p,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchall()
        ]
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def run(feeds: int, symbols: int, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    names = [f"SYM{i:03d}USDT" for i in range(symbols)]
    server = RedisServer()
    sim = Simulator(feeds, rate=rate, seed=1, symbols=names)
    procs: list[Marketflow] = []
    r = redis.Redis(port=server.port)
    try:
        with tempfile.TemporaryDirectory() as tmp, postgres_database() as dbname:
            exchanges = [
                {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": port}
                for i, port in enumerate(sim.ports)
            ]
            half = feeds // 2

            def config(role: str, chosen: list[dict[str, Any]], data: str) -> dict[str, Any]:
                return {
                    "postgres": {"dbname": dbname},
                    "redis": {"port": server.port, "key_prefix": "scale:"},
                    "exchanges": chosen,
                    "app": {
                        "mode": "live",
                        "role": role,
                        "symbols": names,
                        "grace_ms": int(GRACE_S * 1000),
                        "data_dir": str(Path(tmp) / data),
                    },
                    "log": {"level": "warning"},
                }

            ingests = [
                Marketflow(Path(tmp), config("ingest", exchanges[:half], "a")),
                Marketflow(Path(tmp), config("ingest", exchanges[half:], "b")),
            ]
            procs += ingests
            api = Marketflow(Path(tmp), config("api", exchanges, "api"))
            procs.append(api)
            for mf in ingests:
                wait_for(partial(healthy, mf), 30, "ingest connected")
            wait_for(
                lambda: (
                    len(api.get(f"/prices/latest/{names[0]}").json().get("sources", [])) == feeds
                ),
                30,
                "the api process sees every feed",
            )
            progress(f"scale: warming up {warmup} s")
            time.sleep(warmup)  # a benchmark's steady state, not a test's wait

            pids = {
                "simulator": sim.proc.pid,
                "ingest1": ingests[0].proc.pid,
                "ingest2": ingests[1].proc.pid,
                "api": api.proc.pid,
                "redis-server": server.proc.pid,
            }
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            pg0 = pg_backend_cpu(dbname)
            info0 = redis_info(r)
            folded0 = [folded(mf) for mf in ingests]
            scraped0 = [scrape(mf) for mf in ingests]
            rows0 = sum(m.get("marketflow_db_rows_written_total", 0) for m in scraped0)
            t0 = time.time()
            m0 = time.monotonic()
            progress(f"scale: measuring {seconds} s")
            time.sleep(seconds)
            elapsed = time.monotonic() - m0
            t1 = time.time()
            cpu = {
                name: round(100 * (cpu_seconds(pid) - cpu0[name]) / elapsed, 1)
                for name, pid in pids.items()
            }
            cpu["postgres backends"] = round(100 * (pg_backend_cpu(dbname) - pg0) / elapsed, 1)
            delta = info_delta(info0, redis_info(r))
            updates = sum(folded(mf) - f0 for mf, f0 in zip(ingests, folded0, strict=True))
            scraped = [scrape(mf) for mf in ingests]
            rows = sum(m.get("marketflow_db_rows_written_total", 0) for m in scraped) - rows0
            flush_count = [
                m["marketflow_redis_flush_seconds_count"]
                - m0.get("marketflow_redis_flush_seconds_count", 0)
                for m, m0 in zip(scraped, scraped0, strict=True)
            ]
            flush_sum = [
                m["marketflow_redis_flush_seconds_sum"]
                - m0.get("marketflow_redis_flush_seconds_sum", 0)
                for m, m0 in zip(scraped, scraped0, strict=True)
            ]
            latest = api.get(f"/prices/latest/{names[0]}").json()
            # Minutes closed in the window: written once their end + grace_ms has passed.
            closed = sum(
                1
                for m in range(int(t0 // 60) - 1, int(t1 // 60) + 2)
                if t0 < m * 60 + GRACE_S + 0.5 <= t1
            )
            for mf in ingests:
                stop(mf)
            api.close()
            with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
                table = conn.execute(
                    "SELECT count(*), count(DISTINCT (exchange, pair_name)),"
                    " count(DISTINCT \"timestamp\"), pg_total_relation_size('aggregates')"
                    " FROM aggregates"
                ).fetchone()
                (dupes,) = conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM aggregates"
                    ' GROUP BY exchange, pair_name, "timestamp" HAVING count(*) > 1) d'
                ).fetchone() or (0,)
    finally:
        for mf in procs:
            mf.close()
        sim.close()
        r.close()
        server.close()
    assert table is not None
    commands = delta["commands"]
    return {
        "feeds": feeds,
        "symbols": symbols,
        "keys": feeds * symbols,
        "rate_per_feed": rate,
        "seconds": round(elapsed, 1),
        "updates_per_s": round(updates / elapsed),
        "key_flushes_per_s": round(commands.get("hset", 0) / elapsed),
        "redis_commands_per_s": round(delta["total_commands"] / elapsed),
        "redis_commands_per_s_by_name": {
            n: round(c / elapsed) for n, c in sorted(commands.items(), key=lambda x: -x[1])
        },
        "redis_bytes_in_per_s": round(delta["in"] / elapsed),
        "redis_bytes_out_per_s": round(delta["out"] / elapsed),
        "flushes_per_s": [round(c / elapsed, 2) for c in flush_count],
        "flush_ms_mean": [
            round(1000 * t / max(c, 1), 1) for t, c in zip(flush_sum, flush_count, strict=True)
        ],
        "cpu_percent": cpu,
        "pg_rows_written": int(rows),
        "pg_minutes_closed": closed,
        "pg_rows_per_closed_minute": round(rows / closed) if closed else None,
        "pg_rows_per_s": round(rows / elapsed, 1),
        "table_rows": int(table[0]),
        "table_keys": int(table[1]),
        "table_minutes": int(table[2]),
        "table_bytes_per_row": round(int(table[3]) / max(int(table[0]), 1), 1),
        "duplicate_rows": int(dupes),
        "api_latest_sources": len(latest.get("sources", [])),
    }


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeds", type=int, default=10)
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[2000.0, 10000.0],
        help="lines/s per feed, one run each (two or more: the ingest's costs are fitted)",
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--calibrate-keys", type=int, default=1000)
    parser.add_argument("--calibrate-flushes", type=int, default=50)
    parser.add_argument(
        "--ingest-per-core",
        type=float,
        default=None,
        help="updates/s one ingest core folds (default: docs/performance.json's bench_ingest)",
    )
    args = parser.parse_args(argv)
    if args.feeds < 2:
        parser.error("--feeds: at least 2 (two ingest processes split them)")

    recorded = recorded_figures()
    per_core = args.ingest_per_core or recorded.get("ingest_per_core")
    if not per_core:
        parser.error("--ingest-per-core: no bench_ingest figure recorded; pass one")
    progress("scale: calibrating Redis per key-flush")
    ticks = max(1, round(max(args.rates) / args.symbols * FLUSH_S))
    redis_unit = calibrate_redis(args.calibrate_keys, args.calibrate_flushes, ticks)
    emit("scale", "unit: redis per key-flush", **redis_unit)
    progress("scale: calibrating PostgreSQL bytes per row")
    pg_unit = calibrate_postgres(1000, 60)
    emit("scale", "unit: postgres per minute row", **pg_unit)
    unit = {
        "redis": redis_unit,
        "postgres": pg_unit,
        "ingest_per_core": per_core,
        **{k: v for k, v in recorded.items() if k != "ingest_per_core"},
    }
    emit(
        "scale",
        "unit: per core",
        ingest_per_core=per_core,
        ingest_source="--ingest-per-core"
        if args.ingest_per_core
        else recorded.get("ingest_source"),
        api_req_per_core=recorded.get("api_req_per_core"),
        api_source=recorded.get("api_source"),
        ws_frames_per_core=recorded.get("ws_frames_per_core"),
        ws_source=recorded.get("ws_source"),
    )

    keys = args.feeds * args.symbols
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for rate in args.rates:
        progress(f"scale: run, {args.feeds} feeds x {args.symbols} symbols at {rate} lines/s")
        measured = run(args.feeds, args.symbols, rate, args.seconds, args.warmup)
        predicted = model(
            keys=keys,
            updates_per_s=measured["updates_per_s"],
            ingest_processes=2,
            api_processes=1,
            unit=unit,
        )
        emit("scale", f"run: {keys} keys at {rate:g}/feed, measured", **measured)
        emit("scale", f"run: {keys} keys at {rate:g}/feed, predicted", **predicted)
        print_comparison(measured, predicted)
        runs.append((measured, predicted))
    emit("scale", "model: 100 exchanges x 1,000 symbols at 1,000,000 updates/s", **target(unit))
    if len(runs) >= 2:
        # The ingest's cost per update at this many keys, from the two runs' difference (their
        # key-flushes/s are alike: every key changes in every flush at these rates).
        (low, _), (high, _) = runs[0], runs[-1]
        cpu = [
            (m["cpu_percent"]["ingest1"] + m["cpu_percent"]["ingest2"]) / 100 for m in (low, high)
        ]
        per_update = (cpu[1] - cpu[0]) / max(high["updates_per_s"] - low["updates_per_s"], 1)
        rest = cpu[1] - per_update * high["updates_per_s"]
        per_key_flush = rest / max(high["key_flushes_per_s"], 1)
        fitted = {
            **unit,
            "ingest_per_core": round(1 / per_update) if per_update > 0 else unit["ingest_per_core"],
            "redis": {
                **unit["redis"],
                "flusher_cpu_us_per_key_flush": round(per_key_flush * 1e6, 2),
            },
        }
        emit(
            "scale",
            f"fit: ingest costs at {keys} keys (two runs)",
            ingest_per_core=fitted["ingest_per_core"],
            flusher_cpu_us_per_key_flush=fitted["redis"]["flusher_cpu_us_per_key_flush"],
        )
        emit(
            "scale",
            "model with the fitted ingest costs: 100 exchanges x 1,000 symbols at 1,000,000"
            " updates/s",
            **target(fitted),
        )
    return 0


def target(unit: dict[str, Any]) -> dict[str, Any]:
    keys = TARGET["exchanges"] * TARGET["symbols"]
    rate = TARGET["updates_per_s"]
    cores = model(keys=keys, updates_per_s=rate, ingest_processes=1, api_processes=1, unit=unit)
    processes = max(1, math.ceil(cores["ingest_cores"]))
    return model(
        keys=keys, updates_per_s=rate, ingest_processes=processes, api_processes=1, unit=unit
    )


def print_comparison(measured: dict[str, Any], predicted: dict[str, Any]) -> None:
    cpu = measured["cpu_percent"]
    rows = [
        ("updates/s (ingested)", measured["updates_per_s"], predicted["updates_per_s"]),
        ("key-flushes/s", measured["key_flushes_per_s"], predicted["key_flushes_per_s"]),
        ("Redis commands/s", measured["redis_commands_per_s"], predicted["redis_commands_per_s"]),
        ("Redis bytes in/s", measured["redis_bytes_in_per_s"], predicted["redis_bytes_in_per_s"]),
        (
            "Redis bytes out/s",
            measured["redis_bytes_out_per_s"],
            predicted["redis_bytes_out_per_s"],
        ),
        ("redis-server CPU %", cpu["redis-server"], round(100 * predicted["redis_cores"], 1)),
        (
            "ingest CPU % (both)",
            round(cpu["ingest1"] + cpu["ingest2"], 1),
            round(100 * predicted["ingest_cores"], 1),
        ),
        (
            "api CPU % (mirror)",
            cpu["api"],
            round(100 * predicted["mirror_cores_per_api_process"], 1),
        ),
        (
            "PostgreSQL rows per closed minute",
            measured["pg_rows_per_closed_minute"],
            predicted["pg_rows_per_min"],
        ),
    ]
    progress("\n| figure | measured | predicted |\n|---|---|---|")
    for name, got, want in rows:
        progress(
            f"| {name} | {got:,} | {want:,} |" if got is not None else f"| {name} | - | {want:,} |"
        )
    progress(f"(load average {loadavg()})")


if __name__ == "__main__":
    raise SystemExit(main())
