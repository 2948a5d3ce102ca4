"""`marketflow simulate` and the load-test blaster, over real localhost sockets on free ports."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from marketflow.generator import BASE_PRICES
from marketflow.simulator import main, serve_simulator
from tests.procs import child_environment

SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]
REPO = Path(__file__).resolve().parents[2]
Record = dict[str, object]


class LineReader:
    """Whole lines from a trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(bytes(self.buffer))
            self.buffer += data
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return line

    async def records(self, count: int) -> list[Record]:
        return [json.loads(await self.line()) for _ in range(count)]


@asynccontextmanager
async def simulator(
    ports: list[int] | None = None, *, rate: float = 50, seed: int | None = 1
) -> AsyncIterator[list[int]]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            partial(serve_simulator, ports or [0], rate=rate, seed=seed, symbols=SYMBOLS)
        )
        yield bound
        nursery.cancel_scope.cancel()


def rounds_of(records: list[Record]) -> list[list[Record]]:
    return [records[i : i + 5] for i in range(0, len(records), 5)]


async def test_rounds_of_five_symbols_every_100ms_with_current_timestamps() -> None:
    with trio.fail_after(10):
        async with simulator() as [port]:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                records = await LineReader(stream).records(30)  # six rounds, ~0.5 s
    now_ms = time.time() * 1000
    rounds = rounds_of(records)
    for round_ in rounds:
        assert [r["symbol"] for r in round_] == SYMBOLS
        assert len({r["timestamp"] for r in round_}) == 1
        for r in round_:
            assert list(r) == ["symbol", "price", "timestamp"]
            assert isinstance(r["price"], float) and r["price"] > 0
            assert r["price"] == pytest.approx(BASE_PRICES[str(r["symbol"])], rel=0.2)
            assert isinstance(r["timestamp"], int) and abs(r["timestamp"] - now_ms) < 5000
    stamps = [int(str(r[0]["timestamp"])) for r in rounds]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(30 <= gap <= 300 for gap in gaps), gaps
    assert 400 <= stamps[-1] - stamps[0] <= 800


async def test_high_rate_is_delivered_in_large_chunks() -> None:
    with trio.fail_after(10):
        async with simulator(rate=20_000) as [port]:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                lines = 0
                start = trio.current_time()
                with trio.move_on_after(0.5):
                    while True:
                        lines += (await stream.receive_some(1 << 20)).count(b"\n")
                elapsed = trio.current_time() - start
    assert lines / elapsed > 10_000


async def test_two_clients_are_served_with_independent_walks() -> None:
    with trio.fail_after(10):
        async with simulator() as [port]:
            first = await trio.open_tcp_stream("127.0.0.1", port)
            second = await trio.open_tcp_stream("127.0.0.1", port)
            async with first, second:
                a = await LineReader(first).records(10)
                b = await LineReader(second).records(10)
    assert [r["symbol"] for r in a] == [r["symbol"] for r in b] == SYMBOLS * 2
    assert [r["price"] for r in a] != [r["price"] for r in b]


async def test_client_disconnects_do_not_stop_the_server() -> None:
    with trio.fail_after(10):
        async with simulator(rate=20_000) as [port]:
            # Gone at once, gone mid-stream, gone while the server writes large chunks.
            quick = await trio.open_tcp_stream("127.0.0.1", port)
            await quick.aclose()
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await LineReader(stream).records(5)
                await stream.aclose()
            survivor = await trio.open_tcp_stream("127.0.0.1", port)
            async with survivor:
                records = await LineReader(survivor).records(5)
    assert [r["symbol"] for r in records] == SYMBOLS


async def test_several_ports_and_repeatable_seeds() -> None:
    with trio.fail_after(10):
        async with simulator([0, 0], seed=42) as ports:
            assert len(set(ports)) == 2
            firsts = []
            for port in ports:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    firsts.append([r["price"] for r in await LineReader(stream).records(10)])
        async with simulator([0, 0], seed=42) as ports_again:
            stream = await trio.open_tcp_stream("127.0.0.1", ports_again[1])
            async with stream:
                again = [r["price"] for r in await LineReader(stream).records(10)]
    assert firsts[0] != firsts[1]  # each port (and connection) has its own walk
    assert again == firsts[1]  # same seed, same port position, same connection number


async def test_a_port_in_use_raises_before_started() -> None:
    with trio.fail_after(10):
        async with simulator() as [port]:
            with pytest.raises(OSError):
                await serve_simulator([0, port])


# --- the CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--rate", "-1"], ["--rate", "x"], ["--ports", "1,2,x"], ["--ports", "70000"], ["--nope"]],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("marketflow simulate: error:")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--ports" in capsys.readouterr().out


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


@asynccontextmanager
async def child(cmd: list[str]) -> AsyncIterator[trio.Process]:
    """A child process with stdout piped; killed and reaped whatever happens."""
    env = child_environment({"PYTHONPATH": str(REPO)})
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=env
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()


SIMULATE = ["-c", "import sys; from marketflow.simulator import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_prints_bound_ports_and_exits_0_on_signal(signum: int) -> None:
    with trio.fail_after(20):
        async with child(_python(*SIMULATE, "--ports", "0,0", "--seed", "1")) as proc:
            assert proc.stdout is not None
            first = (await LineReader(proc.stdout).line()).decode()
            assert first.startswith("simulator listening host=127.0.0.1 ports=")
            ports = [int(p) for p in first.rsplit("=", 1)[1].split(",")]
            stream = await trio.open_tcp_stream("127.0.0.1", ports[1])
            async with stream:
                await LineReader(stream).records(5)
                proc.send_signal(signum)
                assert await proc.wait() == 0


async def test_cli_port_in_use_exits_1_with_one_clear_line() -> None:
    with trio.fail_after(20):
        async with simulator() as [port]:
            result = await trio.run_process(
                _python(*SIMULATE, "--ports", f"0,{port}"),
                cwd=REPO,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1
    assert result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("marketflow simulate: cannot listen on 127.0.0.1 ports 0,")
    assert "in use" in line


# --- the blaster -----------------------------------------------------------------------------


class Drain:
    """Counts the lines arriving on a stream until EOF; `arrived` is set at `target` lines."""

    def __init__(self, stream: trio.abc.ReceiveStream, check: Callable[[bytes], None]) -> None:
        self.stream = stream
        self.check = check
        self.received = 0
        self.tail = b""
        self.target: int | None = None
        self.arrived = trio.Event()

    def expect(self, target: int) -> None:
        self.target = target
        self._update()

    def _update(self) -> None:
        if self.target is not None and self.received >= self.target:
            self.arrived.set()

    async def run(self) -> None:
        while data := bytes(await self.stream.receive_some(1 << 20)):
            if self.received == 0:
                self.check(data[: data.find(b"\n") + 1])
            self.received += data.count(b"\n")
            self.tail = (self.tail + data)[-200:]
            self._update()


async def _blast(*args: str, check: Callable[[bytes], None]) -> tuple[int, Record]:
    """Run the blaster on a free port, read everything it sends; (lines received, summary).

    The blaster keeps the connection open after sending: once the reported count has arrived,
    SIGTERM makes it close, and reading on to EOF proves that nothing more was sent.
    """
    with trio.fail_after(60):
        cmd = _python("-m", "benchmarks.blaster", "--port", "0", "--seed", "3", *args)
        async with child(cmd) as proc:
            assert proc.stdout is not None
            out = LineReader(proc.stdout)
            port = json.loads(await out.line())["listening"]["port"]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            drain = Drain(stream, check)
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(drain.run)
                summary = json.loads(await out.line())
                drain.expect(summary["sent"])
                await drain.arrived.wait()
                proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert drain.tail.endswith(b"}\n")
    check(drain.tail[drain.tail.rfind(b"\n", 0, -1) + 1 :])
    return drain.received, summary


def _check_line(symbols: list[str]) -> Callable[[bytes], None]:
    def check(line: bytes) -> None:
        record = json.loads(line)
        assert list(record) == ["symbol", "price", "timestamp"]
        assert record["symbol"] in symbols and record["price"] > 0
        assert abs(record["timestamp"] - time.time() * 1000) < 10_000

    return check


async def test_blaster_at_a_fixed_rate_sends_exactly_what_it_reports() -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    received, summary = await _blast(
        "--rate", "30000", "--seconds", "0.5", "--symbols", ",".join(symbols),
        check=_check_line(symbols),
    )  # fmt: skip
    assert received == summary["sent"] == 15_000
    assert summary["per_symbol"] == dict.fromkeys(symbols, 5_000)


async def test_blaster_at_max_speed_sends_exactly_what_it_reports() -> None:
    received, summary = await _blast("--max", "--seconds", "0.3", check=_check_line(SYMBOLS))
    assert received == summary["sent"]
    assert received > 10_000
    assert summary["per_symbol"] == dict.fromkeys(SYMBOLS, received // 5)
