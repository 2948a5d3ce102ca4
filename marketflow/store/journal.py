"""A durable, append-only journal of row batches not yet committed to PostgreSQL (contract:
PostgreSQL)."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson

from marketflow.models import MinuteRow

log = logging.getLogger("marketflow.journal")

FORMAT_VERSION = 2  # 2 adds each row's first and last tick time and epoch; 1 still reads


def encode_batch(rows: Sequence[MinuteRow]) -> bytes:
    """One line: `<crc32 of the payload, 8 hex digits> <JSON payload>\\n`."""
    payload = orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "rows": [
                [
                    r.exchange,
                    r.symbol,
                    r.minute,
                    r.count,
                    r.total,
                    r.low,
                    r.high,
                    r.open,
                    r.close,
                    r.open_ms,
                    r.close_ms,
                    r.epoch,
                ]
                for r in rows
            ],
        }
    )
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_batch(line: bytes) -> list[MinuteRow] | None:
    """The batch on one line, or None when the line is torn or corrupt."""
    if not line.endswith(b"\n"):
        return None
    checksum, _, payload = line[:-1].partition(b" ")
    try:
        if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(payload):
            return None
        doc = orjson.loads(payload)
        if doc["v"] not in (1, FORMAT_VERSION):
            return None
        return [_row(fields) for fields in doc["rows"]]
    except (ValueError, TypeError, KeyError):
        return None


def _row(fields: list[Any]) -> MinuteRow:
    """One journaled row; version 1 rows have no tick times (read as the minute's bounds)."""
    e, s, m, c, t, lo, hi, o, cl, *times = fields
    row = MinuteRow(
        str(e), str(s), int(m), int(c), float(t), float(lo), float(hi), float(o), float(cl)
    )
    if times:  # version 2: the tick times and the writer's lease epoch
        open_ms, close_ms, epoch = times
        row = attrs.evolve(row, open_ms=int(open_ms), close_ms=int(close_ms), epoch=int(epoch))
    return row


class FileJournal:
    """Owns one append-only file of batches waiting for PostgreSQL (satisfies `Journal`).

    One batch per line with a checksum. `append` returns only once the line is on disk (fsync).
    A torn last line, left by a crash in the middle of an append that therefore never returned,
    is cut off with a warning when the journal is opened; a corrupt line elsewhere is skipped
    with a warning. Blocking and thread-safe: the caller runs it through `trio.to_thread`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.slot_fd: int | None = None  # the slot lock (claim_journal), held while we live
        self._lock = threading.Lock()
        self._size = 0  # bytes of whole lines in the file
        self._rows = 0
        self._recover()

    def append(self, rows: Sequence[MinuteRow]) -> None:
        if not rows:
            return
        line = encode_batch(rows)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError:
                # Never leave half a line for the next append to be glued to.
                os.ftruncate(fd, self._size)
                raise
            finally:
                os.close(fd)
            self._size += len(line)
            self._rows += len(rows)

    def batches(self) -> Iterator[list[MinuteRow]]:
        """Batches appended before this call, oldest first."""
        for _, batch in self.read_from(0):
            yield batch

    def read_from(self, offset: int) -> Iterator[tuple[int, list[MinuteRow]]]:
        """(offset after the batch, batch) for each batch from byte `offset` on that was
        appended before this call, oldest first: a replay can stop after any batch and go on
        from that offset later."""
        with self._lock:
            end = self._size
        position = offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                position += len(line)
                if position > end:
                    break
                batch = decode_batch(line)
                if batch is None:
                    log.warning(
                        "skipping a corrupt journal line in %s at byte %d",
                        self.path,
                        position - len(line),
                    )
                    continue
                yield position, batch

    def truncate(self) -> None:
        with self._lock, open(self.path, "wb") as f:
            f.flush()
            os.fsync(f.fileno())
            self._size = 0
            self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def _recover(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "ab") as f:
                os.fsync(f.fileno())
            _fsync_dir(self.path.parent)
            return
        with open(self.path, "r+b") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    log.warning(
                        "cutting a torn last line (%d bytes) off journal %s", len(line), self.path
                    )
                    f.truncate(self._size)
                    os.fsync(f.fileno())
                    break
                batch = decode_batch(line)
                if batch is None:
                    log.warning(
                        "skipping a corrupt journal line in %s at byte %d", self.path, self._size
                    )
                else:
                    self._rows += len(batch)
                self._size += len(line)


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MAX_SLOTS = 64


def claim_journal(data_dir: str | os.PathLike[str]) -> FileJournal:
    """This process's own journal in `data_dir` (contract: journals are per instance).

    Slot N is `journal.ndjson` (N = 0) or `journal.N.ndjson`, held by an fcntl lock on
    `journal.N.lock` for the life of the process: processes on one machine never share a file.
    The lowest free slot is taken; a slot whose lock is free but whose file holds batches (its
    process died) is adopted: its batches are appended to ours (fsync) before it is emptied, so
    they are replayed with ours — fencing refuses any that an instance with a newer epoch of the
    same source has overwritten meanwhile.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    mine: FileJournal | None = None
    for slot in range(MAX_SLOTS):
        fd = _try_lock(directory / f"journal.{slot}.lock")
        if fd is None:
            continue
        if mine is None:
            mine = FileJournal(_slot_path(directory, slot))
            mine.slot_fd = fd
            continue
        path = _slot_path(directory, slot)
        try:
            if path.exists() and path.stat().st_size:
                orphan = FileJournal(path)
                adopted = 0
                for batch in orphan.batches():
                    mine.append(batch)
                    adopted += len(batch)
                orphan.truncate()
                log.warning(
                    "adopted the journal of a process that is gone",
                    extra={"ctx": {"path": str(path), "rows": adopted}},
                )
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    if mine is None:
        raise RuntimeError(f"all {MAX_SLOTS} journal slots in {directory} are held")
    return mine


def _slot_path(directory: Path, slot: int) -> Path:
    return directory / ("journal.ndjson" if slot == 0 else f"journal.{slot}.ndjson")


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
