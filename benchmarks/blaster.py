"""A fast feed for load tests: a TCP server that blasts valid feed lines at the first client.

    python -m benchmarks.blaster --port 40101 --max --seconds 10
    python -m benchmarks.blaster --port 0 --rate 200000 --seconds 5 --symbols BTCUSDT,ETHUSDT

marketflow's reader connects to it as to an exchange. Once a client connects, the blaster sends
lines as fast as the socket takes them (`--max`) or at `--rate` lines/s paced in 10 ms chunks, for
`--seconds`, with current timestamps, or until SIGUSR1 (which ends the sending at the next chunk
boundary, so the count stays exact). Then it stops sending but keeps the connection open until
the client closes it or the process gets SIGINT/SIGTERM (exit 0).

stdout, one JSON object a line: first `{"listening": {"host": ..., "port": ...}}` (the bound port,
useful with `--port 0`), then, when sending ends, the summary
`{"sent": N, "per_symbol": {...}, "seconds": ..., "rate": ..., "bytes": ...}`; `sent` is exactly the
number of complete lines written (whole rounds of all symbols, in order).

Speed: lines are encoded once into a pool (a random walk, mirrored so that cycling through it never
jumps), each split before its timestamp; a chunk is `ts.join(pool slice)`, a single C-level join per
~512 KiB, so the Python cost per line is near zero. Plain blocking sockets: one client, no
concurrency needed, and `sendall` of large buffers is the cheapest path.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from marketflow.config import DEFAULT_SYMBOLS
from marketflow.generator import PriceWalk

POOL_ROUNDS = 4096  # distinct rounds before the pool mirrors back
CHUNK_BYTES = 512 * 1024  # per sendall in --max mode
TICK_S = 0.01  # pacing period in --rate mode


class Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> NoReturn:
    raise Stop


class Finish:
    """SIGUSR1 sets `requested`: stop sending at the next chunk boundary."""

    requested = False

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        cls.requested = True


def build_heads(symbols: Sequence[str], seed: int | None, rounds: int = POOL_ROUNDS) -> list[bytes]:
    """Pool lines, each as `}\\n{"symbol":..,"price":..,"timestamp":` (the closer of the previous
    line first); mirrored, so the prices walk back and forth without a jump."""
    walk = PriceWalk(symbols, seed=seed, start_steps=5.0)
    forward = [
        [f'}}\n{{"symbol":"{s}","price":{p!r},"timestamp":'.encode() for s, p in walk.step()]
        for _ in range(rounds)
    ]
    return [head for round_ in forward + forward[::-1] for head in round_]


class Pool:
    """Cyclic source of encoded rounds; `take(rounds, ts)` gives complete lines as bytes."""

    def __init__(self, symbols: Sequence[str], seed: int | None, max_rounds: int) -> None:
        self.n_symbols = len(symbols)
        heads = build_heads(symbols, seed)
        self.pool_rounds = len(heads) // self.n_symbols
        if max_rounds > self.pool_rounds:
            raise ValueError("a chunk may not be larger than the pool")
        # Room to slice past the end without wrapping.
        self.heads = heads + heads[: max_rounds * self.n_symbols]
        self.max_rounds = max_rounds
        self.offset = 0  # in rounds

    def take(self, rounds: int, ts: int) -> memoryview:
        n = self.n_symbols
        start = self.offset * n
        parts = self.heads[start : start + rounds * n]
        parts.append(b"}\n")
        self.offset = (self.offset + rounds) % self.pool_rounds
        return memoryview(str(ts).encode().join(parts))[2:]  # drop the leading "}\n"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def blast(
    sock: socket.socket, pool: Pool, *, seconds: float, rate: float | None
) -> tuple[int, int, float, str | None]:
    """Send for `seconds`; (rounds sent, bytes sent, elapsed s, reason stopped early or None)."""
    rounds_sent = 0
    nbytes = 0
    start = time.monotonic()
    end = start + seconds
    rounds_per_s = None if rate is None else rate / pool.n_symbols
    tick = 0
    stopped: str | None = None
    try:
        while True:
            now = time.monotonic()
            if rounds_per_s is None:
                if now >= end or Finish.requested:
                    break
                due = pool.max_rounds
            else:  # what is due by now, and at the end exactly seconds * rate
                due = math.floor(min(now - start, seconds) * rounds_per_s) - rounds_sent
            while due > 0:
                rounds = min(due, pool.max_rounds)
                buf = pool.take(rounds, _now_ms())
                sock.sendall(buf)
                rounds_sent += rounds
                nbytes += len(buf)
                due -= rounds
                if rounds_per_s is None:
                    break
            if rounds_per_s is not None:
                if now >= end or Finish.requested:
                    break
                tick += 1
                pause = start + tick * TICK_S - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        stopped = "client_closed"
    except Stop:
        stopped = "interrupted"  # a chunk may have been cut short; it is not counted
    return rounds_sent, nbytes, time.monotonic() - start, stopped


def _hold(conn: socket.socket) -> None:
    """Keep the connection open until the client closes it (or a signal arrives)."""
    try:
        while conn.recv(65536):
            pass
    except (OSError, Stop):
        pass


def _emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def run(args: argparse.Namespace) -> int:
    symbols: list[str] = args.symbols
    line_bytes = 70
    max_rounds = max(1, CHUNK_BYTES // (line_bytes * len(symbols)))
    pool = Pool(symbols, args.seed, max_rounds)
    with socket.create_server((args.host, args.port), reuse_port=False) as server:
        _emit({"listening": {"host": args.host, "port": server.getsockname()[1]}})
        try:
            conn, _ = server.accept()
        except Stop:
            _emit(
                {
                    "sent": 0,
                    "per_symbol": dict.fromkeys(symbols, 0),
                    "seconds": 0.0,
                    "rate": 0.0,
                    "bytes": 0,
                    "stopped": "interrupted",
                }
            )
            return 0
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            rounds, nbytes, elapsed, stopped = blast(
                conn, pool, seconds=args.seconds, rate=None if args.max else args.rate
            )
            sent = rounds * len(symbols)
            summary: dict[str, object] = {
                "sent": sent,
                "per_symbol": dict.fromkeys(symbols, rounds),
                "seconds": round(elapsed, 6),
                "rate": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
                "bytes": nbytes,
                "mode": "max" if args.max else "rate",
            }
            if not args.max:
                summary["target_rate"] = args.rate
            if stopped:
                summary["stopped"] = stopped
            _emit(summary)
            if stopped is None:
                _hold(conn)
    return 0


def _symbols(text: str) -> list[str]:
    symbols = [s.strip().upper() for s in text.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("at least one symbol")
    return symbols


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.blaster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, required=True, help="0 = any free port")
    parser.add_argument("--host", default="127.0.0.1")
    speed = parser.add_mutually_exclusive_group(required=True)
    speed.add_argument("--rate", type=_positive, help="lines/s, paced in 10 ms chunks")
    speed.add_argument("--max", action="store_true", help="as fast as the client reads")
    parser.add_argument("--seconds", type=_positive, default=10.0)
    parser.add_argument("--symbols", type=_symbols, default=list(DEFAULT_SYMBOLS))
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGUSR1, Finish.handle)
    try:
        return run(args)
    except Stop:  # between the steps that handle it themselves
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
