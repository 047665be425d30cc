"""The audit journal: one JSON line per mutation attempt, accepted or refused.

An accepted call's line holds the time, the peer, the caller's role (never a token), the
request, the outcome (a status code name, and the change's status) and the state version and
step. A refused call (no token, a read token, a bad or unsafe request) gets a bounded summary
instead, never its payload: method, peer, role, code, error (cut short) and the request's size,
at most about 1 KiB whatever the client sent. Refusals are rate-limited: past
`refusals_per_minute`, they are counted, and the count is written as one line before the next
line (or at close). Every line is flushed and fsynced before the RPC answers, so the journal
survives a crash of the trainer (and of the machine) up to the last answered call.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.message import Message

from lrctl.service.control.guardrails import RateLimiter
from lrctl.service.errors import ResourceExhaustedError
from lrctl.service.observability.logs import short

if TYPE_CHECKING:
    from lrctl.service.control.changes import Snapshot


#: The journal's file name in a checkpoint folder, lrctl-trainer's default location.
JOURNAL_NAME = "lrctl-journal.jsonl"
#: Refused calls journaled a minute at most (and as a burst); the rest are only counted. At
#: about 1 KiB each, a client hammering the trainer without a token adds at most ~14 MB a day.
REFUSALS_PER_MINUTE = 10.0
MAX_REFUSAL_TEXT = 200  # characters kept of a refusal's error message and peer


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class Journal:
    """Appends JSON lines to `path` (created with its folder if missing). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], *,
                 refusals_per_minute: float = REFUSALS_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- lives with the journal
        if _torn(self.path):
            # A crash tore the last line: end it, or the next record would be glued to it and
            # unreadable. The torn line itself was never answered; `read` skips it.
            self._file.write("\n")
            self._file.flush()
        self._lock = threading.Lock()
        self._refusals = RateLimiter(refusals_per_minute, clock)
        self._dropped = 0  # refusals counted but not journaled since the last line
        self._dropped_since = ""

    def record(self, **entry: Any) -> None:
        line = json.dumps({"time": _now(), **entry}, ensure_ascii=False, default=str)
        with self._lock:
            self._write_dropped()
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def _write_dropped(self) -> None:
        # Under the lock. One line for every refusal the rate limit kept out, before any later
        # line, so the journal still says that they happened and how many.
        if self._dropped:
            self._file.write(json.dumps({"time": _now(), "event": "refusals_not_journaled",
                                         "count": self._dropped, "since": self._dropped_since}) + "\n")
            self._dropped, self._dropped_since = 0, ""

    def record_call(self, *, method: str, peer: str, role: str, request: Message, code: str,
                    error: str, snapshot: Snapshot | None, change: Message | None = None) -> None:
        """One mutation attempt: who, what, and how it ended (`code`: a status code name).
        A refused one (any code but OK) is summarised and rate-limited (see the module doc)."""
        if code != "OK":
            self._record_refusal(method=method, peer=peer, role=role, request=request, code=code,
                                 error=error, snapshot=snapshot)
            return
        assert snapshot is not None, "an accepted change has a state"
        self.record(
            method=method, peer=peer, role=role,
            request=json_format.MessageToDict(request, preserving_proto_field_name=True),
            code=code, error=error,
            change_status=json_format.MessageToDict(change).get("status") if change else None,
            change_version=getattr(change, "version", None),
            version=snapshot.version, step=snapshot.step, run_id=snapshot.run_id,
        )

    def _record_refusal(self, *, method: str, peer: str, role: str, request: Message, code: str,
                        error: str, snapshot: Snapshot | None) -> None:
        try:
            self._refusals.take()
        except ResourceExhaustedError:
            with self._lock:
                self._dropped += 1
                self._dropped_since = self._dropped_since or _now()
            return
        # `request` holds only its size: a refused payload (a 1 MB reason) is the client's
        # text, and writing it would let anyone who reaches the port fill the disk.
        self.record(
            method=short(method, MAX_REFUSAL_TEXT), peer=short(peer, MAX_REFUSAL_TEXT), role=role,
            request={"bytes": request.ByteSize()}, code=code, error=short(error, MAX_REFUSAL_TEXT),
            version=snapshot.version if snapshot else None, step=snapshot.step if snapshot else None,
            run_id=snapshot.run_id if snapshot else None,
        )

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._write_dropped()
            self._file.close()


def _torn(path: str) -> bool:
    """Whether `path` is non-empty and its last byte is not a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every entry of a journal, oldest first (a torn last line from a crash is skipped)."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries
