"""The ledger: every change that ended, remembered for retries, lookups and listings.

The dedup window (the last `DEDUP_WINDOW` finished records, by id, request id and version)
answers a retry of a known request id with its first record instead of applying it again; the
history is the newest `history_size` records that snapshots show; the counts by status feed the
metrics. Not thread-safe: the controller calls it holding its lock.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from lrctl.service.control.changes import Change, ChangeStatus
from lrctl.service.control.limits import DEDUP_WINDOW


class Ledger:
    """Finished changes by id, request id and version, and the recent history."""

    def __init__(self, history_size: int) -> None:
        self._finished: collections.OrderedDict[int, Change] = collections.OrderedDict()
        self._by_request_id: dict[str, int] = {}
        self._by_version: dict[int, int] = {}
        self._history: collections.deque[Change] = collections.deque(maxlen=history_size)
        self._ended: collections.Counter[ChangeStatus] = collections.Counter()

    def get(self, change_id: int) -> Change | None:
        """The finished record of `change_id`, if it is in the window."""
        return self._finished.get(change_id)

    def by_request_id(self, request_id: str) -> int | None:
        """The id of the change (pending or finished) that `request_id` named."""
        return self._by_request_id.get(request_id)

    def by_version(self, version: int) -> int | None:
        """The id of the change that produced `version`."""
        return self._by_version.get(version)

    def name(self, change: Change) -> None:
        """Remember `change`'s request id (from its acceptance: a retry finds it pending too)."""
        if change.request.request_id:
            self._by_request_id[change.request.request_id] = change.id

    def record(self, change: Change, *, counted: bool = True) -> None:
        """Remember `change`'s end; the oldest record beyond the window is forgotten.
        `counted`: whether it ends in this process (a replayed ending was counted before)."""
        self._finished[change.id] = change
        if change.version:
            self._by_version[change.version] = change.id
        while len(self._finished) > DEDUP_WINDOW:
            _, old = self._finished.popitem(last=False)
            if self._by_request_id.get(old.request.request_id) == old.id:
                del self._by_request_id[old.request.request_id]
            self._by_version.pop(old.version, None)
        self._history.append(change)
        if counted:
            self._ended[change.status] += 1

    def count(self, status: ChangeStatus) -> None:
        """Count an ending that is never recorded (a validate_only request)."""
        self._ended[status] += 1

    def ended_counts(self) -> dict[ChangeStatus, int]:
        return dict(self._ended)

    def finished_ids(self) -> Iterable[int]:
        return self._finished.keys()

    def finished(self) -> list[Change]:
        """The remembered finished records, in the order they finished."""
        return list(self._finished.values())

    def history(self) -> tuple[Change, ...]:
        """The newest `history_size` records, oldest first."""
        return tuple(self._history)

    def restore(self, finished: list[Change], history: list[Change], pending: list[Change]) -> None:
        """Put back a checkpoint's records (`finished` in the order they finished)."""
        self._finished.clear()
        self._by_request_id.clear()
        self._by_version.clear()
        for change in finished[-DEDUP_WINDOW:]:
            self._finished[change.id] = change
            if change.version:
                self._by_version[change.version] = change.id
        for change in [*finished[-DEDUP_WINDOW:], *pending]:
            self.name(change)
        self._history.clear()
        self._history.extend(history)
