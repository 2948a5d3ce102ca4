"""Run every benchmark, each in its own processes, and record the figures in docs/performance.md.

    .venv/bin/python -m benchmarks.run [--quick] [--only NAME[,NAME]] [--no-write]
        [--memory-seconds S]

Each benchmark (`benchmarks.bench_<name>`) runs as a child process and prints JSON result lines
(`{"bench": ..., "case": ..., ...}`), which this runner echoes and collects. The raw records go
to docs/performance.json (keyed by benchmark, so `--only` replaces just that benchmark's
figures), and the table between `<!-- bench:begin -->` and `<!-- bench:end -->` in
docs/performance.md is rewritten from all of them: figure, target, whether it is met, command,
commit and machine. Everything outside the markers is left alone.

`--quick` runs short versions (seconds, not minutes; used by the smoke test) and marks their
figures as quick. `--no-write` prints the table and leaves the docs untouched.
Benchmarks print figures; a missed target is reported, not an error. The exit status is 1 only
when a benchmark itself failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import commit, machine
from tests.procs import REPO

DOC = REPO / "docs" / "performance.md"
RESULTS = REPO / "docs" / "performance.json"
PROFILES = Path("benchmarks") / "results" / "profiles"  # relative to REPO, the cwd of each run
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

Record = dict[str, Any]
Row = tuple[str, str, str, str]  # figure, measured, target, met


@dataclass(frozen=True)
class Bench:
    module: str
    full: list[str]
    quick: list[str]
    timeout_s: float
    rows: Callable[[list[Record]], list[Row]]


# --- formatting ----------------------------------------------------------------------------------


def n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def flat(values: list[float], slack: float = 2.0, floor: float = 0.0) -> bool:
    """True when the figures do not grow with the rate (within `slack` x, or under `floor`)."""
    return max(values) <= max(floor, slack * max(min(values), 1e-9))


# --- per benchmark: the summary rows -------------------------------------------------------------


def ingest_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    runs = [r for r in records if r.get("design") == "marketflow"]
    naive = next((r for r in records if r["case"] == "naive"), None)
    top = max(runs, key=lambda r: r["updates_per_s"]) if runs else None
    if top is not None:
        zero = top["lost"] == 0 and top["db_lost"] == 0
        rows.append(
            (
                f"Ingest, one process, {top['feeds']} feeds at {top['rate_per_feed']} "
                "lines/s each (blasters → Redis, PostgreSQL)",
                f"{n(top['updates_per_s'])} updates/s; lost {top['lost']} (Redis), "
                f"{top['db_lost']} (PostgreSQL); CPU {top['cpu_percent']} %",
                "≥ 500,000 updates/s, zero loss",
                met(top["updates_per_s"] >= 500_000 and zero),
            )
        )
    if runs:
        rates = " → ".join(n(r["updates_per_s"]) for r in runs)
        redis = " → ".join(n(r["redis_commands_per_s"]) for r in runs)
        pg = " → ".join(n(r["db_rows_per_s"], 2) for r in runs)
        rows.append(
            (
                f"Store cost as the tick rate grows ({rates} updates/s)",
                f"Redis {redis} commands/s; PostgreSQL {pg} rows/s "
                f"({' / '.join(str(r['db_rows']) for r in runs)} rows in all)",
                "flat: does not grow with the rate",
                met(
                    flat([r["redis_commands_per_s"] for r in runs], floor=2000)
                    and flat([r["db_rows_per_s"] for r in runs], floor=1)
                ),
            )
        )
        lost = sum(r["lost"] + r["db_lost"] for r in runs)
        rows.append(
            (
                "Loss at every rate (ticks sent - ticks in Redis buckets, - PostgreSQL tick_count)",
                f"{lost} of {n(sum(r['sent'] for r in runs))}",
                "0",
                met(lost == 0),
            )
        )
    if naive is not None and top is not None:
        rows.append(
            (
                "Naive baseline: one Redis round trip per update (same blasters, same check)",
                f"{n(naive['updates_per_s'])} updates/s → marketflow is "
                f"{top['updates_per_s'] / naive['updates_per_s']:,.0f}x faster",
                "-",
                "-",
            )
        )
    return rows


def freshness_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        rest, ws = r["rest"], r["ws"]
        ok = (
            rest["p99_ms"] is not None
            and ws["p99_ms"] is not None
            and max(rest["p99_ms"], ws["p99_ms"]) <= 150
            and r["lost"] == 0
        )
        rows.append(
            (
                f"Freshness at {n(r['rate'])} updates/s: tick → visible (p50 / p99)",
                f"REST {n(rest['p50_ms'], 1)} / {n(rest['p99_ms'], 1)} ms; "
                f"WebSocket {n(ws['p50_ms'], 1)} / {n(ws['p99_ms'], 1)} ms",
                "p99 ≤ 150 ms",
                met(ok),
            )
        )
    return rows


def api_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    bare = [r for r in records if r.get("server") == "bare" and r.get("workers") == 1]
    ceiling: dict[int, int] = {}
    for r in bare:
        ceiling[r["connections"]] = max(ceiling.get(r["connections"], 0), r["requests_per_s"])
    for c, rps in sorted(ceiling.items()):
        p99 = max(r["p99_ms"] for r in bare if r["connections"] == c)
        rows.append(
            (
                f"Ceiling: bare ASGI app on Hypercorn's Trio worker, {c} connections",
                f"{n(rps)} req/s (p99 up to {n(p99, 1)} ms)",
                "-",
                "-",
            )
        )
    for r in records:
        if r.get("server") != "marketflow" or "endpoint" not in r:
            continue
        c = r["connections"]
        share = r["requests_per_s"] / ceiling[c] if c in ceiling else None
        latest = r["endpoint"] == "latest"
        need = 0.8 if latest else 0.6
        target = f"≥ {need:.0%} of ceiling" + (", p99 ≤ 15 ms" if c == 8 and latest else "")
        ok = None if share is None else share >= need and r["non_2xx"] == 0
        if ok and c == 8 and latest:
            ok = r["p99_ms"] <= 15
        rows.append(
            (
                f"API `{r['path']}`, {c} connections, while ingesting 10,000 updates/s",
                f"{n(r['requests_per_s'])} req/s"
                + ("" if share is None else f" ({share:.0%} of ceiling)")
                + f"; p50 {n(r['p50_ms'], 1)} ms, p99 {n(r['p99_ms'], 1)} ms",
                target,
                met(ok),
            )
        )
    for r in records:
        if r.get("server") == "bare" and r.get("workers", 1) > 1:
            rows.append(
                (
                    f"Multi-process ceiling: bare ASGI, {r['workers']} Hypercorn workers, "
                    f"{r['connections']} connections",
                    f"{n(r['requests_per_s'])} req/s (p99 {n(r['p99_ms'], 1)} ms)",
                    "-",
                    "-",
                )
            )
    ingest = next((r for r in records if r["case"] == "ingest during the API load"), None)
    if ingest is not None:
        rows.append(
            (
                "Ingest during the API load (ticks folded = ticks sent)",
                f"{n(ingest['folded'])} of {n(ingest['sent'])}",
                "no tick lost",
                met(ingest["lost"] == 0),
            )
        )
    return rows


def ws_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        candles = r.get("candles")
        what = f"all symbols, candles {candles}" if candles else "all symbols"
        per_s = f"{n(r['frames_per_client_per_s'], 1)} prices"
        if candles:
            per_s += f" + {n(r.get('candle_frames_per_client_per_s'), 1)} candles"
        rows.append(
            (
                f"WebSocket fan-out, {n(r['clients'])} clients ({what}) at 10,000 updates/s: "
                "longest gap between two frames of any client",
                f"{n(r['max_gap_ms'])} ms ({per_s} frames/client/s, "
                f"{r['clients_gap_over_250ms']} clients with a gap > 250 ms, "
                f"{r['dropped']} dropped)",
                "every client a frame at least every 250 ms",
                met(r["max_gap_ms"] is not None and r["max_gap_ms"] <= 250 and not r["dropped"]),
            )
        )
        rows.append(
            (
                "WebSocket fan-out: delivery lag (price age when received), p50 / p99",
                f"{n(r['lag_p50_ms'])} / {n(r['lag_p99_ms'])} ms; marketflow CPU "
                f"{r['marketflow_cpu_percent']} %, client process CPU {r['client_cpu_percent']} %",
                "p99 ≤ 500 ms",
                met(r["lag_p99_ms"] is not None and r["lag_p99_ms"] <= 500),
            )
        )
        rows.append(
            (
                "WebSocket fan-out: ingest unaffected (ticks folded = ticks sent)",
                f"{n(r['folded'])} of {n(r['sent'])}",
                "no tick lost",
                met(r["lost"] == 0),
            )
        )
    return rows


def roles_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    by = {r["case"]: r for r in records}
    bare = next((r for r in records if r.get("setup") == "bare"), None)
    for endpoint in ("latest", "highest 1m"):
        single = next(
            (r for r in records if r.get("setup") == "single" and r.get("endpoint") == endpoint),
            None,
        )
        split = next(
            (r for r in records if r.get("setup") == "split" and r.get("endpoint") == endpoint),
            None,
        )
        if single is None or split is None:
            continue
        ratio = split["requests_per_s"] / max(1, single["requests_per_s"])
        share = split["requests_per_s"] / bare["requests_per_s"] if bare else None
        rows.append(
            (
                f"Scale-out, `{endpoint}` at 64 connections while ingesting 10,000 updates/s: "
                "ingest + Hypercorn --workers 2 (role api) vs one `all` process",
                f"{n(split['requests_per_s'])} vs {n(single['requests_per_s'])} req/s "
                f"({ratio:.2f}x; {n(100 * share) if share else '-'} % of the 2-worker bare "
                f"ASGI ceiling {n(bare['requests_per_s']) if bare else '-'}); p99 "
                f"{n(split.get('p99_ms'), 1)} ms",
                "≥ 1.5x, ≥ 60 % of the ceiling, p99 ≤ 50 ms",
                met(
                    ratio >= 1.5
                    and share is not None
                    and share >= 0.6
                    and (split.get("p99_ms") or 1e9) <= 50
                ),
            )
        )
        rows.append(
            (
                f"Scale-out, `{endpoint}`: requests per API CPU-second (projection: x N cores)",
                f"split {n(split.get('requests_per_cpu_second'))}, single "
                f"{n(single.get('requests_per_cpu_second'))} (2 cores, shared with wrk and the "
                "feeds; projection, not a measurement: N api cores ≈ N x this)",
                "-",
                "-",
            )
        )
    for kind in ("single", "split"):
        fresh = by.get(f"{kind}: freshness tick -> answer")
        if fresh:
            rows.append(
                (
                    f"Freshness tick -> answer, {kind} (REST poll / WebSocket), p99",
                    f"{n(fresh['rest']['p99_ms'])} / {n(fresh['ws']['p99_ms'])} ms",
                    "p99 ≤ 150 ms",
                    met(max(fresh["rest"]["p99_ms"] or 1e9, fresh["ws"]["p99_ms"] or 1e9) <= 150),
                )
            )
    fan = next((r for r in records if "WebSocket clients over" in r["case"]), None)
    if fan:
        rows.append(
            (
                f"WebSocket, {n(fan['clients'])} clients over 2 api workers: longest gap / lag p99",
                f"{n(fan.get('max_gap_ms'))} ms / {n(fan.get('lag_p99_ms'))} ms "
                f"({fan.get('clients_gap_over_250ms')} clients with a gap > 250 ms; "
                f"{n(fan.get('frames_per_cpu_second'))} frames per api CPU-second)",
                "every client a frame at least every 250 ms, lag p99 ≤ 500 ms",
                met(
                    (fan.get("max_gap_ms") or 1e9) <= 250 and (fan.get("lag_p99_ms") or 1e9) <= 500
                ),
            )
        )
    return rows


def cluster_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        label = "one server" if r["case"] == "single" else f"{r['masters']}-master cluster"
        rows.append(
            (
                f"Redis cost of {n(r['keys'])} keys at {n(r['updates_per_s'])} updates/s, {label}:"
                " commands/s, client bytes in/s, pipelined rounds per flush",
                f"{n(r['commands_per_s'])} commands/s, {n(r['bytes_in_per_s'] / 1e6, 2)} MB/s in, "
                f"{r['rounds_per_flush']} rounds/flush (flush {r['flush_ms_median']} ms median)",
                "one pipelined round per master per flush",
                met(r["rounds_per_flush"] <= r["masters"]),
            )
        )
    return rows


def takeover_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        rows.append(
            (
                f"Hot standby: takeover after SIGKILL of the holder ({r['kills']} kills, "
                f"lease_ttl_ms {n(r['lease_ttl_ms'])}), median / max",
                f"{r['takeover_s_median']} / {r['takeover_s_max']} s (bound "
                f"{r['bound_s']} s + restore and connect)",
                "within lease_ttl_ms + one renewal period (+ restore, connect)",
                met(r["takeover_s_max"] <= r["bound_s"] + 2),
            )
        )
        rows.append(
            (
                "Hot standby: ticks missing over all kills (sent on every connection - stored)",
                f"{n(r['missing'])} of {n(r['sent'])} ({n(r['missing_per_kill'], 1)} per kill; "
                f"rows doubled {r['rows_doubled']})",
                "the gaps and each holder's last flush interval; nothing doubled",
                met(r["rows_doubled"] == 0 and r["missing"] >= 0),
            )
        )
    return rows


def candles_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    targets = {"1h": 50.0, "1m": 20.0}
    for r in records:
        if "interval" in r:
            need = targets.get(r["interval"]) if r["connections"] == 8 else None
            rows.append(
                (
                    f"Candles `{r['interval']}` x 1000 over a year of minutes (one key), "
                    f"{r['connections']} connections, every request its own range, while "
                    f"ingesting {n(r['ingesting'])} updates/s",
                    f"{n(r['requests_per_s'])} req/s; p50 {n(r['p50_ms'], 1)} ms, "
                    f"p99 {n(r['p99_ms'], 1)} ms",
                    "-" if need is None else f"p99 < {need:.0f} ms",
                    met(None if need is None else r["p99_ms"] < need and r["non_2xx"] == 0),
                )
            )
        elif r.get("server") == "bare":
            rows.append(
                (
                    f"Ceiling: bare ASGI answering {n(r['body_bytes'])}-byte bodies (a thousand "
                    f"candles), {r['connections']} connections",
                    f"{n(r['requests_per_s'])} req/s (p99 {n(r['p99_ms'], 1)} ms)",
                    "-",
                    "-",
                )
            )
        elif "lost" in r:
            rows.append(
                (
                    "Ingest during the candle load (ticks folded = ticks sent)",
                    f"{n(r['sent'] - r['lost'])} of {n(r['sent'])}",
                    "no tick lost",
                    met(r["lost"] == 0),
                )
            )
    return rows


def connectors_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        if "venue" not in r or "feed_trades_per_s" not in r:
            continue
        rows.append(
            (
                f"Connector `{r['venue']}`: trades/s per core through the whole per-frame path "
                "(parse, map, dedup, tick rules) on its recording",
                f"{n(r['feed_trades_per_s'])} (parser alone {n(r.get('parse_trades_per_s'))})",
                "≥ 200,000",
                met(r["feed_trades_per_s"] >= 200_000),
            )
        )
    return rows


def scale_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    predicted = {
        r["case"].removesuffix(", predicted"): r
        for r in records
        if r["case"].startswith("run:") and r["case"].endswith(", predicted")
    }
    for r in records:
        if not (r["case"].startswith("run:") and r["case"].endswith(", measured")):
            continue
        p = predicted.get(r["case"].removesuffix(", measured"), {})
        cpu = r["cpu_percent"]
        ingest_cpu = cpu["ingest1"] + cpu["ingest2"]
        rows.append(
            (
                f"Scale run: {n(r['keys'])} keys ({r['feeds']} `marketflow simulate` feeds x "
                f"{r['symbols']} symbols) through 2 ingest processes + 1 api process, "
                f"{n(r['updates_per_s'])} updates/s: measured (model)",
                f"Redis {n(r['redis_commands_per_s'])} ({n(p.get('redis_commands_per_s'))}) "
                f"commands/s, {n(r['redis_bytes_in_per_s'] / 1e6, 1)} "
                f"({n(p.get('redis_bytes_in_per_s', 0) / 1e6, 1)}) MB/s in; ingest CPU "
                f"{n(ingest_cpu)} ({n(100 * p.get('ingest_cores', 0))}) %, api "
                f"{n(cpu['api'])} ({n(100 * p.get('mirror_cores_per_api_process', 0))}) %, "
                f"redis-server {n(cpu['redis-server'])} ({n(100 * p.get('redis_cores', 0))}) %; "
                f"PostgreSQL {n(r['pg_rows_per_closed_minute'])} "
                f"({n(p.get('pg_rows_per_min'))}) rows per closed minute, "
                f"{r['duplicate_rows']} duplicates",
                "-",
                "-",
            )
        )
    for r in records:
        if r["case"].startswith("model"):
            rows.append(
                (
                    "Scale model, " + r["case"].removeprefix("model").lstrip(": "),
                    f"ingest {n(r['ingest_cores'], 1)} cores; Redis {n(r['redis_commands_per_s'])} "
                    f"commands/s, {n(r['redis_bytes_in_per_s'] / 1e6)} MB/s in, "
                    f"{n(r['redis_cores'], 1)} cores → {r['redis_nodes']} nodes; mirror "
                    f"{n(r['mirror_cores_per_api_process'], 1)} cores per api process; PostgreSQL "
                    f"{n(r['pg_rows_per_s'])} rows/s, {n(r['pg_mb_per_s'], 2)} MB/s, "
                    f"{n(r['pg_gb_per_year'] / 1000, 1)} TB/year",
                    "-",
                    "-",
                )
            )
    return rows


def memory_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        minutes = r["seconds"] / 60
        rows.append(
            (
                f"Memory at {n(r['rate'])} updates/s over {minutes:.1f} min: peak RSS",
                f"{n(r['rss_peak_mb'], 1)} MiB (start {n(r['rss_at_start_mb'], 1)}, "
                f"end {n(r['rss_end_mb'], 1)})",
                "≤ 200 MB",
                met(r["rss_peak_mb"] * 1.048576 <= 200),
            )
        )
        rows.append(
            (
                "Memory: RSS slope (least squares; whole run / second half)",
                f"{r['slope_mb_per_min']:+.2f} / {r['slope_second_half_mb_per_min']:+.2f} MiB/min",
                "flat (≤ 1 MiB/min in the second half)",
                met(abs(r["slope_second_half_mb_per_min"]) <= 1.0),
            )
        )
        rows.append(
            (
                f"Store cost in steady state over the same {minutes:.1f} min",
                f"Redis {n(r['redis_commands_per_s'])} commands/s; PostgreSQL "
                f"{n(r['db_rows_per_s'], 2)} rows/s; CPU {r['cpu_percent']} %; "
                f"lost {r['lost']}",
                "flat (as in the ingest rows)",
                "-",
            )
        )
    return rows


def startup_rows(records: list[Record]) -> list[Row]:
    return [
        (
            "Start-up: exec → first `/health` 200, test mode (median of restarts)",
            f"{n(r['median_ready_s'], 2)} s (max {n(r['max_ready_s'], 2)} s; first start with "
            f"database creation {n(r['first_start_ready_s'], 2)} s)",
            "< 2 s",
            met(r["median_ready_s"] < 2),
        )
        for r in records
    ]


def dashboard_rows(records: list[Record]) -> list[Row]:
    rows: list[Row] = []
    for r in records:
        rows.append(
            (
                f"Dashboard: page weight, empty cache ({r['requests']} requests; reload)",
                f"{n(r['transferred_kb'], 1)} KiB transferred ({n(r['decoded_kb'], 1)} KiB "
                f"uncompressed); reload {n(r['reload_transferred_kb'], 1)} KiB",
                "-",
                "-",
            )
        )
        rows.append(
            (
                f"Dashboard: navigation → first price drawn (median of {r['loads']} loads)",
                f"{n(r['first_price_ms_median'])} ms (max {n(r['first_price_ms_max'])} ms; "
                f"reload {n(r['reload_first_price_ms_median'])} ms)",
                "board within 5 s",
                met(r["first_price_ms_max"] < 5000),
            )
        )
    return rows


BENCHES: dict[str, Bench] = {
    "ingest": Bench(
        "benchmarks.bench_ingest",
        ["--seconds", "10", "--rates", "10000,100000,max", "--naive"],
        ["--seconds", "2", "--rates", "10000,max"],
        900,
        ingest_rows,
    ),
    "freshness": Bench(
        "benchmarks.bench_freshness",
        ["--seconds", "20", "--rates", "1000,10000,100000"],
        ["--seconds", "3", "--rates", "1000,100000"],
        600,
        freshness_rows,
    ),
    "api": Bench(
        "benchmarks.bench_api",
        ["--seconds", "10", "--connections", "8,64", "--profile", str(PROFILES)],
        ["--seconds", "2", "--connections", "8,64"],
        900,
        api_rows,
    ),
    "ws": Bench(
        "benchmarks.bench_ws",
        ["--clients", "1000", "--seconds", "20", "--profile", str(PROFILES)],
        ["--clients", "100", "--seconds", "3"],
        600,
        ws_rows,
    ),
    "candles": Bench(
        "benchmarks.bench_candles",
        ["--seconds", "10", "--connections", "8", "--profile", str(PROFILES)],
        ["--seconds", "2", "--connections", "8"],
        900,
        candles_rows,
    ),
    "ws-candles": Bench(
        "benchmarks.bench_ws",
        ["--clients", "1000", "--seconds", "20", "--candles", "1m,1h"],
        ["--clients", "100", "--seconds", "3", "--candles", "1m,1h"],
        600,
        ws_rows,
    ),
    "startup": Bench(
        "benchmarks.bench_startup", ["--runs", "5"], ["--runs", "2"], 300, startup_rows
    ),
    "memory": Bench(
        "benchmarks.bench_memory",
        ["--seconds", "600", "--rate", "100000"],
        ["--seconds", "30", "--rate", "100000"],
        1200,
        memory_rows,
    ),
    "dashboard": Bench(
        "benchmarks.bench_dashboard", ["--loads", "10"], ["--loads", "2"], 300, dashboard_rows
    ),
    "roles": Bench(
        "benchmarks.bench_roles",
        ["--seconds", "10", "--clients", "1000"],
        ["--seconds", "2", "--clients", "100"],
        900,
        roles_rows,
    ),
    "connectors": Bench(
        "benchmarks.bench_connectors",
        ["--seconds", "0.5", "--repeat", "5"],
        ["--seconds", "0.1", "--repeat", "1"],
        300,
        connectors_rows,
    ),
    "scale": Bench(
        "benchmarks.bench_scale",
        ["--seconds", "120", "--rates", "2000,10000"],
        ["--seconds", "5", "--warmup", "2", "--rates", "5000", "--calibrate-flushes", "10"],
        900,
        scale_rows,
    ),
    "takeover": Bench(
        "benchmarks.bench_takeover",
        ["--kills", "10"],
        ["--kills", "2"],
        900,
        takeover_rows,
    ),
    "cluster": Bench(
        "benchmarks.bench_cluster", ["--seconds", "10"], ["--seconds", "1"], 300, cluster_rows
    ),
}


# --- running -------------------------------------------------------------------------------------


def run_bench(name: str, args: list[str], timeout_s: float) -> tuple[list[Record], str | None]:
    """Run one benchmark module; its records, and an error text if it failed."""
    command = [sys.executable, "-m", BENCHES[name].module, *args]
    print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    records: list[Record] = []
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, bufsize=1)
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("bench"):
                records.append(record)
        if time.monotonic() > deadline:
            proc.kill()
            break
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    error = None if code == 0 else f"exit status {code}"
    return records, error


def command_text(name: str, args: list[str]) -> str:
    shown = [a if not a.startswith(str(REPO)) else str(Path(a).relative_to(REPO)) for a in args]
    return f"`.venv/bin/python -m {BENCHES[name].module} {' '.join(shown)}`"


def render(results: dict[str, Any]) -> str:
    lines = [
        "| figure | measured | target | met | command | commit | machine |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in BENCHES:
        entry = results.get(name)
        if entry is None:
            continue
        quick = " (quick)" if entry.get("quick") else ""
        rows = BENCHES[name].rows([r for r in entry["records"] if r["bench"] == name])
        if entry.get("error"):
            rows.append((f"{name}: the benchmark failed", entry["error"], "-", "**no**"))
        loads = [r["load1"] for r in entry["records"] if "load1" in r]
        load = f"; load ≤ {max(loads):.1f}" if loads else ""
        for figure, measured, target, ok in rows:
            lines.append(
                f"| {figure}{quick} | {measured} | {target} | {ok} | {entry['command']} "
                f"| {entry['commit']} | {entry['machine']}; {entry['date']}{load} |"
            )
    return "\n".join(lines)


PROFILE_COLUMNS = [
    "marketflow request handling",
    "WebSocket hub",
    "ingest",
    "stores (flusher, aggregator, probes)",
    "Quart, Werkzeug, Blinker",
    "Hypercorn, h11, wsproto",
    "trio core and the rest",
    "idle (waiting in epoll)",
]  # the categories of benchmarks.common.CATEGORIES, plus the fall-through


def render_profiles(results: dict[str, Any]) -> str:
    """Where marketflow's main thread spent its samples under each profiled load (py-spy)."""
    records = [
        (entry, r)
        for name in ("api", "ws", "candles")
        if (entry := results.get(name))
        for r in entry["records"]
        if r["bench"].endswith("-profile") and r.get("samples")
    ]
    if not records:
        return ""
    lines = [
        "Where marketflow's main thread spends its time under load (py-spy `--threads --idle`, "
        "share of the main thread's samples; each sample goes to the innermost frame that "
        "belongs to a column, i.e. the code doing the work; Trio's own frames and the standard "
        "library's fall through to *trio core and the rest*):",
        "",
        "| load | samples | " + " | ".join(PROFILE_COLUMNS) + " | hottest frames (self) |",
        "|---" * (len(PROFILE_COLUMNS) + 3) + "|",
    ]
    for entry, r in records:
        shares = dict(r["categories"])
        hottest = "; ".join(f"{f} {p} %" for f, p in r["self"][:3])
        lines.append(
            f"| {r['case']} ({entry['commit']}) | {r['samples']} | "
            + " | ".join(f"{shares.get(c, 0.0)} %" for c in PROFILE_COLUMNS)
            + f" | {hottest} |"
        )
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = (
        "<!-- Generated by `make bench` (benchmarks/run.py) from docs/performance.json; "
        "edits between the markers are overwritten. -->"
    )
    DOC.write_text(f"{head}{BEGIN}\n{note}\n\n{table}\n\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--only", default="", help=f"comma list of: {', '.join(BENCHES)}")
    parser.add_argument("--no-write", action="store_true", help="leave docs/ untouched")
    parser.add_argument("--memory-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    names = [x.strip() for x in args.only.split(",") if x.strip()] or list(BENCHES)
    unknown = [x for x in names if x not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    results: dict[str, Any] = {}
    if RESULTS.exists() and not args.no_write:
        results = json.loads(RESULTS.read_text())
    here = {"commit": commit(), "machine": machine()}
    failed = False
    for name in names:
        bench = BENCHES[name]
        bench_args = list(bench.quick if args.quick else bench.full)
        if name == "memory" and args.memory_seconds:
            bench_args[bench_args.index("--seconds") + 1] = f"{args.memory_seconds:g}"
        records, error = run_bench(name, bench_args, bench.timeout_s)
        failed = failed or error is not None
        results[name] = {
            **here,
            "date": datetime.date.today().isoformat(),
            "quick": args.quick,
            "command": command_text(name, bench_args),
            "records": records,
            "error": error,
        }
    current = {k: v for k, v in results.items() if k in BENCHES}
    table = render(current)
    profiles = render_profiles(current)
    if profiles:
        table += "\n\n" + profiles
    print("\n" + table)
    if not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_doc(table)
        print(f"\nwrote {DOC.relative_to(REPO)} and {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
