"""Log lines: logfmt and JSON rendering, quoting, secrets, context, tracebacks, rate limiting."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from marketflow.logs import (
    LogFormatter,
    RateLimiter,
    bind,
    configure_logging,
    is_secret_key,
    log_event,
    logfmt_value,
    rate_limited,
    redact,
    register_secret,
    set_context,
)

TS_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class Capture:
    """A private logger writing through LogFormatter into a string buffer."""

    def __init__(self, fmt: str = "logfmt", *, debug: bool = False) -> None:
        self.buffer = io.StringIO()
        handler = logging.StreamHandler(self.buffer)
        handler.setFormatter(LogFormatter("json" if fmt == "json" else "logfmt", debug=debug))
        self.logger = logging.Logger(f"marketflow.test.{fmt}")
        self.logger.addHandler(handler)
        self.logger.setLevel(logging.DEBUG)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def logfmt() -> Capture:
    return Capture("logfmt")


@pytest.fixture
def jsonlog() -> Capture:
    return Capture("json")


# --- rendering -------------------------------------------------------------------------------


def test_logfmt_line_has_ts_level_logger_event_then_fields(logfmt: Capture) -> None:
    log_event(logfmt.logger, "info", "feed.connected", source="exchange1", attempt=3, lag=0.25)
    (line,) = logfmt.lines()
    assert re.fullmatch(
        rf"ts={TS_RE} level=info logger=marketflow\.test\.logfmt event=feed\.connected"
        r" source=exchange1 attempt=3 lag=0\.25",
        line,
    )


def test_timestamp_is_utc_with_milliseconds() -> None:
    record = logging.makeLogRecord({"msg": "x", "levelno": 20, "levelname": "INFO"})
    record.created = 1795648325.363
    record.msecs = 363.0
    fields = LogFormatter().fields(record)
    expected = datetime.fromtimestamp(1795648325.363, UTC).strftime("%Y-%m-%dT%H:%M:%S.363Z")
    assert fields["ts"] == expected


def test_json_line_is_one_object_with_the_same_fields(jsonlog: Capture) -> None:
    log_event(jsonlog.logger, logging.WARNING, "feed.bad_line", source="ex1", count=2, ok=True)
    (record,) = jsonlog.records()
    assert list(record)[:4] == ["ts", "level", "logger", "event"]
    assert re.fullmatch(TS_RE, str(record["ts"]))
    assert record | {"ts": None} == {
        "ts": None,
        "level": "warning",
        "logger": "marketflow.test.json",
        "event": "feed.bad_line",
        "source": "ex1",
        "count": 2,
        "ok": True,
    }


def test_extra_ctx_and_percent_args(logfmt: Capture) -> None:
    logfmt.logger.info("started %s workers", 5, extra={"ctx": {"mode": "test"}})
    assert logfmt.text.rstrip().endswith('event="started 5 workers" mode=test')


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("", '""'),
        ("line\nbreak\ttab", r'"line\nbreak\ttab"'),
        ("back\\slash", r'"back\\slash"'),
        ("ünïcode", "ünïcode"),
        (None, ""),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (0.1, "0.1"),
        (["a", 1], "\"['a', 1]\""),
    ],
)
def test_logfmt_quoting(value: object, rendered: str) -> None:
    assert logfmt_value(value) == rendered


def test_one_line_per_event_even_with_newlines(logfmt: Capture) -> None:
    log_event(logfmt.logger, "info", "multi\nline", excerpt='{"symbol":\n"BTC"}')
    assert len(logfmt.lines()) == 1


def test_odd_keys_are_cleaned_and_header_keys_cannot_be_overwritten(logfmt: Capture) -> None:
    logfmt.logger.info("e", extra={"ctx": {"bad key=": 1, "level": "fake", "event": "x"}})
    (line,) = logfmt.lines()
    assert " bad_key_=1" in line
    assert "level=info" in line and "field.level=fake" in line and "field.event=x" in line


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["password", "token", "admin_token", "authorization", "Authorization", "redis_password"]
)
def test_secret_keys_are_masked_in_both_formats(
    logfmt: Capture, jsonlog: Capture, key: str
) -> None:
    fields: dict[str, Any] = {key: "hunter2-s3cret", "user": "u"}
    for capture in (logfmt, jsonlog):
        log_event(capture.logger, "info", "config.loaded", **fields)
    assert "hunter2" not in logfmt.text + jsonlog.text
    assert f"{key}=*** user=u" in logfmt.text
    assert jsonlog.records()[0][key] == "***"


def test_secret_key_detection_is_not_too_eager() -> None:
    assert all(map(is_secret_key, ["password", "TOKEN", "api_key", "pg-password", "secret"]))
    assert not any(map(is_secret_key, ["tokens_total", "max_tokens", "source", "passed"]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2 x=1", "password=*** x=1"),
        ('token="a b c" x=1', 'token="***" x=1'),
        ("Authorization: Bearer abc.def-123", "Authorization: ***"),
        ("authorization=Basic dXNlcjpwYXNz next=1", "authorization=*** next=1"),
        ("got Bearer abc.def", "got Bearer ***"),
        ('{"password": "p", "user": "u"}', '{"password": "***", "user": "u"}'),
        ("{'admin_token': 't0k'}", "{'admin_token': '***'}"),
        ("postgresql://postgres:pw@db:5432/mf", "postgresql://postgres:***@db:5432/mf"),
        ("GET /x?token=abc&y=1", "GET /x?token=***&y=1"),
        (
            "basic auth failed; the token was refreshed",
            "basic auth failed; the token was refreshed",
        ),
        ("tokens_total=5", "tokens_total=5"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_registered_secrets_are_masked_anywhere(logfmt: Capture, jsonlog: Capture) -> None:
    register_secret("Sup3rS3cretValue")
    register_secret("abc")  # too short to mask safely; ignored
    try:
        raise ConnectionError("FATAL: auth failed for Sup3rS3cretValue")
    except ConnectionError:
        for capture in (logfmt, jsonlog):
            capture.logger.exception("db.failed dsn=%s", "host=db pw Sup3rS3cretValue")
    assert "Sup3rS3cretValue" not in logfmt.text + jsonlog.text
    assert redact("x abc y") == "x abc y"
    assert jsonlog.records()[0]["error"] == "ConnectionError: FATAL: auth failed for ***"


def test_configure_logging_registers_configured_secrets(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "logfmt", stream=stream, secrets=["redis-pa55word", ""])
    logging.getLogger("marketflow.x").warning("redis said redis-pa55word is wrong")
    assert "redis-pa55word" not in stream.getvalue() and "***" in stream.getvalue()


# --- context ---------------------------------------------------------------------------------


def test_bind_adds_context_and_is_undone_after_the_block(logfmt: Capture) -> None:
    with bind(source="exchange1", conn_id="c-7"):
        with bind(request_id="r1", conn_id=None):
            logfmt.logger.info("inner")
        logfmt.logger.info("outer")
    logfmt.logger.info("after")
    inner, outer, after = logfmt.lines()
    assert inner.endswith("event=inner request_id=r1 source=exchange1")  # canonical order
    assert outer.endswith("event=outer source=exchange1 conn_id=c-7")
    assert after.endswith("event=after")


async def test_context_follows_trio_tasks(jsonlog: Capture) -> None:
    async def child(name: str) -> None:
        with bind(conn_id=name):
            await trio.lowlevel.checkpoint()
            jsonlog.logger.info("child")

    with bind(source="exchange2"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child, "a")
            nursery.start_soon(child, "b")
    jsonlog.logger.info("parent")
    records = jsonlog.records()
    children = sorted((r["source"], r["conn_id"]) for r in records if r["event"] == "child")
    assert children == [("exchange2", "a"), ("exchange2", "b")]
    assert "source" not in records[-1]


async def test_set_context_lasts_for_the_calling_task_only(logfmt: Capture) -> None:
    async def handle_request(request_id: str) -> None:
        set_context(request_id=request_id)  # e.g. from a Quart before_request hook
        await trio.lowlevel.checkpoint()
        logfmt.logger.info("http.request")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_request, "r1")
        nursery.start_soon(handle_request, "r2")
    logfmt.logger.info("after")
    *requests, after = logfmt.lines()
    assert sorted(line.rsplit(" ", 1)[1] for line in requests) == ["request_id=r1", "request_id=r2"]
    assert after.endswith("event=after")


def test_event_fields_follow_context_fields(logfmt: Capture) -> None:
    with bind(request_id="r9"):
        log_event(logfmt.logger, "info", "http.request", path="/health")
    assert logfmt.lines()[0].endswith("request_id=r9 path=/health")


# --- exceptions ------------------------------------------------------------------------------


def _boom() -> None:
    raise ValueError("bad value")


def test_expected_failure_gets_error_field_and_no_traceback(logfmt: Capture) -> None:
    try:
        _boom()
    except ValueError as exc:
        log_event(logfmt.logger, "warning", "feed.retry", exc_info=exc, delay=2)
    (line,) = logfmt.lines()
    assert line.endswith('delay=2 error="ValueError: bad value"')


def test_logger_exception_adds_the_traceback_on_following_lines(logfmt: Capture) -> None:
    try:
        _boom()
    except ValueError:
        logfmt.logger.exception("worker.crashed")
    first, *rest = logfmt.lines()
    assert first.endswith('event=worker.crashed error="ValueError: bad value"')
    assert rest[0] == "    Traceback (most recent call last):"
    assert any("_boom" in line for line in rest)
    assert all(line.startswith("    ") for line in rest)


def test_json_traceback_is_a_field(jsonlog: Capture) -> None:
    try:
        _boom()
    except ValueError:
        jsonlog.logger.exception("worker.crashed")
    (record,) = jsonlog.records()
    assert record["error"] == "ValueError: bad value"
    assert "Traceback (most recent call last)" in str(record["traceback"])


def test_debug_level_shows_tracebacks_of_warnings_too() -> None:
    capture = Capture("logfmt", debug=True)
    try:
        _boom()
    except ValueError:
        capture.logger.warning("feed.retry", exc_info=True)
    assert "Traceback" in capture.text


def test_exception_without_message_and_explicit_error_field(logfmt: Capture) -> None:
    try:
        raise TimeoutError
    except TimeoutError:
        logfmt.logger.warning("a", exc_info=True)
        log_event(logfmt.logger, "warning", "b", exc_info=True, error="custom")
    first, second = logfmt.lines()
    assert first.endswith("error=TimeoutError")
    assert second.endswith("error=custom")


# --- configure_logging -----------------------------------------------------------------------


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_configure_logging_installs_one_handler_and_replaces_it(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("warning", "logfmt", stream=io.StringIO())
    handler = configure_logging("debug", "json", stream=stream)
    root = logging.getLogger()
    assert [h for h in root.handlers if h.get_name() == "marketflow"] == [handler]
    assert root.level == logging.DEBUG
    logging.getLogger("marketflow.y").debug("hello", extra={"ctx": {"n": 1}})
    assert json.loads(stream.getvalue())["n"] == 1


def test_configure_logging_defaults_to_stderr(restore_root: None) -> None:
    handler = configure_logging("info", "logfmt")
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr


@pytest.mark.parametrize(("level", "fmt"), [("loud", "logfmt"), ("info", "xml")])
def test_configure_logging_rejects_unknown_values(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt)


# --- rate limiting ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_once_per_interval_per_key_and_counts() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5.0, clock=clock)
    assert limiter.allow("bad_line:ex1")
    assert limiter.suppressed("bad_line:ex1") == 0
    assert [limiter.allow("bad_line:ex1") for _ in range(3)] == [False] * 3
    assert limiter.allow("bad_line:ex2")  # keys are independent
    clock.now += 4.999
    assert not limiter.allow("bad_line:ex1")
    clock.now += 0.001
    assert limiter.allow("bad_line:ex1")
    assert limiter.suppressed("bad_line:ex1") == 4
    clock.now += 5
    assert limiter.allow("bad_line:ex1")
    assert limiter.suppressed("bad_line:ex1") == 0
    assert limiter.suppressed("never-seen") == 0


def test_rate_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, clock=clock, max_keys=100)
    for i in range(1000):
        assert limiter.allow(i)
    assert len(limiter._state) <= 100


def test_shared_rate_limited_helper() -> None:
    key = ("test_shared_rate_limited_helper", id(object()))
    assert rate_limited(key, 60.0)
    assert not rate_limited(key, 60.0)
