"""The queue: changes accepted and not yet applied, and when each falls due.

Pending changes keep their submission order (a dict); a heap of (due step, id) finds the next
one due in O(log n), its stale entries (cancelled or finished changes) dropped lazily. Ahead of
them come the replays: changes a previous process applied after its checkpoint (from the
write-ahead log), loaded again at their step with their version before anything else applies.
`next_due` is the step the training thread compares with at every boundary, one attribute read.
Not thread-safe: the controller calls it holding its lock.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Iterable

from lrctl.service.control.changes import Boundaries, Change


class ChangeQueue:
    """Pending changes by id, in submission order, with their due steps; then the replays."""

    def __init__(self) -> None:
        self._pending: dict[int, Change] = {}  # in submission order
        self._due: list[tuple[int, int]] = []  # heap of (due step, id); stale ids are skipped
        self._applying: set[int] = set()  # taken by the training thread, being applied
        #: Changes applied before a restart, still to re-apply, in (applied_step, version) order.
        self.replays: list[Change] = []
        #: The earliest step at which something is due (0: at once); None if nothing is.
        self.next_due: int | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, change_id: int) -> bool:
        return change_id in self._pending

    def get(self, change_id: int) -> Change | None:
        return self._pending.get(change_id)

    def changes(self) -> list[Change]:
        """The pending changes, in submission order."""
        return list(self._pending.values())

    def oldest(self, count: int) -> tuple[Change, ...]:
        return tuple(itertools.islice(self._pending.values(), count))

    def is_applying(self, change_id: int) -> bool:
        return change_id in self._applying

    def add(self, change: Change) -> None:
        self._pending[change.id] = change
        heapq.heappush(self._due, (change.due_key, change.id))

    def remove(self, change_id: int) -> None:
        """Take a change out, if it is in (its heap entry goes stale and is skipped)."""
        self._pending.pop(change_id, None)
        self._applying.discard(change_id)

    def restore(self, pending: list[Change], replays: list[Change]) -> None:
        """Put back a checkpoint's pending changes and the replays it still owed."""
        self._pending = {c.id: c for c in pending}
        self._due = [(c.due_key, c.id) for c in pending]
        heapq.heapify(self._due)
        self.replays = list(replays)

    def take_due(self, step: int, boundaries: Boundaries | None) -> tuple[list[Change], list[Change], bool]:
        """At boundary `step`: the replays due and the pending changes due (in submission order,
        marked as being applied; none while replays are outstanding), and whether some
        `apply_after_steps` got their due step fixed here (the first boundary that saw them)."""
        replays = []
        while self.replays and (self.replays[0].applied_step or 0) <= step:
            replays.append(self.replays.pop(0))
        due_ids = []
        resolved = False
        while not self.replays and self._due and self._due[0][0] <= step:
            _, change_id = heapq.heappop(self._due)
            pending = self._pending.get(change_id)
            if pending is None:
                continue
            after = pending.request.apply_after_steps
            if after and pending.due_step is None:
                # The first boundary that sees this change: it is due `after` steps on, at the
                # first step a boundary reaches.
                due_step = boundaries.first_from(step + after) if boundaries else step + after
                self._pending[change_id] = dataclasses.replace(pending, due_step=due_step)
                heapq.heappush(self._due, (due_step, change_id))
                resolved = True
                continue
            due_ids.append(change_id)
        self._applying.update(due_ids)
        return replays, [self._pending[i] for i in sorted(due_ids)], resolved

    def put_back(self, changes: Iterable[Change]) -> None:
        """Changes taken by `take_due` that were not applied: due again at the next boundary."""
        for change in changes:
            self._applying.discard(change.id)
            heapq.heappush(self._due, (self._pending[change.id].due_key, change.id))

    def tidy(self) -> None:
        """Drop stale heap entries, and set `next_due`: replays first, other changes wait
        until the last one is in force."""
        while self._due and self._due[0][1] not in self._pending:
            heapq.heappop(self._due)  # cancelled or finished: drop lazily
        if len(self._due) > 2 * len(self._pending) + 64:
            self._due = [(c.due_key, i) for i, c in self._pending.items() if i not in self._applying]
            heapq.heapify(self._due)
        self.next_due = (self.replays[0].applied_step or 0) if self.replays else \
            self._due[0][0] if self._due else None
