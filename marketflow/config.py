"""Configuration: defaults < config.toml < environment < CLI flags (contract: configuration).

Every value is validated here, at the edge, so the rest of the code can trust it. Errors are
`ConfigError` with one line that names the offending key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs

from marketflow.feeds.venues import VENUES

SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9]{2,20}$")
NODE_RE = re.compile(r"^(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})$")
PERIOD_RE = re.compile(r"^(?:[0-9]+[smhd])+$")
DEFAULT_SYMBOLS = ["BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type or range."""


@attrs.frozen
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str = attrs.field(default="", repr=False)


@attrs.frozen
class PostgresConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = attrs.field(default="", repr=False)
    dbname: str = "marketflow"
    sslmode: str = "disable"


@attrs.frozen
class RedisConfig:
    host: str = "127.0.0.1"
    port: int = 6379
    password: str = attrs.field(default="", repr=False)
    db: int = 0
    key_prefix: str = ""
    timeout_ms: int = 500
    # Redis Cluster: `nodes` ("host:port", any subset of the masters) instead of host/port/db.
    cluster: bool = False
    nodes: list[str] = attrs.Factory(list)

    def node_addresses(self) -> list[tuple[str, int]]:
        """`nodes` as (host, port) pairs (validated by `validate`)."""
        out = []
        for node in self.nodes:
            host, _, port = node.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out


EXCHANGE_KINDS = ("tcp", *VENUES)
URL_RE = re.compile(r"^wss?://[A-Za-z0-9.\-\[\]:]+(?::[0-9]{1,5})?(?:/[!-~]*)?$")


@attrs.frozen
class ExchangeConfig:
    """One live source: a TCP feed (`host`, `port`) or a venue connector (`kind`, `url`,
    `symbol_map`: our symbol -> the venue's pair; after loading, the venue's defaults when the
    file gives none)."""

    name: str
    host: str = ""
    port: int = 0
    kind: str = "tcp"
    url: str = ""
    symbol_map: dict[str, str] = attrs.Factory(dict)


def _default_exchanges() -> list[ExchangeConfig]:
    return [ExchangeConfig(f"exchange{i}", "127.0.0.1", 40100 + i) for i in (1, 2, 3)]


@attrs.frozen
class TestConfig:
    __test__ = False  # not a pytest class
    sources: list[str] = attrs.Factory(
        lambda: ["test-exchange1", "test-exchange2", "test-exchange3"]
    )
    rate: float = 50.0


@attrs.frozen
class AppConfig:
    mode: str = "test"
    role: str = "all"
    symbols: list[str] = attrs.Factory(lambda: list(DEFAULT_SYMBOLS))
    workers_per_exchange: int = 5
    db_batch_size: int = 200
    redis_ttl_seconds: int = 70
    window_seconds: int = 300
    flush_interval_ms: int = 100
    grace_ms: int = 2000
    max_clock_skew_s: int = 120
    max_future_skew_ms: int = 5000
    lease_ttl_ms: int = 10_000
    max_line_bytes: int = 65536
    stale_after_s: float = 10.0
    reconnect_max_delay_s: float = 30.0
    pending_rows_max: int = 1_000_000
    max_period: str = "3650d"
    data_dir: str = "data"
    shutdown_timeout_s: float = 10.0
    ws_min_interval_ms: int = 100
    ws_max_lag_s: float = 5.0


@attrs.frozen
class LogConfig:
    level: str = "info"
    format: str = "logfmt"


@attrs.frozen
class Config:
    http: HttpConfig = attrs.Factory(HttpConfig)
    postgres: PostgresConfig = attrs.Factory(PostgresConfig)
    redis: RedisConfig = attrs.Factory(RedisConfig)
    exchanges: list[ExchangeConfig] = attrs.Factory(_default_exchanges)
    test: TestConfig = attrs.Factory(TestConfig)
    app: AppConfig = attrs.Factory(AppConfig)
    log: LogConfig = attrs.Factory(LogConfig)

    @property
    def live_sources(self) -> list[str]:
        return [e.name for e in self.exchanges]

    @property
    def test_sources(self) -> list[str]:
        return list(self.test.sources)

    def exchange(self, name: str) -> ExchangeConfig | None:
        """The live exchange called `name` (None for a test source)."""
        for exchange in self.exchanges:
            if exchange.name == name:
                return exchange
        return None

    def sources_for(self, mode: str) -> list[str]:
        return self.live_sources if mode == "live" else self.test_sources

    @property
    def all_sources(self) -> list[str]:
        return self.live_sources + self.test_sources

    @property
    def secrets(self) -> list[str]:
        """The configured credentials, for the log redaction (`configure_logging(secrets=...)`)."""
        values = (self.http.admin_token, self.postgres.password, self.redis.password)
        return [value for value in values if value]

    @property
    def max_period_s(self) -> int:
        seconds = parse_period(self.app.max_period)
        assert seconds is not None
        return seconds


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PERIOD_PART = re.compile(r"([0-9]+)([smhd])")


def parse_period(text: str) -> int | None:
    """`1h30m` -> 5400. None when the text is not a well-formed period (bounds are the caller's)."""
    if len(text) > 64 or not PERIOD_RE.fullmatch(text):
        return None
    units = [u for _, u in _PERIOD_PART.findall(text)]
    if len(units) != len(set(units)):
        return None  # `1m1m` is a repeated unit, not a period
    return sum(int(n) * _UNITS[u] for n, u in _PERIOD_PART.findall(text))


_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(float, _strict_float)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook(bool, _strict_bool)


# Environment values arrive as strings; each key's type says how to read one.
def _env_value(raw: str, field_type: Any) -> Any:
    if field_type in ("int", int):
        return int(raw)
    if field_type in ("float", float):
        return float(raw)
    if field_type in ("bool", bool):
        if raw.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.strip().lower() in ("true", "1")
    if field_type in ("list[str]", list[str]):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


_TABLES: dict[str, type[Any]] = {
    "http": HttpConfig,
    "postgres": PostgresConfig,
    "redis": RedisConfig,
    "test": TestConfig,
    "app": AppConfig,
    "log": LogConfig,
}


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`MARKETFLOW_<TABLE>_<KEY>` plus the conventional `DB_HOST` and `REDIS_HOST`."""
    out: dict[str, dict[str, Any]] = {}
    aliases = {"DB_HOST": ("postgres", "host"), "REDIS_HOST": ("redis", "host")}
    for name, (table, key) in aliases.items():
        if name in environ:
            out.setdefault(table, {})[key] = environ[name]
    for table, cls in _TABLES.items():
        for field in attrs.fields(cls):
            var = f"MARKETFLOW_{table.upper()}_{field.name.upper()}"
            if var in environ:
                try:
                    value = _env_value(environ[var], field.type)
                except ValueError:
                    raise ConfigError(
                        f"{var}: cannot read {environ[var]!r} as {field.type}"
                    ) from None
                out.setdefault(table, {})[field.name] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _first_error(exc: Exception) -> str:
    messages = cattrs.transform_error(exc, path="config")
    return messages[0] if messages else str(exc)


def build_config(data: Mapping[str, Any]) -> Config:
    """Structure and validate a merged mapping; raise ConfigError naming the first bad key."""
    for table in data:
        if table not in (*_TABLES, "exchanges"):
            raise ConfigError(f"unknown config table [{table}]")
    try:
        config = _converter.structure(dict(data), Config)
    except cattrs.ClassValidationError as exc:
        raise ConfigError(_first_error(exc)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: {exc}") from None
    validate(config)
    return attrs.evolve(
        config, exchanges=[resolve_exchange(e, config.app.symbols) for e in config.exchanges]
    )


def resolve_exchange(exchange: ExchangeConfig, symbols: list[str]) -> ExchangeConfig:
    """Check one `[[exchanges]]` entry for its kind; give a connector its venue's defaults."""
    key = f"exchanges.{exchange.name}"
    if exchange.kind not in EXCHANGE_KINDS:
        raise ConfigError(f"{key}.kind: {exchange.kind!r} is not one of {'|'.join(EXCHANGE_KINDS)}")
    if exchange.kind == "tcp":
        if not exchange.host:
            raise ConfigError(f"{key}.host: required for kind 'tcp'")
        if not 1 <= exchange.port <= 65535:
            raise ConfigError(f"{key}.port: required for kind 'tcp' (1-65535), got {exchange.port}")
        for field in ("url", "symbol_map"):
            if getattr(exchange, field):
                raise ConfigError(f"{key}.{field}: only for a connector kind (set kind)")
        return exchange
    venue = VENUES[exchange.kind]
    for field in ("host", "port"):
        if getattr(exchange, field):
            raise ConfigError(f"{key}.{field}: not used by kind {exchange.kind!r} (url is)")
    if exchange.url and (len(exchange.url) > 2048 or not URL_RE.fullmatch(exchange.url)):
        raise ConfigError(f"{key}.url: {exchange.url[:80]!r} is not a ws:// or wss:// URL")
    for symbol, pair in exchange.symbol_map.items():
        if symbol not in symbols:
            raise ConfigError(f"{key}.symbol_map.{symbol}: not one of app.symbols")
        if not venue.pair_pattern.fullmatch(pair):
            raise ConfigError(
                f"{key}.symbol_map.{symbol}: {pair!r} is not a {exchange.kind} pair"
                f" like {venue.pair_example!r}"
            )
    if len(set(exchange.symbol_map.values())) != len(exchange.symbol_map):
        raise ConfigError(f"{key}.symbol_map: two symbols map to the same pair")
    symbol_map = exchange.symbol_map or dict(venue.default_symbols)
    if not any(symbol in symbol_map for symbol in symbols):
        raise ConfigError(
            f"{key}.symbol_map: none of app.symbols has a {exchange.kind} pair; map at least one"
        )
    return attrs.evolve(exchange, symbol_map=symbol_map)


def validate(config: Config) -> None:
    app = config.app
    if app.mode not in ("live", "test"):
        raise ConfigError(f"app.mode: must be 'live' or 'test', got {app.mode!r}")
    if app.role not in ("all", "ingest", "api"):
        raise ConfigError(f"app.role: must be 'all', 'ingest' or 'api', got {app.role!r}")
    if not app.symbols:
        raise ConfigError("app.symbols: at least one symbol is needed")
    for symbol in app.symbols:
        if not SYMBOL_RE.fullmatch(symbol) or symbol != symbol.upper():
            raise ConfigError(f"app.symbols: {symbol!r} must match [A-Z0-9]{{2,20}}")
    names = config.all_sources
    for name in names:
        if not SOURCE_NAME_RE.fullmatch(name):
            raise ConfigError(f"source name {name!r} must match [A-Za-z0-9_-]{{1,32}}")
    if len(set(names)) != len(names):
        raise ConfigError("exchanges and test.sources: source names must be unique")
    if not config.exchanges:
        raise ConfigError("exchanges: at least one exchange is needed")
    if not config.test.sources:
        raise ConfigError("test.sources: at least one source is needed")
    positive = {
        "app.workers_per_exchange": app.workers_per_exchange,
        "app.db_batch_size": app.db_batch_size,
        "app.redis_ttl_seconds": app.redis_ttl_seconds,
        "app.window_seconds": app.window_seconds,
        "app.flush_interval_ms": app.flush_interval_ms,
        "app.max_clock_skew_s": app.max_clock_skew_s,
        "app.max_future_skew_ms": app.max_future_skew_ms,
        "app.lease_ttl_ms": app.lease_ttl_ms,
        "app.max_line_bytes": app.max_line_bytes,
        "app.stale_after_s": app.stale_after_s,
        "app.reconnect_max_delay_s": app.reconnect_max_delay_s,
        "app.pending_rows_max": app.pending_rows_max,
        "app.shutdown_timeout_s": app.shutdown_timeout_s,
        "app.ws_min_interval_ms": app.ws_min_interval_ms,
        "app.ws_max_lag_s": app.ws_max_lag_s,
        "redis.timeout_ms": config.redis.timeout_ms,
        "test.rate": config.test.rate,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if app.grace_ms < 0:
        raise ConfigError(f"app.grace_ms: must be >= 0, got {app.grace_ms}")
    if app.window_seconds < 60:
        raise ConfigError("app.window_seconds: must be >= 60 (a whole minute of buckets)")
    if not parse_period(app.max_period):
        raise ConfigError(f"app.max_period: {app.max_period!r} is not a period like 3650d")
    ports = {"http.port": config.http.port, "postgres.port": config.postgres.port}
    ports |= {"redis.port": config.redis.port}
    validate_cluster(config.redis)
    ports |= {f"exchanges.{e.name}.port": e.port for e in config.exchanges if e.kind == "tcp"}
    for key, port in ports.items():
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: {port} is not a TCP port")
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: {config.log.level!r} is not debug|info|warning|error")
    if config.log.format not in ("logfmt", "json"):
        raise ConfigError(f"log.format: {config.log.format!r} is not logfmt|json")


def validate_cluster(redis: RedisConfig) -> None:
    """`[redis] nodes` is required (and only meaningful) with `cluster = true`."""
    if not redis.cluster:
        if redis.nodes:
            raise ConfigError("redis.nodes: only used with redis.cluster = true")
        return
    if not redis.nodes:
        raise ConfigError(
            'redis.nodes: required with redis.cluster = true, e.g. ["127.0.0.1:7001"]'
        )
    for node in redis.nodes:
        match = NODE_RE.fullmatch(node)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            raise ConfigError(f"redis.nodes: {node[:80]!r} is not host:port (port 1-65535)")
    if len(set(redis.nodes)) != len(redis.nodes):
        raise ConfigError("redis.nodes: a node is listed twice")
    if redis.db != 0:
        raise ConfigError("redis.db: a Redis Cluster has only database 0")


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    if cli_path:
        return Path(cli_path)
    if environ.get("MARKETFLOW_CONFIG"):
        return Path(environ["MARKETFLOW_CONFIG"])
    default = Path("config.toml")
    return default if default.is_file() else None


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Load `path` (if any), then apply the environment and the CLI flags on top."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    data = _merge(data, env_overrides(environ))
    if flags:
        data = _merge(data, flags)
    return build_config(data)
