"""The write-ahead log: every state transition of a change, fsynced before it is answered.

One JSON line per record, `{"seq": N, "lineage": L, ...body}`, `seq` increasing by one across
the file. Recovery (`checkpoint.Checkpointer.restore`) replays the records a checkpoint does
not include. Pure Python, no TensorFlow.

A record is acknowledged only once its line and the fsync after it returned, so a last line
with no newline, or one that does not parse, was never acknowledged: `open` truncates it
(logged), and the next append starts on a clean line instead of being glued to a torn one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger("lrctl.wal")

#: The WAL's file name in a checkpoint folder.
WAL_NAME = "lrctl-wal.jsonl"


def read_clean(path: str) -> tuple[list[dict[str, Any]], int, str]:
    """The records of a JSON-lines file up to its first torn or unparsable line, the byte
    length of that clean prefix, and what is wrong after it ("" if nothing)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0, ""
    records: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            return records, offset, f"a last line of {len(data) - offset} bytes with no newline"
        try:
            record = json.loads(data[offset:end])
        except ValueError as e:
            return records, offset, f"a line that does not parse at byte {offset} ({e})"
        if not isinstance(record, dict):
            return records, offset, f"a line that is not a JSON object at byte {offset}"
        records.append(record)
        offset = end + 1
    return records, offset, ""


def truncate_torn_tail(path: str) -> list[dict[str, Any]]:
    """Cut `path` back to its clean prefix (see `read_clean`), logging what was cut, and
    return its records. Everything after the first bad line goes: only the last append can be
    torn, and nothing after it was acknowledged."""
    records, size, problem = read_clean(path)
    if problem:
        total = os.path.getsize(path)
        logger.warning("%s ends with %s: truncating its last %d bytes (never acknowledged)",
                       path, problem, total - size)
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    return records


class WriteAheadLog:
    """Appends records to `path` (created if missing), one fsync per batch. Thread-safe: its
    own lock, so no caller's lock is held across the fsync. `records` are those on disk when
    it was opened (a torn tail truncated). `lineage` is stamped on every record appended."""

    def __init__(self, path: str | os.PathLike[str], *, lineage: str = "") -> None:
        self.path = os.fspath(path)
        self.lineage = lineage
        self.records = truncate_torn_tail(self.path)
        self._seq = max((int(r.get("seq", 0)) for r in self.records), default=0)
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")  # noqa: SIM115 -- lives with the log
        self._broken: OSError | None = None

    @property
    def seq(self) -> int:
        """The seq of the last record appended (0: none)."""
        return self._seq

    def advance(self, seq: int) -> None:
        """Number the next records above `seq` (a checkpoint's `wal_seq`): a seq is never
        handed out twice, even if the records up to it were compacted away."""
        with self._lock:
            self._seq = max(self._seq, seq)

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Write `records` (each gets the next seq and the lineage), then fsync once; return
        the last seq. Raises OSError if the disk refuses: then none of them counts (the file is
        cut back to where it was; if even that fails, every later append raises too, so that a
        half-written batch is never followed by acknowledged records)."""
        if not records:
            return self._seq
        with self._lock:
            if self._file.closed:  # the run is over: refused like a disk that refuses
                raise OSError(errno.EBADF, f"the write-ahead log {self.path} is closed")
            if self._broken is not None:
                raise OSError(self._broken.errno, f"the write-ahead log {self.path} is unusable "
                              f"since an earlier write failed: {self._broken.strerror or self._broken}")
            seq = self._seq
            lines = []
            for record in records:
                seq += 1
                lines.append(json.dumps({"seq": seq, "lineage": self.lineage, **record},
                                        allow_nan=True).encode() + b"\n")
            start = self._file.tell()
            try:
                self._file.write(b"".join(lines))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                self._undo(start, e)
                raise
            self._seq = seq
            return seq

    def _undo(self, start: int, error: OSError) -> None:
        try:
            self._file.seek(start)
            self._file.truncate(start)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._broken = error

    def compact(self, keep: Callable[[Mapping[str, Any]], bool]) -> int:
        """Rewrite the log with only the records `keep` accepts, atomically (a temporary file,
        fsync, rename, fsync the folder). Returns how many were dropped. Raises OSError (the
        log is then unchanged)."""
        with self._lock:
            records, _, _ = read_clean(self.path)
            # The last record always stays: it carries the highest seq to the next process.
            kept = [r for i, r in enumerate(records) if keep(r) or i == len(records) - 1]
            if len(kept) == len(records):
                return 0
            folder = os.path.dirname(os.path.abspath(self.path))
            tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(self.path)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(b"".join(json.dumps(r, allow_nan=True).encode() + b"\n" for r in kept))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._file.close()
            self._file = open(self.path, "ab")  # noqa: SIM115 -- the renamed file
            return len(records) - len(kept)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def after(records: Iterable[Mapping[str, Any]], seq: int, lineage: str) -> list[Mapping[str, Any]]:
    """`lineage`'s records with a seq above `seq`, in seq order."""
    return sorted((r for r in records if r.get("lineage", "") == lineage and int(r["seq"]) > seq),
                  key=lambda r: int(r["seq"]))


__all__ = ["WAL_NAME", "WriteAheadLog", "after", "read_clean", "truncate_torn_tail"]
