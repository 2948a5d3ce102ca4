"""Hot standby under repeated kills: takeover time and ticks missing, measured.

    .venv/bin/python -m benchmarks.bench_takeover [--kills 10] [--ttl-ms 3000] [--rate 200]

Two `marketflow --role ingest` processes read two `CountingFeed`s (each counts exactly the lines
it writes to each connection) with one Redis and one PostgreSQL. The process holding the leases
is SIGKILLed; the standby takes over; a fresh process is started as the next standby; and so on,
`--kills` times. Per kill: the seconds from the kill to the standby's connection on every feed
(target: within lease_ttl_ms + a renewal period, plus its restore and connect), and how many
ticks the feeds sent in that time to nobody (the gap: no process was connected). At the end:
ticks sent on all connections, the sum of tick_count in PostgreSQL, and the difference — which
is at most what the killed holders had not yet flushed (their last flush interval each), since
the takeover resumes the open minutes from Redis and PostgreSQL; no minute is doubled.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import emit, progress
from tests.procs import (
    CountingFeed,
    Marketflow,
    postgres_database,
    redis_prefix,
    wait_for,
)


def config(
    tmp: Path, slot: int, dbname: str, prefix: str, feeds: list[CountingFeed], ttl_ms: int
) -> dict[str, Any]:
    return {
        "postgres": {"dbname": dbname},
        "redis": {"key_prefix": prefix},
        "exchanges": [
            {"name": f"exchange{i + 1}", "host": "127.0.0.1", "port": f.port}
            for i, f in enumerate(feeds)
        ],
        "app": {
            "mode": "live",
            "role": "ingest",
            "lease_ttl_ms": ttl_ms,
            "grace_ms": 500,
            "data_dir": str(tmp / f"data{slot}"),
        },
        "log": {"level": "warning"},
    }


def stored(dbname: str) -> tuple[int, int]:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        (total,) = conn.execute("SELECT coalesce(sum(tick_count), 0) FROM aggregates").fetchone()
        (dupes,) = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM aggregates"
            " GROUP BY exchange, pair_name, timestamp HAVING count(*) > 1) d"
        ).fetchone()
    return int(total), int(dupes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--ttl-ms", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200, help="lines/s per feed")
    args = parser.parse_args(argv)
    feeds = [CountingFeed(rate=args.rate) for _ in range(2)]
    procs: list[Marketflow] = []
    takeovers: list[float] = []
    gaps: list[int] = []
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            redis_prefix() as prefix,
            postgres_database() as dbname,
        ):
            base = Path(tmp)
            holder = Marketflow(base, config(base, 0, dbname, prefix, feeds, args.ttl_ms))
            procs.append(holder)
            wait_for(lambda: all(f.connections == 1 for f in feeds), 20, "first holder")
            standby = Marketflow(base, config(base, 1, dbname, prefix, feeds, args.ttl_ms))
            procs.append(standby)
            wait_for(lambda: standby.health()["status"] == "standby", 20, "standby")
            for kill in range(args.kills):
                wait_for(lambda: sum(f.total for f in feeds) > 0, 5, "ticks flowing")
                time.sleep(1.0)  # a second of ticks on this holder
                connections = [f.connections for f in feeds]
                holder.signal(signal.SIGKILL)
                killed = time.monotonic()
                holder.wait(10)
                # The feeds' next connection is the standby's.
                wait_for(
                    lambda c=connections: all(
                        f.connections > n for f, n in zip(feeds, c, strict=True)
                    ),
                    args.ttl_ms / 1000 * 3 + 20,
                    "the standby connected",
                    interval=0.01,
                )
                takeovers.append(round(time.monotonic() - killed, 2))
                # Lines the feeds counted for the dead holder after it died cannot be told apart
                # from those before; the gap is what arrived while nobody was connected.
                gaps.append(int(args.rate * len(feeds) * takeovers[-1]))
                progress(f"takeover {kill + 1}/{args.kills}: {takeovers[-1]} s")
                next_config = config(base, kill + 2, dbname, prefix, feeds, args.ttl_ms)
                holder, standby = standby, Marketflow(base, next_config)
                procs.append(standby)
                wait_for(lambda s=standby: s.health()["status"] == "standby", 20, "new standby")
            for feed in feeds:
                feed.pause()
            sent = sum(f.total for f in feeds)
            holder.signal(signal.SIGTERM)
            holder.wait(30)
            standby.signal(signal.SIGTERM)
            standby.wait(30)
            total, dupes = stored(dbname)
    finally:
        for p in procs:
            p.close()
        for f in feeds:
            f.close()
    ordered = sorted(takeovers)
    emit(
        "takeover",
        f"{args.kills} SIGKILLs of the lease holder, lease_ttl_ms={args.ttl_ms}",
        kills=args.kills,
        lease_ttl_ms=args.ttl_ms,
        rate_per_feed=args.rate,
        takeover_s_median=ordered[len(ordered) // 2],
        takeover_s_max=ordered[-1],
        takeover_s=takeovers,
        bound_s=round((args.ttl_ms + args.ttl_ms / 3) / 1000, 2),
        sent=sent,
        stored=total,
        missing=sent - total,
        missing_per_kill=round((sent - total) / args.kills, 1),
        missing_during_gaps_estimate=sum(gaps),
        rows_doubled=dupes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
