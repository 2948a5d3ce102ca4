"""Logging (contract: configuration): one line per event, logfmt or JSON, UTC timestamps, context,
no secrets.

A line carries `ts` (UTC, ms, `Z`), `level`, `logger`, `event` (the message), then the bound context
(`request_id`, `source`, `conn_id`, ... set with `bind`), then the event's own fields (passed as
`extra={"ctx": {...}}` or through `log_event`), then `error` when there is exception info.

Secrets: a field whose key names a secret (password, token, admin_token, authorization, ...) is
rendered as `***`; every rendered line also goes through `redact`, which masks `key=value` and
`"key": "value"` pairs with such keys, `Bearer ...` credentials, passwords in URLs and any value
registered with `register_secret` (`configure_logging(secrets=...)` registers the configured ones).

Tracebacks: exception info normally adds only `error="Type: message"`. The traceback follows
(indented lines in logfmt, a `traceback` field in JSON) for records at ERROR or above, i.e.
`logger.exception` for unexpected bugs, and for every record when the level is debug. Expected
failures (a refused connection, a retry) should be logged at WARNING or below with `exc_info`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Literal, TextIO

import orjson

MASK = "***"
CONTEXT_KEYS = ("request_id", "source", "conn_id")
_RESERVED = frozenset({"ts", "level", "logger", "event"})
_SECRET_KEY = re.compile(
    r"(?:^|[_-])(?:password|passwd|pwd|token|secret|authorization|api[_-]?key)$", re.IGNORECASE
)
_SECRET_WORD = r"(?:[A-Za-z0-9]+[_-])*(?:password|passwd|pwd|token|secret|api[_-]?key)"
_QUOTED = r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'"
_REDACTIONS: list[re.Pattern[str]] = [
    # Bearer credentials anywhere ("Authorization: Bearer abc").
    re.compile(r"(?i)\b(bearer\s+)()([A-Za-z0-9._~+/=-]+)"),
    # scheme://user:secret@host
    re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)()([^\s@/]+)(?=@)"),
    # authorization=..., "Authorization": "...": the whole value, whatever the scheme.
    re.compile(
        rf"(?i)(([\"']?)\bauthorization\2\s*[=:]\s*)({_QUOTED}|(?:(?:basic|bearer|digest|token|negotiate)\s+)?[^\s,;]+)"
    ),
    # password=x, "token": "x", 'secret': 'x', api_key: x
    re.compile(rf"(?i)(([\"']?)\b{_SECRET_WORD}\2\s*[=:]\s*)({_QUOTED}|[^\s,;&\"')}}\]]+)"),
]


def _mask_value(match: re.Match[str]) -> str:
    value = match.group(3)
    quote = value[0] if value[:1] in ("'", '"') and len(value) > 1 else ""
    return f"{match.group(1)}{quote}{MASK}{quote}"


_MIN_SECRET_LEN = 4  # masking every "a" in every line would hide more than it protects

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "marketflow_log_context", default=_EMPTY
)
_secrets: set[str] = set()


def is_secret_key(key: str) -> bool:
    """True for keys like password, token, admin_token, authorization, redis_password."""
    return bool(_SECRET_KEY.search(key))


def register_secret(value: str) -> None:
    """Mask this exact value wherever it appears in a log line (values under 4 chars are not)."""
    if len(value) >= _MIN_SECRET_LEN:
        _secrets.add(value)


def redact(text: str) -> str:
    """Mask credentials in free text (see the module docstring for what is recognised)."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _REDACTIONS:
        text = pattern.sub(_mask_value, text)
    return text


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add context fields (request_id, source, conn_id, ...) to every log line in this block.

    Context lives in a contextvar, so it follows the current Trio task and is inherited by tasks
    started from inside the block. A field set to None is removed for the block.
    """
    merged = {**_context.get(), **fields}
    token = _context.set({k: v for k, v in merged.items() if v is not None})
    try:
        yield
    finally:
        _context.reset(token)


def log_event(
    logger: logging.Logger,
    level: int | str,
    event: str,
    *,
    exc_info: BaseException | bool | None = None,
    **fields: Any,
) -> None:
    """Log `event` with key/value `fields`: `log_event(log, "warning", "feed.retry", delay=2)`."""
    levelno = _levelno(level) if isinstance(level, str) else level
    if logger.isEnabledFor(levelno):
        logger.log(levelno, event, exc_info=exc_info, extra={"ctx": fields}, stacklevel=2)


def _levelno(level: str) -> int:
    names = {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warn": logging.WARNING,
        "warning": logging.WARNING,
        "error": logging.ERROR,
        "critical": logging.CRITICAL,
    }
    try:
        return names[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


def _error_text(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_BARE = re.compile(r"[^\s=\"\\\x00-\x1f\x7f]+")


def logfmt_value(value: Any) -> str:
    """A value as logfmt writes it: bare when safe, else double-quoted with escapes."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if _BARE.fullmatch(text):
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.:/-]")


def _clean_key(key: str) -> str:
    return _KEY_CHARS.sub("_", key) or "_"


class LogFormatter(logging.Formatter):
    """Renders a record as one logfmt or JSON line (plus traceback lines, see module docstring)."""

    def __init__(self, fmt: Literal["logfmt", "json"] = "logfmt", *, debug: bool = False) -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"unknown log format {fmt!r}")
        self.fmt = fmt
        self.debug = debug

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        bound = _context.get()
        context = {k: bound[k] for k in CONTEXT_KEYS if k in bound} | dict(bound)
        extra = getattr(record, "ctx", None)
        for source in (context, extra if isinstance(extra, Mapping) else {}):
            for key, value in source.items():
                name = _clean_key(str(key))
                if name in _RESERVED:
                    name = f"field.{name}"
                out[name] = MASK if is_secret_key(name) else value
        if record.exc_info and record.exc_info[1] is not None:
            out.setdefault("error", _error_text(record.exc_info[1]))
        return out

    def _traceback(self, record: logging.LogRecord) -> str | None:
        if not record.exc_info or record.exc_info[1] is None:
            return None
        if record.levelno < logging.ERROR and not self.debug:
            return None
        return "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        trace = self._traceback(record)
        if self.fmt == "json":
            if trace is not None:
                fields["traceback"] = trace
            try:
                line = orjson.dumps(fields, default=str).decode()
            except TypeError:  # e.g. an int beyond 64 bits
                line = json.dumps(fields, default=str, ensure_ascii=False)
        else:
            line = " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())
            if trace is not None:
                line += "\n" + "\n".join("    " + t for t in trace.splitlines())
        return redact(line)


_HANDLER_NAME = "marketflow"


def configure_logging(
    level: str,
    fmt: Literal["logfmt", "json"] | str,
    *,
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> logging.Handler:
    """Install the one stderr handler on the root logger (replacing a previous one); return it."""
    levelno = _levelno(level)
    if fmt not in ("logfmt", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    for secret in secrets:
        if secret:
            register_secret(secret)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        LogFormatter("json" if fmt == "json" else "logfmt", debug=levelno <= logging.DEBUG)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler


class RateLimiter:
    """At most one event per `interval_s` per key; the refused ones are counted.

    `allow(key)` is True at most once per interval per key. When it is True, `suppressed(key)`
    tells how many events of that key were refused since the previous allowed one, for the line
    about to be logged. At most `max_keys` keys are tracked (the oldest are forgotten first).
    """

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> [next allowed time, refused since last allowed, refused before the last allowed]
        self._state: dict[Hashable, list[float]] = {}

    def allow(self, key: Hashable) -> bool:
        now = self._clock()
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self._max_keys:
                self._forget(now)
            self._state[key] = [now + self.interval_s, 0, 0]
            return True
        if now >= state[0]:
            state[0] = now + self.interval_s
            state[2] = state[1]
            state[1] = 0
            return True
        state[1] += 1
        return False

    def suppressed(self, key: Hashable) -> int:
        state = self._state.get(key)
        return int(state[2]) if state is not None else 0

    def _forget(self, now: float) -> None:
        for key in [k for k, s in self._state.items() if now >= s[0] and not s[1]]:
            del self._state[key]
        while len(self._state) >= self._max_keys:
            del self._state[next(iter(self._state))]


_shared_limiters: dict[float, RateLimiter] = {}


def rate_limited(key: Hashable, interval_s: float) -> bool:
    """Process-wide `RateLimiter.allow`: True at most once per `interval_s` for `key`."""
    limiter = _shared_limiters.get(interval_s)
    if limiter is None:
        limiter = _shared_limiters[interval_s] = RateLimiter(interval_s)
    return limiter.allow(key)


def set_context(**fields: Any) -> None:
    """Add fields to the log context of the current task until it ends (e.g. a request id)."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
