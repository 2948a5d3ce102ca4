"""`marketflow simulate`: stand-alone exchange feeds like the reference simulators (contract: feed
protocol, modes).

Every accepted connection gets its own price walk and its own ticker: one line per symbol every
100 ms, symbols in the configured order, one timestamp per round, starting at once. The reference
captures show first prices several steps away from the base prices, so each connection's walk
starts a few steps off them (`START_STEPS`). With `--seed` the walk of the n-th connection on the
i-th port is repeatable.

`--rate N` (lines/s per connection) above the default 50 sends more rounds per write, at most every
10 ms, so one process reaches hundreds of thousands of lines/s. A client that cannot keep up is
not buffered for: rounds it could not take are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

import trio

from marketflow.config import DEFAULT_SYMBOLS, SYMBOL_RE
from marketflow.generator import PriceWalk
from marketflow.logs import bind, configure_logging, log_event

log = logging.getLogger("marketflow.simulator")

DEFAULT_PORTS = [40101, 40102, 40103]
DEFAULT_RATE = 50.0
START_STEPS = 5.0  # first prices within ±5 steps of the base prices, like the captures
MIN_PERIOD = 0.01
MAX_LINES_PER_SEND = 50_000  # ~3.5 MB; bounds a catch-up write


def _period(rate: float, n_symbols: int) -> float:
    """One round per period at low rates (100 ms for 50 lines/s of 5 symbols), at least 10 ms."""
    return max(MIN_PERIOD, n_symbols / rate)


def encode_rounds(walk: PriceWalk, rounds: int, ts: int, prefixes: Sequence[str]) -> bytes:
    """`rounds` steps of `walk` as feed lines, all with timestamp `ts`; pure."""
    suffix = f',"timestamp":{ts}}}\n'
    parts: list[str] = []
    append = parts.append
    for _ in range(rounds):
        for prefix, (_, price) in zip(prefixes, walk.step(), strict=True):
            append(f"{prefix}{price!r}{suffix}")
    return "".join(parts).encode()


async def stream_feed(stream: trio.abc.SendStream, walk: PriceWalk, *, rate: float) -> None:
    """Send `walk` to `stream` at `rate` lines/s on a fixed schedule, until the stream breaks.

    The caller owns the stream. Raises BrokenResourceError/ClosedResourceError when the client
    goes away; on cancellation it just stops (a write in progress may be cut short).
    """
    n = len(walk.symbols)
    prefixes = [f'{{"symbol":"{s}","price":' for s in walk.symbols]
    rounds_per_s = rate / n
    period = _period(rate, n)
    max_rounds = max(1, MAX_LINES_PER_SEND // n)
    anchor = trio.current_time()
    tick_no = 0
    sent = 0  # rounds since anchor
    while True:
        due = min(max_rounds, math.floor((tick_no + 1) * period * rounds_per_s + 1e-9) - sent)
        if due > 0:
            ts = time.time_ns() // 1_000_000
            await stream.send_all(encode_rounds(walk, due, ts, prefixes))
            sent += due
        tick_no += 1
        deadline = anchor + tick_no * period
        now = trio.current_time()
        if now > deadline + period:
            anchor, tick_no, sent = now, 0, 0  # the client is slow: skip, do not burst
            deadline = now
        await trio.sleep_until(deadline)


async def serve_simulator(
    ports: list[int],
    *,
    host: str = "127.0.0.1",
    rate: float = DEFAULT_RATE,
    seed: int | None = None,
    symbols: Sequence[str] = DEFAULT_SYMBOLS,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one feed per port until cancelled; `task_status.started(bound_ports)` once listening.

    Ports may be 0 (a free port each). Owns its listeners and connections; each connection runs
    in its own task and a client going away ends only that task. An unexpected error in one
    connection is logged with its traceback and closes that connection, never the server.
    On cancellation every listener and connection is closed. Binding errors (port in use) raise
    OSError before `started`.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    symbols = list(symbols)
    all_listeners: list[list[trio.SocketListener]] = []
    try:
        for port in ports:
            listeners = await trio.open_tcp_listeners(port, host=host)
            if port == 0:
                # Each address family would get a different free port: keep one, one port.
                for extra in listeners[1:]:
                    extra.socket.close()
                listeners = listeners[:1]
            all_listeners.append(listeners)
    except BaseException:
        for listeners in all_listeners:
            for listener in listeners:
                listener.socket.close()
        raise
    bound = [listeners[0].socket.getsockname()[1] for listeners in all_listeners]
    async with trio.open_nursery() as nursery:
        for index, (port, listeners) in enumerate(zip(bound, all_listeners, strict=True)):
            handler = partial(
                _handle_connection,
                port=port,
                symbols=symbols,
                rate=rate,
                # Seeds follow the port's position, not its number, so port-0 runs repeat too.
                seed_prefix=None if seed is None else f"{seed}:{index}",
                counter=itertools.count(1),
            )
            nursery.start_soon(partial(trio.serve_listeners, handler, listeners))
        log_event(
            log,
            "info",
            "simulator.listening",
            host=host,
            ports=_ports_text(bound),
            rate=rate,
            seed=seed,
        )
        task_status.started(bound)


async def _handle_connection(
    stream: trio.SocketStream,
    *,
    port: int,
    symbols: list[str],
    rate: float,
    seed_prefix: str | None,
    counter: itertools.count[int],
) -> None:
    """One client: its own walk and ticker; closes the stream whatever happens."""
    number = next(counter)
    # random.Random hashes a str seed deterministically (hash() of a tuple would not be).
    seed = None if seed_prefix is None else f"{seed_prefix}:{number}"
    walk = PriceWalk(symbols, seed=seed, start_steps=START_STEPS)
    with bind(conn_id=f"{port}-{number}"):
        try:
            peer = "{}:{}".format(*stream.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        log_event(log, "info", "simulator.connected", peer=peer)
        try:
            await stream_feed(stream, walk, rate=rate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log_event(log, "info", "simulator.disconnected")
        except Exception:
            log.exception("simulator.connection_failed")
        finally:
            await stream.aclose()


def _ports_text(ports: Sequence[int]) -> str:
    return ",".join(str(p) for p in ports)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, one clear line on stderr)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port_list(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated port list") from None
    if not all(0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 0..65535")
    nonzero = [p for p in ports if p]
    if len(set(nonzero)) != len(nonzero):
        raise argparse.ArgumentTypeError(f"{text!r}: a port is repeated")
    return ports


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the rate must be > 0 (lines/s)")
    return rate


def _symbol_list(text: str) -> list[str]:
    symbols = [part.strip().upper() for part in text.split(",") if part.strip()]
    bad = [s for s in symbols if not SYMBOL_RE.fullmatch(s)]
    if not symbols or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: symbols match [A-Za-z0-9]{{2,20}}")
    return symbols


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="marketflow simulate",
        description="Stand-alone TCP exchange feeds like the reference simulators.",
    )
    parser.add_argument(
        "--ports",
        type=_port_list,
        default=list(DEFAULT_PORTS),
        help="comma-separated ports, 0 = any free port (default 40101,40102,40103)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--rate",
        type=_positive_rate,
        default=DEFAULT_RATE,
        help="lines/s per connection (default 50: 5 symbols every 100 ms)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for repeatable prices")
    parser.add_argument(
        "--symbols",
        type=_symbol_list,
        default=list(DEFAULT_SYMBOLS),
        help="comma-separated symbols, in sending order",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="logfmt", choices=["logfmt", "json"])
    return parser


async def _run(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM; print the bound ports on stdout once listening."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                partial(
                    serve_simulator,
                    args.ports,
                    host=args.host,
                    rate=args.rate,
                    seed=args.seed,
                    symbols=args.symbols,
                )
            )
            print(f"simulator listening host={args.host} ports={_ports_text(ports)}", flush=True)
            async for signum in signals:
                log_event(log, "info", "simulator.stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str]) -> int:
    """`marketflow simulate [--ports P,...] [--rate N] [--seed S] [--host H]`: the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        trio.run(_run, args)
    except (OSError, KeyboardInterrupt, BaseExceptionGroup) as exc:
        # Trio wraps errors from nurseries in groups; only a group of these is expected.
        leaves = _leaves(exc)
        if not all(isinstance(e, OSError | KeyboardInterrupt) for e in leaves):
            raise
        bind_errors = [e for e in leaves if isinstance(e, OSError)]
        if bind_errors:  # a port in use, an address not available
            error = bind_errors[0]
            print(
                f"marketflow simulate: cannot listen on {args.host} "
                f"ports {_ports_text(args.ports)}: {error.strerror or error}",
                file=sys.stderr,
            )
            return 1
        # KeyboardInterrupt: a signal before the receiver was installed; a clean stop too.
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
