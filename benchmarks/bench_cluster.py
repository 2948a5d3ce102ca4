"""Redis cost of the live state, one server against a 3-master Redis Cluster: commands/s and
bytes/s for 1,000 keys at 100,000 updates/s.

    .venv/bin/python -m benchmarks.bench_cluster [--seconds 10] [--keys 1000] [--rate 100000]

For each target — a private `redis-server` on a free port, then a local 3-master cluster
(`tests.cluster.LocalCluster`, `redis-cli --cluster create`) — the real flusher
(`RedisFlusher` + `RedisPriceStore`) writes the plans of `--keys` keys (10 sources x 100
symbols) fed `--rate` updates/s spread evenly over them, one flush per `flush_interval_ms`
(100 ms) of a simulated clock that starts at the wall clock; the flushes run back to back, so
`--seconds` of market time take less on the wall clock. Before and after, each server's
`INFO commandstats` (calls, without the INFO calls themselves) and `INFO stats`
(`total_net_input_bytes`, `total_net_output_bytes`) are read: the deltas over the simulated
seconds are the figures, summed over the servers and per server. Also: pipelined rounds per
flush (counted in the client) and the wall time per flush.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import trio

from benchmarks.common import emit, percentile, progress
from marketflow.config import RedisConfig
from marketflow.flusher import RedisFlusher
from marketflow.health import StoreHealth
from marketflow.metrics import Metrics
from marketflow.models import Key
from marketflow.state import MarketState
from marketflow.store.redis import RedisPriceStore
from tests.cluster import LocalCluster
from tests.procs import RedisServer

INTERVAL_S = 0.1  # flush_interval_ms


def server_counters(port: int) -> tuple[int, int, int]:
    """(commands, bytes in, bytes out) a server has handled, INFO calls left out."""
    with redis.Redis(port=port, decode_responses=True) as r:
        commands = r.info("commandstats")
        stats = r.info("stats")
    calls = sum(int(v["calls"]) for k, v in commands.items() if k != "cmdstat_info")
    return calls, int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


class RoundCounter:
    """Pipelined rounds sent by the client (each `Pipeline.execute`)."""

    def __init__(self) -> None:
        self.rounds = 0
        self._original = redis.client.Pipeline.execute
        counter = self

        def execute(pipe: Any, *a: Any, **kw: Any) -> Any:
            counter.rounds += 1
            return counter._original(pipe, *a, **kw)

        redis.client.Pipeline.execute = execute  # type: ignore[method-assign]

    def close(self) -> None:
        redis.client.Pipeline.execute = self._original  # type: ignore[method-assign]


def keys_for(count: int) -> list[Key]:
    sources = 10
    return [(f"exchange{s}", f"SYM{i:03d}USDT") for s in range(sources) for i in range(count // 10)]


async def run(
    case: str, config: RedisConfig, ports: list[int], keys: list[Key], rate: int, seconds: float
) -> dict[str, Any]:
    store = RedisPriceStore(config, window_seconds=300, ttl_seconds=70)
    state = MarketState(window_seconds=300)
    now = [time.time()]
    flusher = RedisFlusher(
        state, store, StoreHealth("redis"), Metrics(), interval_s=INTERVAL_S, clock=lambda: now[0]
    )
    published = [0]  # bytes of the `updates` messages (part of the bytes in)
    encode = flusher.message

    def message(plan: Any) -> bytes:
        body = encode(plan)
        published[0] += len(body)
        return body

    flusher.message = message  # type: ignore[method-assign]
    per_flush = int(rate * INTERVAL_S)
    per_key = max(1, per_flush // len(keys))

    def feed() -> None:
        ts = int(now[0] * 1000)
        for i, (source, symbol) in enumerate(keys):
            st = state.key(source, symbol)
            st.fold([(symbol, 100.0 + (i % 13) * 0.01 + k * 0.001, ts) for k in range(per_key)])

    # Warm up: the first flush writes every key whole; then a second of steady flushes.
    for _ in range(int(1 / INTERVAL_S) + 1):
        feed()
        assert await flusher.flush()
        now[0] += INTERVAL_S
    before = {port: server_counters(port) for port in ports}
    published[0] = 0
    counter = RoundCounter()
    flushes = int(seconds / INTERVAL_S)
    walls: list[float] = []
    try:
        for _ in range(flushes):
            feed()
            started = time.perf_counter()
            ok = await flusher.flush()
            walls.append((time.perf_counter() - started) * 1000)
            assert ok, f"{case}: a flush failed"
            now[0] += INTERVAL_S
    finally:
        counter.close()
    after = {port: server_counters(port) for port in ports}
    spread: dict[str, int] = {}
    if config.cluster:
        for key in keys:
            spread[store.node_of(key)] = spread.get(store.node_of(key), 0) + 1
    store.close()
    market_s = flushes * INTERVAL_S
    deltas = {p: [a - b for a, b in zip(after[p], before[p], strict=True)] for p in ports}
    commands = sum(d[0] for d in deltas.values())
    bytes_in = sum(d[1] for d in deltas.values())
    bytes_out = sum(d[2] for d in deltas.values())
    scale = 1000 / len(keys)
    return emit(
        "cluster",
        case,
        keys=len(keys),
        masters=len(ports),
        updates_per_s=per_key * len(keys) / INTERVAL_S,
        market_seconds=market_s,
        flushes=flushes,
        commands_per_s=round(commands / market_s),
        bytes_in_per_s=round(bytes_in / market_s),
        bytes_out_per_s=round(bytes_out / market_s),
        updates_message_bytes_per_s=round(published[0] / market_s),
        commands_per_s_per_1000_keys=round(commands / market_s * scale),
        bytes_in_per_s_per_1000_keys=round(bytes_in / market_s * scale),
        commands_per_flush=round(commands / flushes, 1),
        rounds_per_flush=round(counter.rounds / flushes, 2),
        per_master_commands_share=sorted(
            (round(d[0] / max(commands, 1), 3) for d in deltas.values()), reverse=True
        ),
        flush_ms_median=round(statistics.median(walls), 2),
        flush_ms_p99=round(percentile(walls, 99) or 0.0, 2),
        keys_per_master=sorted(spread.values(), reverse=True) or [len(keys)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="market seconds per target")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=100_000, help="updates/s over all keys")
    args = parser.parse_args()
    keys = keys_for(args.keys)
    progress(f"single redis-server: {len(keys)} keys at {args.rate} updates/s")
    single = RedisServer()
    try:
        trio.run(
            run,
            "single",
            RedisConfig(port=single.port),
            [single.port],
            keys,
            args.rate,
            args.seconds,
        )
    finally:
        single.close()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        progress("3-master redis cluster")
        cluster = LocalCluster(Path(tmp))
        try:
            config = RedisConfig(cluster=True, nodes=cluster.nodes)
            trio.run(run, "cluster", config, cluster.ports, keys, args.rate, args.seconds)
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
