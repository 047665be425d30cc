"""The audit journal: one JSON line per mutation attempt, accepted or rejected.

Each line holds the time, the peer, the caller's role (never a token), the request, the
outcome (a status code name, and the change's status when there is one), the state version
and the step. Every line is flushed and fsynced before the RPC answers, so the journal
survives a crash of the trainer (and of the machine) up to the last answered call.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.message import Message

if TYPE_CHECKING:
    from lrctl.service.controller import Snapshot


class Journal:
    """Appends JSON lines to `path` (created with its folder if missing). Thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- lives with the journal
        self._lock = threading.Lock()

    def record(self, **entry: Any) -> None:
        line = json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **entry},
                          ensure_ascii=False, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def record_call(self, *, method: str, peer: str, role: str, request: Message, code: str,
                    error: str, snapshot: Snapshot, change: Message | None = None) -> None:
        """One mutation attempt: who, what, and how it ended (`code`: a status code name)."""
        self.record(
            method=method, peer=peer, role=role,
            request=json_format.MessageToDict(request, preserving_proto_field_name=True),
            code=code, error=error,
            change_status=json_format.MessageToDict(change).get("status") if change else None,
            change_version=getattr(change, "version", None),
            version=snapshot.version, step=snapshot.step, run_id=snapshot.run_id,
        )

    def close(self) -> None:
        with self._lock:
            self._file.close()


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
