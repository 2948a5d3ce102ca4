"""FileJournal: durable append, ordered replay, torn-line recovery, durable truncate."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketflow.models import MinuteRow
from marketflow.store.journal import FileJournal, decode_batch, encode_batch

M = 60_000


def batch(first_minute: int, n: int, exchange: str = "exchange1") -> list[MinuteRow]:
    return [
        MinuteRow(exchange, "BTCUSDT", (first_minute + i) * M, i + 1, 0.1 + 0.2 + i, 99.5, 101.0,
                  100.000000001, 1e-300 + i)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "aggregates.journal"


def test_append_then_batches_round_trip_in_order(path: Path) -> None:
    journal = FileJournal(path)
    assert path.exists() and len(journal) == 0 and list(journal.batches()) == []
    written = [batch(0, 3), batch(3, 1, "test-exchange2"), batch(4, 200)]
    for rows in written:
        journal.append(rows)
    journal.append([])  # nothing to write
    assert list(journal.batches()) == written
    assert len(journal) == 204
    assert path.read_bytes().count(b"\n") == 3


def test_reopening_sees_the_same_batches(path: Path) -> None:
    written = [batch(0, 2), batch(2, 5)]
    journal = FileJournal(path)
    for rows in written:
        journal.append(rows)
    again = FileJournal(path)
    assert list(again.batches()) == written
    assert len(again) == 7


def test_append_is_on_disk_before_it_returns(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = FileJournal(path)
    synced_sizes: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced_sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    journal.append(batch(0, 2))
    first = path.stat().st_size
    journal.append(batch(2, 3))
    # Each append fsyncs once, after its whole line is written.
    assert synced_sizes == [first, path.stat().st_size]
    journal.truncate()
    assert synced_sizes[-1] == 0


def test_a_torn_last_line_is_cut_off_with_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = FileJournal(path)
    journal.append(batch(0, 2))
    journal.append(batch(2, 3))
    whole = path.stat().st_size
    with open(path, "ab") as f:  # a crash in the middle of the third append
        f.write(encode_batch(batch(5, 4))[:-7])
    with caplog.at_level(logging.WARNING, logger="marketflow.journal"):
        reopened = FileJournal(path)
    assert "torn" in caplog.text
    assert list(reopened.batches()) == [batch(0, 2), batch(2, 3)]
    assert len(reopened) == 5
    assert path.stat().st_size == whole
    reopened.append(batch(9, 1))  # the next append starts on a line of its own
    assert list(FileJournal(path).batches()) == [batch(0, 2), batch(2, 3), batch(9, 1)]


def test_a_corrupt_line_is_skipped_with_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = FileJournal(path)
    journal.append(batch(0, 2))
    journal.append(batch(2, 3))
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01  # a flipped bit inside the first batch
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="marketflow.journal"):
        reopened = FileJournal(path)
        assert list(reopened.batches()) == [batch(2, 3)]
    assert "corrupt" in caplog.text
    assert len(reopened) == 3


def test_truncate_empties_it_durably(path: Path) -> None:
    journal = FileJournal(path)
    journal.append(batch(0, 2))
    journal.truncate()
    assert len(journal) == 0
    assert list(journal.batches()) == []
    assert path.stat().st_size == 0
    assert len(FileJournal(path)) == 0
    journal.append(batch(7, 1))
    assert list(FileJournal(path).batches()) == [batch(7, 1)]


def test_batches_are_those_appended_before_the_call(path: Path) -> None:
    journal = FileJournal(path)
    journal.append(batch(0, 1))
    journal.append(batch(1, 1))
    replay = iter(journal.batches())
    assert next(replay) == batch(0, 1)
    journal.append(batch(2, 1))
    assert list(replay) == [batch(1, 1)]


rows_strategy = st.lists(
    st.builds(
        MinuteRow,
        exchange=st.text(min_size=1, max_size=32),
        symbol=st.text(min_size=1, max_size=20),
        minute=st.integers(min_value=-(2**40), max_value=2**40).map(lambda m: m * M),
        count=st.integers(min_value=1, max_value=2**62),
        total=st.floats(allow_nan=False, allow_infinity=False),
        low=st.floats(allow_nan=False, allow_infinity=False),
        high=st.floats(allow_nan=False, allow_infinity=False),
        open=st.floats(allow_nan=False, allow_infinity=False),
        close=st.floats(allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=20,
)


@given(rows_strategy)
def test_lines_round_trip_every_value_exactly(rows: list[MinuteRow]) -> None:
    assert decode_batch(encode_batch(rows)) == rows


@given(rows_strategy, st.data())
def test_any_damaged_payload_byte_is_detected(rows: list[MinuteRow], data: st.DataObject) -> None:
    line = bytearray(encode_batch(rows))
    at = data.draw(st.integers(min_value=9, max_value=len(line) - 2))  # after "crc32hex "
    line[at] ^= data.draw(st.integers(min_value=1, max_value=255))
    assert decode_batch(bytes(line)) is None
    assert decode_batch(bytes(line[: data.draw(st.integers(0, len(line) - 1))])) is None
