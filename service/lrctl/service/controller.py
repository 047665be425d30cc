"""The controller: one place that validates, one queue, one place that applies, versioned history.

Pure Python, no TensorFlow and no gRPC. Any thread may submit changes and read snapshots;
only the training thread calls `apply_due` and `publish`, at step boundaries. The engine is
reached through the small `ScheduleTarget` protocol, so TensorFlow is touched only by the
thread that calls `apply_due`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.specs import ActiveSchedule, Constant, Origin, ScheduleSpec, check_number


class Phase(enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"


class ChangeStatus(enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    VALIDATED = "validated"  #: validate_only: checked, never queued
    ABORTED = "aborted"  #: expected_version no longer matched at the step boundary
    CANCELLED = "cancelled"  #: the run ended before the change was due


@dataclass(frozen=True)
class PinLearningRate:
    """Replace the schedule with a constant."""

    learning_rate: float

    def describe(self) -> str:
        return f"set lr={self.learning_rate:g}"


@dataclass(frozen=True)
class ScaleLearningRate:
    """Multiply the active schedule by `factor` (cumulative)."""

    factor: float

    def describe(self) -> str:
        return f"scale x{self.factor:g}"


@dataclass(frozen=True)
class SwapSchedule:
    """Replace the active schedule."""

    schedule: ScheduleSpec
    origin: Origin = Origin.RESTART

    def describe(self) -> str:
        return f"swap {self.schedule.describe()} origin={self.origin.value}"


Action = PinLearningRate | ScaleLearningRate | SwapSchedule


@dataclass(frozen=True)
class ChangeRequest:
    action: Action
    request_id: str = ""
    expected_version: int | None = None
    apply_at_step: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Change:
    """One change's record. Pending records are replaced by their final form when applied."""

    id: int  #: internal identity, stable across the record's updates
    request: ChangeRequest
    status: ChangeStatus
    requested_step: int
    requested_time: float
    version: int = 0  #: the state version this change produced; 0 unless APPLIED
    applied_step: int | None = None
    learning_rate_after: float | None = None
    schedule_after: ActiveSchedule | None = None
    applied_time: float | None = None
    current_version: int | None = None  #: for ABORTED: the version that did not match

    @property
    def description(self) -> str:
        return self.request.action.describe()


@dataclass(frozen=True)
class Snapshot:
    """What other threads may read, with no TensorFlow involved."""

    run_id: str
    phase: Phase
    step: int
    epoch: int
    learning_rate: float
    schedule: ActiveSchedule
    version: int
    metrics: Mapping[str, float]
    optimizer: str
    pending: tuple[Change, ...]
    recent: tuple[Change, ...]
    updated_time: float
    seq: int = 0  #: bumped on every publication; lets watchers skip unchanged states


class ScheduleTarget(Protocol):
    """The engine as the controller sees it. Called from the training thread only."""

    def load(self, state: ActiveSchedule, version: int) -> None: ...
    def read(self) -> tuple[ActiveSchedule, int]: ...
    def learning_rate(self, step: int) -> float: ...


class Controller:
    """Validates change requests, queues them, and applies them at step boundaries."""

    def __init__(
        self,
        target: ScheduleTarget,
        *,
        run_id: str | None = None,
        optimizer: str = "",
        history_size: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._target = target
        self._clock = clock
        # One condition guards everything below. Submitters, readers and the training thread
        # each hold it only briefly; waiters and watchers sleep on it.
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._pending: dict[int, Change] = {}
        self._next_due: int | None = None  # derived from _pending by _republish
        self._finished: collections.OrderedDict[int, Change] = collections.OrderedDict()
        self._finished_limit = max(history_size, 1024)
        self._by_request_id: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._history: collections.deque[Change] = collections.deque(maxlen=history_size)
        state, version = target.read()
        self._snapshot = Snapshot(
            run_id=run_id or uuid.uuid4().hex[:12], phase=Phase.STARTING, step=0, epoch=0,
            learning_rate=math.nan, schedule=state, version=version, metrics={},
            optimizer=optimizer, pending=(), recent=(), updated_time=clock(),
        )

    # -- any thread ------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._cond:
            return self._snapshot

    @property
    def has_pending(self) -> bool:
        return self._next_due is not None

    @property
    def next_due_step(self) -> int | None:
        """The earliest step at which a pending change is due (0: at once); None if nothing is
        pending. For the training thread's hot path: one attribute read, no lock."""
        return self._next_due

    def submit(self, request: ChangeRequest, *, validate_only: bool = False) -> Change:
        """Validate `request` now and queue it for the next due step boundary.

        A retry with a known `request_id` returns the first request's current record.
        Raises InvalidArgumentError, VersionConflictError or FailedPreconditionError.
        """
        self._validate_action(request.action)
        if request.apply_at_step is not None and request.apply_at_step < 0:
            raise InvalidArgumentError("apply_at_step", "must be >= 0", request.apply_at_step)
        with self._cond:
            if request.request_id and not validate_only:
                known = self._by_request_id.get(request.request_id)
                if known is not None and (record := self._lookup(known)) is not None:
                    return record
            snap = self._snapshot
            if snap.phase in (Phase.STOPPING, Phase.FINISHED, Phase.FAILED):
                raise FailedPreconditionError(f"the run is {snap.phase.value}; it accepts no more changes")
            if request.expected_version is not None and request.expected_version != snap.version:
                raise VersionConflictError(request.expected_version, snap.version)
            if request.apply_at_step is not None and request.apply_at_step < snap.step:
                raise FailedPreconditionError(
                    f"apply_at_step={request.apply_at_step} is in the past: the run is at step {snap.step}",
                    field="apply_at_step",
                )
            change = Change(
                id=next(self._ids), request=request,
                status=ChangeStatus.VALIDATED if validate_only else ChangeStatus.PENDING,
                requested_step=snap.step, requested_time=self._clock(),
            )
            if validate_only:
                return change
            self._pending[change.id] = change
            if request.request_id:
                self._by_request_id[request.request_id] = change.id
                while len(self._by_request_id) > self._finished_limit:
                    self._by_request_id.popitem(last=False)
            self._republish()
            return change

    def wait(self, change: Change, timeout: float | None) -> Change:
        """Block until `change` leaves PENDING; return its final record.

        Raises WaitTimeoutError when `timeout` (seconds; None waits forever) runs out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                record = self._lookup(change.id)
                if record is None or record.status is not ChangeStatus.PENDING:
                    return record or change
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeoutError(
                        f"change {change.description!r} was not applied in time; it stays pending"
                    )
                self._cond.wait(remaining)

    def updates(self, min_interval: float, is_active: Callable[[], bool],
                poll: float = 0.5) -> Iterator[Snapshot]:
        """Snapshots for a watcher: the current one at once, then the latest one at most every
        `min_interval` while training advances, and at once after each applied change or phase
        change. A slow consumer skips intermediate states; it never holds up the trainer.
        `is_active` is polled every `poll` seconds so that a cancelled watcher is let go."""
        sent: Snapshot | None = None
        sent_at = -math.inf
        while is_active():
            with self._cond:
                snap = self._snapshot
                urgent = sent is None or snap.version != sent.version or snap.phase != sent.phase
                since = time.monotonic() - sent_at
                if not urgent and (sent is None or snap.seq == sent.seq or since < min_interval):
                    idle = sent is not None and snap.seq == sent.seq
                    self._cond.wait(poll if idle else min(poll, max(min_interval - since, 0.0)))
                    continue
            sent, sent_at = snap, time.monotonic()
            yield snap
            if snap.phase in (Phase.FINISHED, Phase.FAILED):
                return

    # -- training thread -------------------------------------------------------------------
    def apply_due(self, step: int) -> list[Change]:
        """Apply, in submission order, every pending change whose `apply_at_step` <= `step`.

        Called by the training thread at a step boundary: `step` steps have completed and
        none is running, so the engine's variables can be assigned safely.
        """
        if self._next_due is None:
            return []
        applied: list[Change] = []
        with self._cond:
            due = [c for c in self._pending.values()
                   if c.request.apply_at_step is None or c.request.apply_at_step <= step]
            snap = self._snapshot
            state, version, lr = snap.schedule, snap.version, snap.learning_rate
            for change in due:
                del self._pending[change.id]
                expected = change.request.expected_version
                if expected is not None and expected != version:
                    final = dataclasses.replace(change, status=ChangeStatus.ABORTED, current_version=version,
                                                applied_time=self._clock())
                else:
                    state = self._next_state(state, change.request.action, step)
                    version += 1
                    self._target.load(state, version)
                    lr = self._target.learning_rate(step)
                    final = dataclasses.replace(
                        change, status=ChangeStatus.APPLIED, version=version, applied_step=step,
                        learning_rate_after=lr, schedule_after=state, applied_time=self._clock(),
                    )
                self._finish(final)
                applied.append(final)
            self._snapshot = dataclasses.replace(
                snap, step=step, schedule=state, version=version, learning_rate=lr,
                updated_time=self._clock(),
            )
            self._republish()
        return applied

    def publish(self, *, step: int, learning_rate: float, metrics: Mapping[str, float] | None = None,
                epoch: int | None = None) -> None:
        """Record the training thread's view after a step, for readers and watchers."""
        with self._cond:
            snap = self._snapshot
            self._snapshot = dataclasses.replace(
                snap, step=step, learning_rate=learning_rate,
                metrics=dict(metrics) if metrics is not None else snap.metrics,
                epoch=snap.epoch if epoch is None else epoch, updated_time=self._clock(),
            )
            self._republish()

    def resync(self) -> None:
        """Re-read the engine (e.g. after a checkpoint restore). Training thread only."""
        state, version = self._target.read()
        with self._cond:
            self._snapshot = dataclasses.replace(self._snapshot, schedule=state, version=version)
            self._republish()

    def set_phase(self, phase: Phase) -> None:
        """Move the run to `phase`. Ending the run cancels every pending change."""
        with self._cond:
            if phase in (Phase.FINISHED, Phase.FAILED):
                for change in list(self._pending.values()):
                    del self._pending[change.id]
                    self._finish(dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                     applied_time=self._clock()))
            self._snapshot = dataclasses.replace(self._snapshot, phase=phase, updated_time=self._clock())
            self._republish()

    # -- internals (lock held) ---------------------------------------------------------------
    @staticmethod
    def _validate_action(action: Action) -> None:
        if isinstance(action, PinLearningRate):
            check_number("learning_rate", action.learning_rate, minimum=0)
        elif isinstance(action, ScaleLearningRate):
            check_number("scale", action.factor, minimum=0, inclusive=False)
        # A SwapSchedule's spec validated itself when it was built.

    @staticmethod
    def _next_state(state: ActiveSchedule, action: Action, step: int) -> ActiveSchedule:
        if isinstance(action, PinLearningRate):
            return ActiveSchedule(Constant(action.learning_rate), Origin.RESTART, step, 1.0)
        if isinstance(action, ScaleLearningRate):
            return dataclasses.replace(state, scale=state.scale * action.factor)
        origin_step = step if action.origin is Origin.RESTART else 0
        return ActiveSchedule(action.schedule, action.origin, origin_step, 1.0)

    def _lookup(self, change_id: int) -> Change | None:
        return self._pending.get(change_id) or self._finished.get(change_id)

    def _finish(self, change: Change) -> None:
        self._finished[change.id] = change
        while len(self._finished) > self._finished_limit:
            self._finished.popitem(last=False)
        self._history.append(change)

    def _republish(self) -> None:
        self._next_due = min((c.request.apply_at_step or 0 for c in self._pending.values()), default=None)
        self._snapshot = dataclasses.replace(
            self._snapshot, pending=tuple(self._pending.values()), recent=tuple(self._history),
            seq=self._snapshot.seq + 1,
        )
        self._cond.notify_all()


__all__ = [
    "Action", "Change", "ChangeRequest", "ChangeStatus", "Controller", "Phase", "PinLearningRate",
    "ScaleLearningRate", "ScheduleTarget", "Snapshot", "SwapSchedule",
]
