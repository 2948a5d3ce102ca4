"""REST candles over a year of minutes, every request a different range.

    .venv/bin/python -m benchmarks.bench_candles [--seconds 10] [--connections 8] [--rate 10000]
        [--profile DIR]

marketflow (live mode) ingests `--rate` updates/s (10,000) from three `benchmarks.blaster` feeds
(a low rate tells the candles' own cost from ingest's); its database gets a year of minutes for
exchange1/BTCUSDT written straight into PostgreSQL (525,600 minute rows, 8,760 hourly rollup
rows), ending where the live minutes begin. wrk (`-t2 --latency`, keep-alive) then loads, in turn:

- `interval=1h&limit=1000`: 1,000 hourly candles (whole hours from the rollup);
- `interval=1m&limit=1000`: 1,000 one-minute candles (minute rows);

each request with its own range (a Lua script): half `start=<random ms in the year>` (the first
1,000 from there), half `end=<random ms>` (the last 1,000 before it). Afterwards the ticks
folded must equal the ticks sent, and the HTTP server alone (`benchmarks.bare_asgi`) answers a
fixed body of the same size, for the ceiling. Targets at 8 connections: 1h p99 < 50 ms,
1m p99 < 20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from benchmarks.bench_api import BareAsgi, wrk
from benchmarks.common import (
    Blaster,
    CpuMeter,
    blasters_done,
    emit,
    folded,
    live_marketflow,
    profile_breakdown,
    progress,
    py_spy,
    py_spy_record,
)
from tests.procs import Marketflow, wait_for

FEEDS = 3
RATE = 10_000
YEAR_MS = 365 * 86_400_000
KEY = ("exchange1", "BTCUSDT")
CASES = {"1h": 3_600_000, "1m": 60_000}

# Every request its own range: a random start (first 1,000 from it) or end (last 1,000 before
# it) anywhere in the year of minutes. LuaJIT numbers are doubles: ms since 1970 are exact.
LUA = """
math.randomseed({seed})
local first, span = {first}, {span}
local n = 0
request = function()
  n = n + 1
  local at = first + math.floor(math.random() * span)
  local side = (n % 2 == 0) and "start" or "end"
  return wrk.format("GET", "{path}&" .. side .. "=" .. string.format("%.0f", at))
end
"""

YEAR_SQL = """
INSERT INTO aggregates (exchange, pair_name, "timestamp", tick_count, average_price, min_price,
                        max_price, open_price, close_price, open_time, close_time)
SELECT %(exchange)s, %(symbol)s, m, 600, p, p - 1.5, p + 1.5, p - 0.5, p + 0.5,
       m + interval '37 milliseconds', m + interval '59963 milliseconds'
  FROM (SELECT timestamptz 'epoch' + (%(first)s + i * 60000) * interval '1 millisecond' AS m,
               100000 + 500 * sin(i / 1440.0) AS p
          FROM generate_series(0::bigint, %(minutes)s - 1) AS i) AS g
"""


def write_year(dbname: str, end_ms: int) -> int:
    """A year of minutes for KEY ending at `end_ms` (the rollup follows by its trigger); the
    first minute's ms."""
    minutes = YEAR_MS // 60_000
    first = end_ms - minutes * 60_000
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname, autocommit=True) as c:
        c.execute(
            YEAR_SQL,
            {"exchange": KEY[0], "symbol": KEY[1], "first": first, "minutes": minutes},
        )
        c.execute("VACUUM ANALYZE aggregates")
        c.execute("VACUUM ANALYZE aggregates_hourly")
        (rows,) = c.execute("SELECT count(*) FROM aggregates_hourly").fetchone() or (0,)
    progress(f"candles: wrote {minutes:,} minutes and {rows:,} hourly rows")
    return first


@contextlib.contextmanager
def service(rate: int, budget_s: float) -> Iterator[tuple[Marketflow, str, list[Blaster]]]:
    blasters = [Blaster(budget_s, rate / FEEDS, seed=i) for i in range(FEEDS)]
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            live_marketflow(Path(tmp), blasters) as (mf, dbname, _),
        ):
            wait_for(lambda: folded(mf) > 0, 30, "first ticks folded")
            yield mf, dbname, blasters
    finally:
        for b in blasters:
            b.close()


def ceiling(connections: list[int], seconds: float, body_bytes: int) -> None:
    """The HTTP server alone answering a fixed body of a thousand candles' size."""
    server = BareAsgi(body_bytes=body_bytes)
    try:
        for c in connections:
            progress(f"candles: bare ASGI, {body_bytes:,}-byte answers, {c} connections")
            emit(
                "candles",
                f"bare ASGI, {body_bytes:,} B answers, {c} conn",
                server="bare",
                body_bytes=body_bytes,
                connections=c,
                **wrk(server.url, c, seconds),
            )
    finally:
        server.close()


def run(seconds: float, connections: list[int], rate: int, profile: Path | None) -> None:
    budget = len(CASES) * len(connections) * (seconds + 5) + 180
    sizes: list[int] = []
    with service(rate, budget) as (mf, dbname, blasters):
        # The year ends ten minutes ago: the newest candles combine memory and PostgreSQL.
        end = (int(time.time() * 1000) // 60_000 - 10) * 60_000
        first = write_year(dbname, end)
        for name, iv in CASES.items():
            path = f"/prices/candles/{KEY[0]}/{KEY[1]}?interval={name}&limit=1000"
            # Ranges that hold 1,000 candles either way: starts from the year's start to 1,000
            # intervals before its end, ends from 1,000 intervals after its start.
            span = YEAR_MS - 1000 * iv
            sample = mf.get(f"{path}&start={first + span // 2}")
            if len(sample.json().get("candles", [])) != 1000:
                raise RuntimeError(f"GET {path}: {sample.text[:300]}")
            sizes.append(len(sample.content))
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
                script.write(LUA.format(seed=7, first=first + 1000 * iv, span=span, path=path))
            for c in connections:
                progress(f"candles: {name} x 1000, {c} connections")
                cpu = CpuMeter(mf.proc.pid)
                result = wrk(mf.url + path, c, seconds, script=script.name)
                emit(
                    "candles",
                    f"{name} x 1000, {c} conn",
                    interval=name,
                    connections=c,
                    ingesting=rate,
                    data="525,600 minute rows and 8,760 hourly rows for one key",
                    mix="each request a random range: half start=<ms> (first 1000), "
                    "half end=<ms> (last 1000)",
                    cpu_percent=round(cpu.read()),
                    **result,
                )
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                c = max(connections)
                out = profile / f"candles-{name}-{c}conn.txt"
                progress(f"candles: py-spy on {name} x 1000, {c} connections -> {out}")
                spy = py_spy_record(mf.proc.pid, out, seconds)
                result = wrk(mf.url + path, c, seconds, script=script.name)
                spy.wait(timeout=seconds + 30)
                emit(
                    "candles-profile",
                    f"{name} x 1000, {c} conn, under py-spy",
                    interval=name,
                    connections=c,
                    file=str(out),
                    requests_per_s=result["requests_per_s"],
                    **profile_breakdown(out),
                )
            Path(script.name).unlink()
        sent = blasters_done(blasters, 60, finish=True)
        wait_for(lambda: folded(mf) >= sent, 60, "every tick folded", interval=0.05)
        emit(
            "candles", "ingest during the candle load", rate=rate, sent=sent, lost=sent - folded(mf)
        )
    ceiling(connections, seconds, max(sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[8])
    parser.add_argument("--rate", type=int, default=RATE, help="updates/s ingested meanwhile")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args(argv)
    if args.profile is not None and py_spy() is None:
        progress("candles: py-spy is not installed (make bench installs it); no profile")
        args.profile = None
    if shutil.which("wrk") is None:
        progress("candles: wrk is not installed (make bench installs it with apt-get)")
        return 2
    run(args.seconds, args.connections, args.rate, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
