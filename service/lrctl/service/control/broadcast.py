"""The broadcast: the one published `Snapshot`, and who reads it, waits on it or listens to it.

Every reader (GetState, WatchState, the health follower, metrics) takes the latest snapshot, a
frozen object replaced whole, so a reader never sees half an update and never holds up the
training thread. The condition here is the controller's one lock: whoever changes the state
republishes under it, which wakes the threads waiting (a change leaving PENDING) and calls the
listeners (the server's event loop hears of each publish through one, and runs WatchState).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lrctl.service.control.changes import (
    Boundaries,
    Change,
    ChangeStatus,
    Phase,
    Snapshot,
    WorkerState,
)
from lrctl.service.control.throughput import Throughput
from lrctl.service.errors import UnavailableError, WaitTimeoutError

logger = logging.getLogger("lrctl.controller")

#: Told of each publish, by the publishing thread holding the controller's lock: the snapshot
#: just published and the changes that left PENDING since the previous publish (final records).
Listener = Callable[[Snapshot, tuple[Change, ...]], None]


class Board:
    """The published snapshot under one condition; waiting for a change; the listeners."""

    def __init__(self, snapshot: Snapshot, clock: Callable[[], float]) -> None:
        #: Guards the snapshot and, for the controller, everything it holds. Held briefly,
        #: never across engine work; waiters sleep on it.
        self.cond = threading.Condition()
        self._snapshot = snapshot
        self._clock = clock
        self._throughput = Throughput()
        self._waiters: collections.Counter[int] = collections.Counter()
        self._results: dict[int, Change] = {}  # final records of waited-for changes
        # Replaced, never mutated: a listener may unsubscribe while the list is being called.
        self._listeners: tuple[Listener, ...] = ()
        self._ended: list[Change] = []  # since the last publish, for the listeners
        #: The applied_step of the last applied change (-1: none): metrics taken at or before
        #: it are cleared, never shown as if they came after it.
        self.changed_step = -1

    @property
    def current(self) -> Snapshot:
        """The latest snapshot, for a caller holding `cond` (or content with one attribute read)."""
        return self._snapshot

    def snapshot(self) -> Snapshot:
        with self.cond:
            return self._snapshot

    def update(self, **changes: Any) -> None:
        """Replace fields of the snapshot without publishing (the caller holds `cond` and
        publishes next)."""
        self._snapshot = _replaced(self._snapshot, changes)

    def publish(self, **changes: Any) -> None:
        """Publish the snapshot with `changes` (the caller holds `cond`): readers and watchers
        see it, waiters wake."""
        taken = changes.get("metrics_step", self._snapshot.metrics_step)
        if taken is not None and taken <= self.changed_step:
            # Taken before the last change took effect (at its step or earlier): never present
            # them as if they came after it.
            changes.update(metrics={}, metrics_step=None, metrics_time=None)
        changes["seq"] = self._snapshot.seq + 1
        self._snapshot = _replaced(self._snapshot, changes)
        self.cond.notify_all()
        if self._listeners:
            ended, self._ended = tuple(self._ended), []
            for listener in self._listeners:
                try:
                    listener(self._snapshot, ended)
                except Exception:
                    logger.exception("a listener failed on publish %d", self._snapshot.seq)

    def ended(self, change: Change) -> None:
        """`change` left PENDING (the caller holds `cond` and publishes next): its waiters get
        its final record even if the ledger forgets it before they wake, and so do the
        listeners, with the next publish."""
        if change.id in self._waiters:
            self._results[change.id] = change
        if self._listeners:
            self._ended.append(change)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """`Controller.listen`: call `listener(snapshot, ended)` after every publish, with the
        snapshot just published and the changes that left PENDING since the previous one (their
        final records). It runs on the publishing thread (often the training thread, up to
        hundreds of times a second) under `cond`, so it must be cheap and must not block or
        call back into the controller: hand the news to another thread or event loop. Returns
        the call that unsubscribes it."""
        with self.cond:
            self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            with self.cond:
                self._listeners = tuple(x for x in self._listeners if x is not listener)
                if not self._listeners:
                    self._ended.clear()

        return unsubscribe

    # -- the training thread's view ------------------------------------------------------------
    def record_step(self, *, step: int, learning_rate: float, metrics: Mapping[str, float] | None,
                    epoch: int | None, metrics_step: int | None, metrics_time: float | None,
                    lr_clamp_count: int | None) -> None:
        """`Controller.publish`: the training thread's view at a step boundary."""
        with self.cond:
            snap = self._snapshot
            now = self._clock()
            changes: dict[str, Any] = {}
            if metrics is not None:
                changes.update(metrics=dict(metrics),
                               metrics_step=step if metrics_step is None else metrics_step,
                               metrics_time=now if metrics_time is None else metrics_time)
            rate = self._throughput.observe(step, now)
            if rate is not None:
                changes["steps_per_second"] = rate
            if lr_clamp_count is not None:
                changes["lr_clamp_count"] = lr_clamp_count
            self.update(step=step, learning_rate=learning_rate,
                        epoch=snap.epoch if epoch is None else epoch, updated_time=now, **changes)
            self.publish()

    def record_epoch(self, *, epoch: int, metrics: Mapping[str, float], step: int) -> None:
        with self.cond:
            now = self._clock()
            self.update(epoch_metrics=dict(metrics), epoch_metrics_epoch=epoch,
                        epoch_metrics_step=step, epoch_metrics_time=now, updated_time=now)
            self.publish()

    def set_boundaries(self, boundaries: Boundaries | None, epoch_start_step: int | None) -> None:
        with self.cond:
            changes: dict[str, Any] = {"boundaries": boundaries}
            if epoch_start_step is not None:
                changes["epoch_start_step"] = epoch_start_step
            self.publish(**changes)

    def set_workers(self, workers: tuple[WorkerState, ...]) -> None:
        with self.cond:
            if workers != self._snapshot.workers:
                self.publish(workers=workers)

    def checkpointed(self, step: int | None, error: str) -> None:
        with self.cond:
            snap = self._snapshot
            if step is not None:
                self.publish(checkpoint_step=step, checkpoint_error="")
            else:
                self.publish(checkpoint_failures=snap.checkpoint_failures + 1, checkpoint_error=error)

    # -- readers -------------------------------------------------------------------------------
    def wait(self, change: Change, timeout: float | None, lookup: Callable[[int], Change | None]) -> Change:
        """`Controller.wait`: block until `change` leaves PENDING (`lookup` finds its record)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._waiters[change.id] += 1
            try:
                while True:
                    record = self._results.get(change.id) or lookup(change.id) or change
                    if record.status is not ChangeStatus.PENDING:
                        return record
                    if self._snapshot.phase is Phase.STOPPED:
                        raise UnavailableError(
                            f"the trainer stopped before change {change.description!r} was due; it "
                            "stays pending in the checkpoint and applies after the restart: wait "
                            "for it then (retry with the same request_id)")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise WaitTimeoutError(
                            f"change {change.description!r} was not applied in time; it stays pending"
                        )
                    self.cond.wait(remaining)
            finally:
                self._waiters[change.id] -= 1
                if not self._waiters[change.id]:
                    del self._waiters[change.id]
                    self._results.pop(change.id, None)


_SNAPSHOT_FIELDS = frozenset(f.name for f in dataclasses.fields(Snapshot))


def _replaced(snapshot: Snapshot, changes: Mapping[str, Any]) -> Snapshot:
    """`dataclasses.replace(snapshot, **changes)` for this frozen dataclass of ~40 fields
    with no __post_init__ and nothing cached in its __dict__, several times cheaper (several
    times per change, under the lock): a copy of its __dict__ with `changes`; an unknown
    field is refused, as replace refuses it (tests/test_quick.py checks they agree)."""
    unknown = changes.keys() - _SNAPSHOT_FIELDS
    if unknown:
        raise TypeError(f"Snapshot has no field(s) {sorted(unknown)}")
    new = object.__new__(Snapshot)
    new.__dict__.update(snapshot.__dict__)
    new.__dict__.update(changes)
    return new
