"""Command line: `marketflow [--port N] [--config PATH] [--mode live|test] [--role R]`,
`marketflow simulate`.

Exit codes: 0 clean shutdown, 1 start-up failure (e.g. port in use), 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import trio

from marketflow import __version__
from marketflow.config import ConfigError, config_path, load_config

USAGE = """marketflow [--port <N>] [--config <path>] [--mode live|test] [--role all|ingest|api]
       marketflow simulate [--ports 40101,40102,40103] [--rate N] [--seed S]"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line, exit 2
        print(f"marketflow: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="marketflow",
        usage=USAGE,
        description="Real-time market data: TCP feeds -> Redis windows, PostgreSQL minute "
        "aggregates, REST and WebSocket API.",
        epilog="Config: --config, else $MARKETFLOW_CONFIG, else ./config.toml if present, else "
        "defaults. Environment MARKETFLOW_<TABLE>_<KEY> (plus DB_HOST, REDIS_HOST) overrides "
        "the file; flags override both.",
    )
    parser.add_argument("--port", type=_port, help="HTTP port (overrides [http].port)")
    parser.add_argument("--config", metavar="PATH", help="config file (TOML)")
    parser.add_argument("--mode", choices=("live", "test"), help="data mode at start")
    parser.add_argument(
        "--role",
        choices=("all", "ingest", "api"),
        help="all: one process does everything (default); ingest: sources to Redis and "
        "PostgreSQL; api: answers from Redis and PostgreSQL",
    )
    parser.add_argument("--version", action="version", version=f"marketflow {__version__}")
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulate"]:
        from marketflow.simulator import main as simulate

        return simulate(args_list[1:])
    args = build_parser().parse_args(args_list)
    flags: dict[str, Any] = {}
    if args.port is not None:
        flags.setdefault("http", {})["port"] = args.port
    if args.mode is not None:
        flags.setdefault("app", {})["mode"] = args.mode
    if args.role is not None:
        flags.setdefault("app", {})["role"] = args.role
    try:
        config = load_config(config_path(args.config, os.environ), flags=flags)
    except ConfigError as exc:
        print(f"marketflow: config error: {exc}", file=sys.stderr)
        return 2

    from marketflow.app import serve
    from marketflow.logs import configure_logging

    configure_logging(config.log.level, config.log.format, secrets=config.secrets)
    try:
        trio.run(serve, config)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        reason = _startup_failure(exc)
        if reason is None:
            raise
        logging.getLogger("marketflow").error("start-up failed", extra={"ctx": {"error": reason}})
        print(f"marketflow: {reason}", file=sys.stderr)
        return 1
    return 0


def _startup_failure(exc: BaseException) -> str | None:
    """A one-line reason for known start-up failures (port in use, no permission)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_failure(inner)
            if found:
                return found
        return None
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen: address already in use ({exc.strerror})"
        return f"{type(exc).__name__}: {exc}"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
