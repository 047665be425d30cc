"""The ledger: every change that ended, remembered for retries, lookups and listings.

The dedup window (the last `DEDUP_WINDOW` finished records, by id, request id and version)
answers a retry of a known request id with its first record instead of applying it again; the
history is the newest `history_size` records that snapshots show; the counts by status feed the
metrics. The ids of every change known (accepted and pending, or finished and in the window) are
kept ascending, so that a listing walks down from where it left off instead of sorting them all:
ids are handed out in increasing order, so a new one is appended, and a forgotten one, among
the oldest, is found by bisection. Not thread-safe: the controller calls it holding its lock.
"""

from __future__ import annotations

import bisect
import collections

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
        self._ids: list[int] = []  # every known id (pending or remembered), ascending

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
        """Remember `change` from its acceptance: its id (listings find it pending) and its
        request id (a retry finds it pending too)."""
        self._know(change.id)
        if change.request.request_id:
            self._by_request_id[change.request.request_id] = change.id

    def record(self, change: Change, *, counted: bool = True) -> None:
        """Remember `change`'s end; the oldest record beyond the window is forgotten.
        `counted`: whether it ends in this process (a replayed ending was counted before)."""
        self._finished[change.id] = change
        self._know(change.id)
        if change.version:
            self._by_version[change.version] = change.id
        while len(self._finished) > DEDUP_WINDOW:
            _, old = self._finished.popitem(last=False)
            index = bisect.bisect_left(self._ids, old.id)
            if index < len(self._ids) and self._ids[index] == old.id:
                del self._ids[index]
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

    def ids_before(self, before_id: int | None, limit: int) -> list[int]:
        """The newest `limit` known ids below `before_id` (None: all), newest first."""
        ids = self._ids
        end = len(ids) if before_id is None else bisect.bisect_left(ids, before_id)
        return ids[max(end - limit, 0):end][::-1]

    def oldest_id(self) -> int | None:
        return self._ids[0] if self._ids else None

    def _know(self, change_id: int) -> None:
        if not self._ids or change_id > self._ids[-1]:
            self._ids.append(change_id)  # the usual case: a new id, above every other
            return
        index = bisect.bisect_left(self._ids, change_id)
        if index == len(self._ids) or self._ids[index] != change_id:
            self._ids.insert(index, change_id)

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
        self._ids = sorted({c.id for c in [*finished[-DEDUP_WINDOW:], *pending]})
