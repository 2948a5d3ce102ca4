"""Hypothesis at the edges: arbitrary bytes into the feed parser, arbitrary text into the HTTP
query parsing and into the app itself. Nothing raises past the edge; no answer is a 500.

The feed parser is checked against a plain reference model of the feed protocol (split on newlines,
`json.loads` each line, classify in the documented order), fed whole and in arbitrary chunks:
its fast path (one msgspec call per chunk) and slow path must agree with the model, so the
result can never depend on how TCP cut the stream.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from marketflow.api.app import create_app
from marketflow.config import build_config, parse_period
from marketflow.feeds.framing import FeedParser
from marketflow.models import Tick
from marketflow.queries import Catalog, QueryError
from tests.unit.node_fakes import make_node
from tests.unit.test_api_app import call

NOW_MS = 1_795_646_511_826
SKEW_MS = 120_000  # behind the wall clock
FUTURE_MS = 5_000  # ahead of it
MAX_LINE = 160
SYMBOLS = ("BTCUSDT", "ETHUSDT", "DOGEUSDT")


# --- the feed parser ---------------------------------------------------------------------------


def classify(raw: bytes) -> tuple[str, Tick | None]:
    """The feed protocol for one complete, non-blank line of at most MAX_LINE bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return "malformed", None
    if not isinstance(obj, dict):
        return "malformed", None
    symbol, price, ts = obj.get("symbol"), obj.get("price"), obj.get("timestamp")
    if (
        not isinstance(symbol, str)
        or not isinstance(price, int | float)
        or isinstance(price, bool)
        or not isinstance(ts, int)
        or isinstance(ts, bool)
    ):
        return "malformed", None
    if symbol not in SYMBOLS and (not symbol.isascii() or symbol.upper() not in SYMBOLS):
        return "unknown_symbol", None
    try:
        value = float(price)
    except OverflowError:
        return "bad_price", None
    if not 0.0 < value < math.inf:
        return "bad_price", None
    if not NOW_MS - SKEW_MS <= ts <= NOW_MS + FUTURE_MS:
        return "bad_timestamp", None
    return "ok", (symbol.upper(), value, ts)


def reference(data: bytes) -> tuple[list[Tick], Counter[str]]:
    *complete, tail = data.split(b"\n")
    ticks: list[Tick] = []
    rejects: Counter[str] = Counter()
    for raw in complete:
        if len(raw) > MAX_LINE:
            rejects["too_long"] += 1
        elif raw.strip():
            verdict, tick = classify(raw)
            if tick is None:
                rejects[verdict] += 1
            else:
                ticks.append(tick)
    if len(tail) > MAX_LINE:  # an unfinished line already too long is counted at once
        rejects["too_long"] += 1
    return ticks, rejects


def parser() -> FeedParser:
    return FeedParser(
        SYMBOLS,
        max_line_bytes=MAX_LINE,
        max_skew_ms=SKEW_MS,
        max_future_ms=FUTURE_MS,
        clock=lambda: NOW_MS / 1000,
    )


def counts(p: FeedParser) -> Counter[str]:
    return Counter({reason.value: n for reason, n in p.rejected.items() if n})


def line(symbol: Any, price: Any, ts: Any) -> bytes:
    return b'{"symbol":%s,"price":%s,"timestamp":%s}' % (
        json.dumps(symbol).encode(),
        price if isinstance(price, bytes) else json.dumps(price).encode(),
        json.dumps(ts).encode(),
    )


prices = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1" + b"0" * 400, b"true"]),
)
stamps = st.one_of(
    st.integers(min_value=NOW_MS - 2 * SKEW_MS, max_value=NOW_MS + 2 * SKEW_MS),
    st.sampled_from(
        [
            NOW_MS - SKEW_MS,
            NOW_MS + FUTURE_MS,
            NOW_MS + FUTURE_MS + 1,
            0,
            -1,
            2**63,
            2**64,
            1.5,
            "1",
        ]
    ),
)
symbols = st.one_of(
    st.sampled_from([*SYMBOLS, "btcusdt", "EthUsdt", "btcu\u017fdt", "XRPUSDT", "", "BTCUSDT "]),
    st.text(max_size=8),
)
good_lines = st.builds(line, st.sampled_from(SYMBOLS), st.floats(0.001, 1e6), st.just(NOW_MS))
any_lines = st.builds(line, symbols, prices, stamps)
odd_pieces = st.sampled_from(
    [
        b"\n",
        b"\r\n",
        b"  \n",
        b"\x0c\n",
        b"{",
        b"}",
        b"[]\n",
        b"null\n",
        b'"BTCUSDT"\n',
        b"\xff\xfe\n",
        b"\xef\xbb\xbf",
        b"x" * (MAX_LINE + 1),
        b"y" * (MAX_LINE // 2),
        b'{"symbol":"BTCUSDT","symbol":"XRPUSDT","price":1,"timestamp":%d}' % NOW_MS,
        b'{"symbol":"BTCUSDT","price":1,"timestamp":%d,"extra":[1,{"a":null}]}' % NOW_MS,
        b'{"symbol":"BTCUSDT","price":1,\n"timestamp":%d}' % NOW_MS,
        b"[" * 50 + b"]" * 50,
    ]
)
pieces = st.lists(
    st.one_of(
        good_lines.map(lambda b: b + b"\n"),
        any_lines.map(lambda b: b + b"\n"),
        any_lines,  # two objects on one line, when the next piece is another object
        odd_pieces,
        st.binary(max_size=40),
    ),
    max_size=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=pieces, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
@example(pieces=[line("BTCUSDT", 1.0, NOW_MS) * 2 + b"\n"], cuts=[])
@example(pieces=[line("BTCUSDT", b"1" + b"0" * 400, NOW_MS) + b"\n"], cuts=[])
@example(pieces=['{"symbol":"BTCUSDT","price":1,"timestamp":1}\n'.encode("utf-16-le")], cuts=[])
def test_feed_parser_agrees_with_the_spec_model_whatever_the_chunking(
    pieces: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(pieces)
    want_ticks, want_rejects = reference(data)
    whole = parser()
    assert whole.feed(data) == want_ticks
    assert counts(whole) == want_rejects
    assert whole.accepted == len(want_ticks)
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunked = parser()
    got: list[Tick] = []
    for a, b in itertools.pairwise(bounds):
        got += chunked.feed(data[a:b])
    assert got == want_ticks
    assert counts(chunked) == want_rejects


# --- names and periods -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
@example("1h30m")
@example("\uff11s")
@example("1m1m")
@example("9" * 70 + "d")
def test_parse_period_returns_seconds_or_none_and_never_raises(text: str) -> None:
    seconds = parse_period(text)
    assert seconds is None or (isinstance(seconds, int) and seconds >= 0)


CONFIG = build_config({})
CATALOG = Catalog(CONFIG)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=3))
def test_api_validators_refuse_with_400_or_404_only(name: str, periods: list[str]) -> None:
    for check in (CATALOG.symbol, CATALOG.source):
        try:
            value = check(name)
        except QueryError as exc:
            assert exc.status in (400, 404)
            assert len(exc.message) < 200
        else:
            assert value in CATALOG.symbols | CATALOG.sources
    try:
        period = CATALOG.period(periods)
    except QueryError as exc:
        assert exc.status == 400
    else:
        assert period.seconds is None or 0 < period.seconds <= CATALOG.max_period_s


# --- the production ASGI app (the route table, Quart-Trio behind it) --------------------------

TOKEN = "fuzz-admin-token"
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ROOTS = ["/prices/latest", "/prices/highest", "/prices/lowest", "/prices/average", "/mode"]
ROOTS += ["/health", "/metrics", "/openapi.json", "/ws/prices", "/assets", "", "/x"]
APP_CONFIG = build_config({"http": {"admin_token": TOKEN}})


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    method=st.sampled_from(METHODS),
    root=st.sampled_from(ROOTS),
    segments=st.lists(st.text(max_size=30), max_size=3),
    query=st.lists(
        st.tuples(st.sampled_from(["period", "symbols", "exchanges", "x"]), st.text(max_size=20)),
        max_size=3,
    ),
    headers=st.dictionaries(
        st.sampled_from(["X-Request-ID", "Authorization", "Content-Type", "Accept"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
        max_size=2,
    ),
)
async def test_no_request_makes_a_500(
    method: str,
    root: str,
    segments: list[str],
    query: list[tuple[str, str]],
    headers: dict[str, str],
) -> None:
    app = create_app(APP_CONFIG, node=make_node(APP_CONFIG))  # the production ASGI app
    path = (root + "".join("/" + quote(s, safe="") for s in segments)) or "/"
    if query:
        path += "?" + urlencode(query)
    status, body, response_headers = await call(app, method, path, headers=headers)
    # 503 is an answer (the fakes' stores count as down in /health); 500 never is.
    assert status < 500 or status == 503, (method, path, status, body)
    if status >= 400 and method != "HEAD":
        assert response_headers["content-type"] == "application/json", (path, body)
        health = root == "/health" and status == 503  # a body of its own
        assert health or "error" in body
    if method == "POST" and root == "/mode":
        assert status in (401, 404, 405) or headers.get("Authorization") == f"Bearer {TOKEN}"
