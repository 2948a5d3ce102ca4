"""Config precedence (flags > env > file > defaults) and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from marketflow.config import (
    DEFAULT_SYMBOLS,
    Config,
    ConfigError,
    build_config,
    config_path,
    load_config,
    parse_period,
)

README = Path(__file__).resolve().parents[2] / "README.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec() -> None:
    c = load_config(None, {})
    assert (c.http.host, c.http.port, c.http.admin_token) == ("127.0.0.1", 8080, "")
    assert c.app.mode == "test" and c.app.window_seconds == 300 and c.app.grace_ms == 2000
    assert [(e.name, e.port) for e in c.exchanges] == [
        ("exchange1", 40101),
        ("exchange2", 40102),
        ("exchange3", 40103),
    ]
    assert c.test.sources == ["test-exchange1", "test-exchange2", "test-exchange3"]
    assert c.app.symbols == ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]
    assert (c.app.max_clock_skew_s, c.app.max_future_skew_ms) == (120, 5000)
    assert c.app.pending_rows_max == 1_000_000


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[http]\nport = 9000\n[postgres]\nhost = 'file'\n[app]\nmode = 'live'\n")
    assert load_config(path, {}).http.port == 9000
    env = {"MARKETFLOW_HTTP_PORT": "9100", "DB_HOST": "envdb", "REDIS_HOST": "envredis"}
    c = load_config(path, env)
    assert (c.http.port, c.postgres.host, c.redis.host, c.app.mode) == (
        9100,
        "envdb",
        "envredis",
        "live",
    )
    c = load_config(path, env, flags={"http": {"port": 9200}, "app": {"mode": "test"}})
    assert (c.http.port, c.app.mode) == (9200, "test")
    c = load_config(path, {"MARKETFLOW_POSTGRES_HOST": "specific", "DB_HOST": "generic"})
    assert c.postgres.host == "specific"


def test_env_lists_and_exchanges(tmp_path: Path) -> None:
    c = load_config(None, {"MARKETFLOW_APP_SYMBOLS": "BTCUSDT, ETHUSDT"})
    assert c.app.symbols == ["BTCUSDT", "ETHUSDT"]
    path = write(tmp_path, "[[exchanges]]\nname='a'\nhost='h'\nport=1\n")
    assert [e.name for e in load_config(path, {}).exchanges] == ["a"]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[app]\nworkers_per_exchange = 'five'\n", "workers_per_exchange"),
        ("[app]\nnope = 1\n", "nope"),
        ("[nope]\nx = 1\n", "nope"),
        ("[app]\nwindow_seconds = true\n", "window_seconds"),
        ("[app]\nmode = 'paper'\n", "app.mode"),
        ("[app]\nsymbols = ['BTC/USD']\n", "app.symbols"),
        ("[app]\nflush_interval_ms = 0\n", "flush_interval_ms"),
        ("[app]\nmax_period = '10y'\n", "max_period"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[[exchanges]]\nname='bad name'\nhost='h'\nport=1\n", "bad name"),
        ("[[exchanges]]\nname='a'\nport=1\n", "host"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("not toml at all [", "config.toml"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(write(tmp_path, text), {})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MARKETFLOW_HTTP_PORT"):
        load_config(None, {"MARKETFLOW_HTTP_PORT": "eighty"})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})


def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_path(None, {}) is None
    write(tmp_path, "")
    assert config_path(None, {}) == Path("config.toml")
    assert config_path(None, {"MARKETFLOW_CONFIG": "x.toml"}) == Path("x.toml")
    assert config_path("y.toml", {"MARKETFLOW_CONFIG": "x.toml"}) == Path("y.toml")


def test_secrets_are_not_in_repr() -> None:
    c = load_config(
        None,
        {"MARKETFLOW_POSTGRES_PASSWORD": "s3cret-pw", "MARKETFLOW_HTTP_ADMIN_TOKEN": "tok-123456"},
    )
    assert "s3cret-pw" not in repr(c) and "tok-123456" not in repr(c)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("7d", 604800),
        ("abc", None),
        ("-1m", None),
        ("1.5m", None),
        ("10y", None),
        ("", None),
        ("1m1m", None),
        ("m", None),
        ("\uff13m", None),  # a fullwidth digit: int() would read it, the API must not
    ],
)
def test_parse_period(text: str, seconds: int | None) -> None:
    assert parse_period(text) == seconds


def test_every_config_key_is_documented() -> None:
    """Like datasette: a key that the README does not mention is a key users cannot find."""
    readme = README.read_text()
    attrs.resolve_types(Config)
    checked = 0
    for table in attrs.fields(Config):
        cls = table.type if isinstance(table.type, type) else None
        if cls is None or not attrs.has(cls):
            continue
        attrs.resolve_types(cls)
        for field in attrs.fields(cls):
            checked += 1
            assert f"`{field.name}`" in readme, f"[{table.name}].{field.name} is not in README"
    assert checked >= 35


def test_exchange_kind_defaults_to_tcp_and_connectors_get_their_venue_defaults(
    tmp_path: Path,
) -> None:
    text = (
        "[[exchanges]]\nname='feed'\nhost='h'\nport=1\n"
        "[[exchanges]]\nname='bn'\nkind='binance'\n"
        "[[exchanges]]\nname='kr'\nkind='kraken'\nurl='ws://127.0.0.1:9/'\n"
        "[[exchanges]]\nname='ok'\nkind='okx'\nsymbol_map={BTCUSDT='BTC-USDT'}\n"
    )
    feed, bn, kr, ok = load_config(write(tmp_path, text), {}).exchanges
    assert (feed.kind, feed.url, feed.symbol_map) == ("tcp", "", {})
    assert bn.kind == "binance" and bn.url == "" and bn.symbol_map["BTCUSDT"] == "BTCUSDT"
    assert set(bn.symbol_map) == set(DEFAULT_SYMBOLS)
    assert kr.url == "ws://127.0.0.1:9/" and kr.symbol_map["BTCUSDT"] == "XBT/USDT"
    assert kr.symbol_map["DOGEUSDT"] == "XDG/USDT"
    assert ok.symbol_map == {"BTCUSDT": "BTC-USDT"}  # a given map replaces the defaults


@pytest.mark.parametrize("kind", ["binance", "coinbase", "kraken", "okx", "bybit"])
def test_every_venue_maps_the_five_default_pairs(kind: str) -> None:
    (exchange,) = build_config({"exchanges": [{"name": "x", "kind": kind}]}).exchanges
    assert set(exchange.symbol_map) == set(DEFAULT_SYMBOLS)
    assert len(set(exchange.symbol_map.values())) == 5


@pytest.mark.parametrize(
    ("exchange", "named"),
    [
        ({"kind": "ftx"}, "exchanges.x.kind"),
        ({"kind": "Binance"}, "exchanges.x.kind"),
        ({"kind": "tcp", "port": 1}, "exchanges.x.host"),
        ({"kind": "tcp", "host": "h"}, "exchanges.x.port"),
        ({"host": "h", "port": 1, "url": "ws://h/"}, "exchanges.x.url"),
        ({"host": "h", "port": 1, "symbol_map": {"BTCUSDT": "X"}}, "exchanges.x.symbol_map"),
        ({"kind": "okx", "host": "h"}, "exchanges.x.host"),
        ({"kind": "okx", "port": 443}, "exchanges.x.port"),
        ({"kind": "okx", "url": "https://www.okx.com"}, "exchanges.x.url"),
        ({"kind": "okx", "url": "ws://"}, "exchanges.x.url"),
        ({"kind": "okx", "url": "wss://h/a b"}, "exchanges.x.url"),
        ({"kind": "okx", "symbol_map": {"XRPUSDT": "XRP-USDT"}}, "exchanges.x.symbol_map.XRPUSDT"),
        ({"kind": "okx", "symbol_map": {"BTCUSDT": "BTCUSDT"}}, "exchanges.x.symbol_map.BTCUSDT"),
        ({"kind": "kraken", "symbol_map": {"BTCUSDT": "XBT-USDT"}}, "symbol_map.BTCUSDT"),
        ({"kind": "binance", "symbol_map": {"BTCUSDT": "btc/usdt"}}, "symbol_map.BTCUSDT"),
        (
            {"kind": "bybit", "symbol_map": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "BTCUSDT"}},
            "exchanges.x.symbol_map",
        ),
        ({"kind": "okx", "symbol_map": {"BTCUSDT": 5}}, "symbol_map"),
        ({"kind": "okx", "symbol_map": "BTC-USDT"}, "symbol_map"),
        ({"kind": "okx", "nope": 1}, "nope"),
    ],
)
def test_exchange_errors_name_the_key(exchange: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        build_config({"exchanges": [{"name": "x", **exchange}]})


def test_a_connector_needs_one_of_the_app_symbols() -> None:
    app = {"symbols": ["XRPUSDT"]}
    with pytest.raises(ConfigError, match=r"exchanges\.x\.symbol_map"):
        build_config({"app": app, "exchanges": [{"name": "x", "kind": "okx"}]})
    config = build_config(
        {
            "app": app,
            "exchanges": [{"name": "x", "kind": "okx", "symbol_map": {"XRPUSDT": "XRP-USDT"}}],
        }
    )
    assert config.exchanges[0].symbol_map == {"XRPUSDT": "XRP-USDT"}
