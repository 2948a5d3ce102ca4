"""The exchange connectors against local replay servers speaking each venue's rules.

Real sockets on 127.0.0.1 (free ports), the real `read_source`, Trio's autojump clock wherever
time passes (stale limits, backoff, keep-alive), an absolute deadline on every test. The
expected ticks are read from the recordings independently (`recorded_trades`).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import ssl
import subprocess
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from marketflow.config import build_config
from marketflow.feeds.sources import read_source
from marketflow.feeds.websocket import MAX_FRAME_CHARS
from marketflow.models import SourceStats, SourceStatus, Tick
from tests.procs import free_port
from tests.venue_server import VENUES, VenueServer, recorded_trades, venue_server

MAX_SKEW_MS = 3_600_000  # the replays span up to two minutes of the past; exactness is the point
DEADLINE_S = 600  # virtual seconds under the autojump clock

SYMBOL_MAPS = {
    "binance": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "ETHUSDT", "DOTUSDT": "DOTUSDT"},
    "coinbase": {"BTCUSD": "BTC-USD", "ETHUSD": "ETH-USD"},
    "kraken": {"BTCUSD": "XBT/USD", "ALGOBTC": "ALGO/XBT", "DASHEUR": "DASH/EUR"},
    "okx": {"BTCUSDT": "BTC-USDT", "BTCUSD220527": "BTC-USD-220527", "UNIUSDSWAP": "UNI-USD-SWAP"},
    "bybit": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "ETHUSDT"},
}
# A pair each venue is asked for and refuses in the refusal test.
REFUSED = {
    "binance": ("DOGEUSDT", "DOGEUSDT"),
    "coinbase": ("DOGEUSD", "DOGE-USD"),
    "kraken": ("DOGEUSD", "XDG/USD"),
    "okx": ("DOGEUSDT", "DOGE-USDT"),
    "bybit": ("DOGEUSDT", "DOGEUSDT"),
}
# Roughly half of each replay, in frames sent: where a connection is cut or stalled.
HALF = {"binance": 700, "coinbase": 60, "kraken": 100, "okx": 50, "bybit": 35}
# A well-formed frame of the venue that is none of our business: not a tick, not a reject.
UNKNOWN = {
    "binance": '{"stream":"btcusdt@depth","data":{"e":"depthUpdate","E":1}}',
    "coinbase": '{"channel":"status","timestamp":"2026-08-09T21:05:48Z","events":[]}',
    "kraken": '{"event":"somethingNew","status":"ok"}',
    "okx": '{"event":"notice","code":"64008","msg":"service upgrade soon"}',
    "bybit": '{"topic":"tickers.BTCUSDT","ts":1,"type":"snapshot","data":{}}',
}


class Sink:
    """The pipeline's `send_batch`, recording each source's batches."""

    def __init__(self) -> None:
        self.batches: dict[str, list[list[Tick]]] = defaultdict(list)

    async def send_batch(self, source: str, ticks: list[Tick]) -> None:
        self.batches[source].append(list(ticks))

    def ticks(self, source: str) -> list[Tick]:
        return [tick for batch in self.batches[source] for tick in batch]


def expected_ticks(venue: str, delta_s: int, symbol_map: dict[str, str]) -> list[Tick]:
    ours = {pair: symbol for symbol, pair in symbol_map.items()}
    return [
        (ours[pair], float(price), ts + delta_s * 1000)
        for pair, price, ts, _ in recorded_trades(venue)
        if pair in ours
    ]


@asynccontextmanager
async def connector(
    server: VenueServer | tuple[str, str],
    sink: Sink,
    *,
    name: str = "venue",
    symbol_map: dict[str, str] | None = None,
    stale_after_s: float = 10.0,
) -> AsyncIterator[SourceStats]:
    """`read_source` for a connector configured like a user would, pointed at `server` (or
    at a (venue, url))."""
    venue, url = (server.venue, server.url) if isinstance(server, VenueServer) else server
    symbol_map = symbol_map or SYMBOL_MAPS[venue]
    config = build_config(
        {
            "app": {"symbols": sorted(symbol_map)},
            "exchanges": [{"name": name, "kind": venue, "url": url, "symbol_map": symbol_map}],
        }
    )
    stats = SourceStats(name)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                read_source,
                config.exchanges[0],
                sink.send_batch,
                stats,
                symbols=config.app.symbols,
                max_line_bytes=65536,
                max_skew_ms=MAX_SKEW_MS,
                max_future_ms=5000,
                stale_after_s=stale_after_s,
                reconnect_max_delay_s=30.0,
            )
        )
        yield stats
        nursery.cancel_scope.cancel()
    assert stats.status is SourceStatus.DISCONNECTED


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.05)


@asynccontextmanager
async def companion(sink: Sink) -> AsyncIterator[Callable[[], None]]:
    """A healthy source running beside the one under test; yields its final check."""
    async with venue_server("bybit") as server, connector(server, sink, name="beside") as stats:
        expected = expected_ticks("bybit", server.delta_s, SYMBOL_MAPS["bybit"])

        def check() -> None:
            assert sink.ticks("beside") == expected
            assert stats.reconnects == 0 and stats.status is SourceStatus.CONNECTED
            assert stats.rejected == 0

        yield check


@pytest.mark.parametrize("venue", VENUES)
async def test_replay_every_trade_becomes_exactly_one_tick(
    venue: str, autojump_clock: MockClock
) -> None:
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            venue_server(venue, frames_per_write=10) as server,
            connector(server, sink) as stats,
        ):
            expected = expected_ticks(venue, server.delta_s, SYMBOL_MAPS[venue])
            await until(lambda: len(sink.ticks("venue")) >= len(expected))
            await server.exhausted.wait()
            # Quiet for 100 s: the venue's keep-alive holds the connection (OKX's server drops
            # a client silent for 30 s; the stale limit is 10 s).
            await trio.sleep(100)
            assert sink.ticks("venue") == expected
            assert stats.messages == len(expected)
            assert stats.rejected == 0
            assert stats.reconnects == 0 and stats.status is SourceStatus.CONNECTED
            assert stats.last_message_at is not None
            assert server.connections == 1
            if venue in ("binance", "okx", "bybit"):
                assert server.pings >= 4  # the client keeps the connection alive
            # a batch per receive turn: frames read together are sent together (Binance
            # has one trade per frame)
            assert len(sink.batches["venue"]) < len(expected)


@pytest.mark.parametrize("venue", VENUES)
async def test_a_server_close_reconnects_after_backoff_and_counts_each_trade_once(
    venue: str, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.feed")
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            companion(sink) as beside_ok,
            venue_server(venue, close_after={0: HALF[venue]}) as server,
            connector(server, sink) as stats,
        ):
            expected = expected_ticks(venue, server.delta_s, SYMBOL_MAPS[venue])
            await server.exhausted.wait()
            await until(lambda: Counter(sink.ticks("venue")) == Counter(expected))
            await trio.sleep(5)  # nothing more may arrive: a replayed trade counted twice would
            assert Counter(sink.ticks("venue")) == Counter(expected)
            assert stats.reconnects == 1 and server.connections == 2
            assert stats.rejected == 0
            # backoff: 1 s +-20 % after the close (then the client's settle on subscribing)
            gap = server.connected_at[1] - server.ended_at[0]
            assert 0.8 <= gap <= 1.5, gap
            if venue in ("coinbase", "okx"):
                assert server.replayed_trades > 0  # the venue replayed; the ids dropped them
            beside_ok()
    events = [r.getMessage() for r in caplog.records if r.name == "marketflow.feed"]
    assert events.count("feed connected") >= 3  # ours twice, the companion once
    assert "feed disconnected" in events


@pytest.mark.parametrize("venue", VENUES)
async def test_a_stalled_server_is_left_after_stale_after_s(
    venue: str, autojump_clock: MockClock
) -> None:
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            companion(sink) as beside_ok,
            venue_server(venue, stall_after={0: HALF[venue]}) as server,
            connector(server, sink, stale_after_s=5.0) as stats,
        ):
            expected = expected_ticks(venue, server.delta_s, SYMBOL_MAPS[venue])
            await server.exhausted.wait()
            await until(lambda: Counter(sink.ticks("venue")) == Counter(expected))
            assert stats.reconnects == 1 and server.connections == 2
            # silent: no data, no pong, no heartbeat -> stale after 5 s, then close (at most 2 s
            # for a closing handshake nobody answers) and the 1 s backoff
            gap = server.connected_at[1] - server.ended_at[0]
            assert 5.0 <= gap <= 5.0 + 2.0 + 1.2 + 0.5, gap
            assert stats.rejected == 0
            beside_ok()


def broken_trade(venue: str, server: VenueServer) -> str:
    """A recorded trade frame of a subscribed pair with its price made unreadable."""
    for raw in server.frames:
        message = json.loads(raw)
        text = json.dumps(message)
        if venue == "binance":
            message["data"]["p"] = "oops"
        elif venue == "coinbase" and message["channel"] == "market_trades":
            message["events"][0]["trades"] = [{**message["events"][0]["trades"][0], "price": "?"}]
        elif venue == "kraken" and isinstance(message, list) and message[-2] == "trade":
            message[1] = [["oops", *message[1][0][1:]]]
        elif venue == "okx" and "data" in message and message["arg"]["channel"] == "trades":
            message["data"][0]["px"] = ""
        elif venue == "bybit" and message.get("topic", "").startswith("publicTrade."):
            message["data"] = [{**message["data"][0], "p": "1,5"}]
        if json.dumps(message) != text:
            return json.dumps(message)
    raise AssertionError(venue)


@pytest.mark.parametrize("venue", VENUES)
async def test_malformed_frames_are_counted_and_the_connection_kept(
    venue: str, autojump_clock: MockClock
) -> None:
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with venue_server(venue) as server:
            server.inject = {5: ["}{ not json", UNKNOWN[venue], broken_trade(venue, server)]}
            async with companion(sink) as beside_ok, connector(server, sink) as stats:
                expected = expected_ticks(venue, server.delta_s, SYMBOL_MAPS[venue])
                await server.exhausted.wait()
                await until(lambda: len(sink.ticks("venue")) >= len(expected))
                await trio.sleep(1)
                assert sink.ticks("venue") == expected
                assert stats.rejected_by_reason["malformed"] == 2
                assert stats.rejected == 2  # the unknown frame is not a reject
                assert stats.reconnects == 0
                beside_ok()


@pytest.mark.parametrize("venue", VENUES)
async def test_a_refused_pair_is_logged_and_the_others_flow(
    venue: str, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.feed")
    symbol, pair = REFUSED[venue]
    symbol_map = {**SYMBOL_MAPS[venue], symbol: pair}
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            companion(sink) as beside_ok,
            venue_server(venue, refuse=(pair,)) as server,
            connector(server, sink, symbol_map=symbol_map) as stats,
        ):
            expected = expected_ticks(venue, server.delta_s, SYMBOL_MAPS[venue])
            await server.exhausted.wait()
            await until(lambda: len(sink.ticks("venue")) >= len(expected))
            await trio.sleep(1)
            assert sink.ticks("venue") == expected
            assert stats.reconnects == 0 and stats.rejected == 0
            beside_ok()
    refused = [r for r in caplog.records if r.getMessage() == "feed subscription refused"]
    assert len(refused) == 1
    ctx: dict[str, Any] = refused[0].ctx  # type: ignore[attr-defined]
    assert ctx["detail"]
    if venue in ("kraken", "bybit"):  # these two say which pair they refuse
        assert (ctx["pair"], ctx["symbol"]) == (pair, symbol)


async def test_an_oversized_frame_counts_too_long_and_reconnects(
    autojump_clock: MockClock,
) -> None:
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        # paced, so the server notices the client's close soon after the big frame
        async with venue_server("binance", pace_s=0.01) as server:
            server.inject = {100: ["x" * (MAX_FRAME_CHARS + 1)]}
            async with connector(server, sink) as stats:
                expected = expected_ticks("binance", server.delta_s, SYMBOL_MAPS["binance"])
                await server.exhausted.wait()
                await until(lambda: expected[-1] in sink.ticks("venue"))
                assert stats.rejected_by_reason["too_long"] == 1
                assert stats.reconnects == 1 and server.connections == 2
                # What the server wrote after the big frame, before it read the 1009 close, is
                # lost with that connection (Binance replays nothing); nothing arrives twice.
                got = Counter(sink.ticks("venue"))
                assert not got - Counter(expected)
                assert got[expected[0]] == 1 and len(got) > len(expected) / 2


async def test_nothing_listening_is_retried_forever(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.feed")
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        url = f"ws://127.0.0.1:{free_port()}/"
        async with connector(("okx", url), sink, name="nowhere") as stats:
            await trio.sleep(300)  # dozens of attempts at the 30 s cap
            assert stats.status is SourceStatus.CONNECTING
            assert stats.reconnects == 0  # never connected: nothing to reconnect
    failed = [r for r in caplog.records if r.getMessage() == "feed connect failed"]
    assert failed and "ConnectionRefusedError" in failed[0].ctx["error"]  # type: ignore[attr-defined]


async def test_a_refused_handshake_is_retried_with_backoff(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A server answering the upgrade with HTTP 403: logged with the status, retried."""
    caplog.set_level(logging.INFO, logger="marketflow.feed")
    attempts: list[float] = []

    async def forbid(stream: trio.SocketStream) -> None:
        attempts.append(trio.current_time())
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")

    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, forbid, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            url = f"ws://127.0.0.1:{port}/"
            async with connector(("bybit", url), sink, name="forbidden") as stats:
                await until(lambda: len(attempts) >= 5)
                assert stats.status is SourceStatus.CONNECTING and stats.reconnects == 0
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for gap, nominal in zip(gaps, [1, 2, 4, 8], strict=True):
        assert 0.8 * nominal <= gap <= 1.2 * nominal + 0.1, gaps
    failed = [r for r in caplog.records if r.getMessage() == "feed connect failed"]
    assert failed and failed[0].ctx["error"] == "handshake refused: HTTP 403"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


async def test_wss_verifies_the_venue_certificate(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, autojump_clock: MockClock
) -> None:
    """wss:// goes through TLS with the default trust store (here told to trust the test CA
    through SSL_CERT_FILE, as OpenSSL reads it) and the host name checked."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            venue_server("bybit", tls=server_tls(certificate)) as server,
            connector(server, sink) as stats,
        ):
            assert server.url.startswith("wss://")
            expected = expected_ticks("bybit", server.delta_s, SYMBOL_MAPS["bybit"])
            await until(lambda: len(sink.ticks("venue")) >= len(expected))
            assert sink.ticks("venue") == expected
            assert stats.reconnects == 0


async def test_wss_refuses_an_untrusted_certificate(
    certificate: tuple[Path, Path], autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="marketflow.feed")
    sink = Sink()
    with trio.fail_after(DEADLINE_S):
        async with (
            venue_server("bybit", tls=server_tls(certificate)) as server,
            connector(server, sink, name="untrusted") as stats,
        ):
            await trio.sleep(20)
            assert stats.status is SourceStatus.CONNECTING and sink.ticks("untrusted") == []
            assert server.connections >= 3  # retried with backoff, never accepted
    failed = [r for r in caplog.records if r.getMessage() == "feed connect failed"]
    assert failed and "CERTIFICATE_VERIFY_FAILED" in failed[0].ctx["error"]  # type: ignore[attr-defined]


async def test_a_slow_pipeline_is_not_mistaken_for_a_silent_venue(
    autojump_clock: MockClock,
) -> None:
    """The pipeline holds the first batch for 30 s (backpressure); the stale limit is 5 s."""

    class SlowSink(Sink):
        async def send_batch(self, source: str, ticks: list[Tick]) -> None:
            if not self.batches[source]:
                await trio.sleep(30)
            await super().send_batch(source, ticks)

    sink = SlowSink()
    with trio.fail_after(DEADLINE_S):
        async with venue_server("okx") as server, connector(server, sink, stale_after_s=5) as stats:
            expected = expected_ticks("okx", server.delta_s, SYMBOL_MAPS["okx"])
            await until(lambda: len(sink.ticks("venue")) >= len(expected))
            assert sink.ticks("venue") == expected
            assert stats.reconnects == 0 and server.connections == 1
