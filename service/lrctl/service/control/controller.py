"""The controller: one place that validates, one queue, one place that applies, versioned history.

Pure Python, no TensorFlow and no gRPC. Any thread may submit, cancel and list changes and
read snapshots; only the training thread calls `at_boundary`, `apply_due`, `publish` and
`restored`, at step boundaries. The engine is reached through the small `ScheduleTarget`
protocol, and no lock is held while it runs: a device sync never blocks an RPC.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lrctl.service.control import guardrails
from lrctl.service.control.errors import (
    ApplyError,
    FailedPreconditionError,
    IncarnationMismatchError,
    InvalidArgumentError,
    NotFoundError,
    RequestIdReusedError,
    ResourceExhaustedError,
    RunIdMismatchError,
    UnavailableError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails, RateLimiter
from lrctl.service.control.throughput import Throughput
from lrctl.service.schedules import forms
from lrctl.service.schedules.specs import (
    FLOAT32_MAX,
    ActiveSchedule,
    Constant,
    Origin,
    ScheduleSpec,
    check_number,
    spec_from_config,
)

logger = logging.getLogger("lrctl.controller")

#: Finished changes remembered, newest last: a retry of any of their request ids returns the
#: record instead of applying again, and ListChanges pages through them. Measured: ~0.9 KB a
#: record (9 MB for the window); ~13 KB for a 64-knot swap with a 1 KiB reason.
DEDUP_WINDOW = 10_000
#: Changes accepted but not yet applied, at most; beyond, RESOURCE_EXHAUSTED.
MAX_PENDING = 1_000
MAX_REASON_BYTES = 1024
MAX_REQUEST_ID_BYTES = 128
MAX_RUN_ID_BYTES = 128  #: expected_run_id; longer ones cannot match any run id
#: How far ahead of the current step `apply_at_step` may lie (a typo guard, not a policy).
APPLY_HORIZON = 1_000_000_000
#: Pending changes listed in a snapshot, oldest first; ListChanges lists them all. Keeps every
#: GetState/WatchState response far below gRPC's 4 MB default limit.
SNAPSHOT_PENDING = 100
#: The smallest normal float32: a smaller cumulative scale could never be scaled back up.
_MIN_SCALE = 1.1754944e-38
#: The layout of `Controller.export_state()`; `import_state` refuses any other.
STATE_FORMAT = 1


class Phase(enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    STOPPING = "stopping"
    FINISHED = "finished"  #: the run completed: pending changes were cancelled
    FAILED = "failed"  #: training raised: pending changes were cancelled
    #: Shut down before completing (SIGTERM/SIGINT): pending changes stay pending and resume
    #: with the run when it restarts from its checkpoint.
    STOPPED = "stopped"


#: Phases after which this process accepts and applies nothing more.
ENDED_PHASES = frozenset({Phase.FINISHED, Phase.FAILED, Phase.STOPPED})


class ChangeStatus(enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    VALIDATED = "validated"  #: validate_only: checked, never queued
    ABORTED = "aborted"  #: expected_version no longer matched at the step boundary
    CANCELLED = "cancelled"  #: cancelled by a client, or the run ended before it was due
    FAILED = "failed"  #: not applied; `error` says why (a missed apply_at_step, an engine error)


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
    """Replace the active schedule. With RESTART the new schedule is evaluated from its own
    step `start_step` where it applies (origin_step = step - start_step); `scale` is the
    cumulative scale it starts with (None: 1), set in the same change and version."""

    schedule: ScheduleSpec
    origin: Origin = Origin.RESTART
    start_step: int = 0
    scale: float | None = None

    def describe(self) -> str:
        extra = f" start_step={self.start_step}" if self.start_step else ""
        extra += f" scale={self.scale:g}" if self.scale is not None else ""
        return f"swap {self.schedule.describe()} origin={self.origin.value}{extra}"


@dataclass(frozen=True)
class RevertSchedule:
    """lrctl itself puts back a schedule that was in force (the divergence guard undoing a
    change): exactly `state`, origin step and scale included. Never sent by a client."""

    state: ActiveSchedule

    def describe(self) -> str:
        return (f"revert to {self.state.spec.describe()} origin_step={self.state.origin_step} "
                f"scale={self.state.scale:g}")


Action = PinLearningRate | ScaleLearningRate | SwapSchedule | RevertSchedule


@dataclass(frozen=True)
class Boundaries:
    """Where the coming step boundaries fall, so that `apply_at_step` can be exact or refused:
    at `origin + k * spacing` (k >= 0), until the training loop moves them (a new epoch starts
    them again from its first step, which a short last execution may have moved)."""

    origin: int = 0
    spacing: int = 1

    def reaches(self, step: int) -> bool:
        return step >= self.origin and (step - self.origin) % self.spacing == 0

    def around(self, step: int) -> tuple[int, int]:
        """The boundary at or before `step` (the origin, before it) and the first one after."""
        if step < self.origin:
            return self.origin, self.origin
        below = step - (step - self.origin) % self.spacing
        return below, below + self.spacing

    def first_from(self, step: int) -> int:
        """The first boundary at or after `step`."""
        return step if self.reaches(step) else self.around(step)[1]


@dataclass(frozen=True)
class ChangeRequest:
    action: Action
    request_id: str = ""
    expected_version: int | None = None
    apply_at_step: int | None = None
    reason: str = ""
    force: bool = False  #: skip the max_change_factor guardrail (never the bounds)
    #: Fencing: refuse the change unless the run id is this one ("": no check).
    expected_run_id: str = ""
    #: Fencing on the process: refuse unless this process's incarnation id is this one ("": no check).
    expected_incarnation: str = ""
    #: Apply N steps after the first step boundary after acceptance (the boundary where the
    #: training thread first sees the change). Exclusive with apply_at_step.
    apply_after_steps: int | None = None


@dataclass(frozen=True)
class Change:
    """One change's record. Pending records are replaced by their final form when they end."""

    id: int  #: internal identity in submission order, stable across the record's updates
    request: ChangeRequest
    status: ChangeStatus
    requested_step: int
    requested_time: float
    version: int = 0  #: the state version this change produced; 0 unless APPLIED
    applied_step: int | None = None
    learning_rate_after: float | None = None
    schedule_after: ActiveSchedule | None = None
    applied_time: float | None = None  #: when the change ended (applied, aborted, ...)
    current_version: int | None = None  #: for ABORTED: the version that did not match
    error: Exception | None = None  #: for FAILED: why (a domain error the servicer maps to a code); for CANCELLED: the reason given
    #: For VALIDATED with a preview horizon: (step, LR) after the change, and without it.
    preview: tuple[tuple[int, float], ...] = ()
    preview_current: tuple[tuple[int, float], ...] = ()
    #: For apply_after_steps: the step it resolved to at the first boundary that saw it.
    due_step: int | None = None

    @property
    def due_key(self) -> int:
        """The step at which the change is due (0: at the next boundary)."""
        if self.due_step is not None:
            return self.due_step
        return self.request.apply_at_step or 0

    @property
    def description(self) -> str:
        return self.request.action.describe()


@dataclass(frozen=True)
class WorkerState:
    """One worker of a multi-worker job, as of the last exchange with the chief."""

    index: int  #: 0 is the chief
    applied_version: int
    step: int


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
    pending: tuple[Change, ...]  #: the oldest SNAPSHOT_PENDING pending changes
    recent: tuple[Change, ...]
    updated_time: float
    pending_count: int = 0
    guardrails: Guardrails = NO_GUARDRAILS
    seq: int = 0  #: bumped on every publication; lets watchers skip unchanged states
    #: The step and time `metrics` were taken at (None: no metrics). Metrics taken at or before the
    #: last applied change's step are cleared, never shown as if they came after it.
    metrics_step: int | None = None
    metrics_time: float | None = None
    #: The logs of the last finished epoch (`val_*` included), the epoch (0-based), and the
    #: step and time they were taken at. Empty / None: no epoch has finished yet.
    epoch_metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    epoch_metrics_epoch: int | None = None
    epoch_metrics_step: int | None = None
    epoch_metrics_time: float | None = None
    #: Optimizer steps per second over the last 10 s (None: not measured yet).
    steps_per_second: float | None = None
    #: A multi-worker job's workers, in task order; empty for a single worker.
    workers: tuple[WorkerState, ...] = ()
    #: Drawn at every process start (a resume included): fences a decision to one process.
    incarnation: str = ""
    #: Where changes can apply (None: not known, e.g. before training or in a custom loop).
    boundaries: Boundaries | None = None
    #: The step the current epoch began at (None: no epoch has begun).
    epoch_start_step: int | None = None
    #: How many engine evaluations clamped the LR into the guardrails' bounds (engine.py).
    lr_clamp_count: int = 0
    #: Checkpoint writes that failed in this process (lrctl.service.training.checkpoints).
    checkpoint_failures: int = 0
    #: The error of the last checkpoint attempt if it failed; "" after a success or none yet.
    checkpoint_error: str = ""
    #: The step of the newest complete checkpoint written or resumed from; None: none yet.
    checkpoint_step: int | None = None


class ScheduleTarget(Protocol):
    """The engine as the controller sees it. Called from the training thread only."""

    def load(self, state: ActiveSchedule, version: int) -> None: ...
    def read(self) -> tuple[ActiveSchedule, int]: ...


class ChangeLog(Protocol):
    """Where the controller writes each change's transitions before it answers: the
    write-ahead log (`wal.WriteAheadLog`). `append` returns once the records are durable, or
    raises OSError; `seq` is the last record's sequence number."""

    @property
    def seq(self) -> int: ...
    def append(self, records: Sequence[Mapping[str, Any]]) -> int: ...


class Controller:
    """Validates change requests, queues them, and applies them at step boundaries."""

    def __init__(
        self,
        target: ScheduleTarget,
        *,
        run_id: str | None = None,
        optimizer: str = "",
        history_size: int = 100,
        guardrails: Guardrails = NO_GUARDRAILS,
        clock: Callable[[], float] = time.time,
        incarnation: str | None = None,
    ) -> None:
        """`incarnation`: this process's (None: draw one), when it was drawn before the
        controller existed (lrctl-trainer serves before it builds the model)."""
        self._target = target
        self._clock = clock
        self.guardrails = guardrails
        self._rate = RateLimiter(guardrails.max_changes_per_minute)
        # One condition guards everything below. Submitters, readers and the training thread
        # each hold it only briefly (never across engine work); waiters and watchers sleep on it.
        self._cond = threading.Condition()
        # Held across a whole submit or cancel, its write-ahead log append included (outside
        # the condition: an fsync under it would stall the training thread's boundaries). It
        # serializes submitters only, and lets `export_state` see no record half-committed.
        self._submit_lock = threading.Lock()
        #: The write-ahead log (None: none, e.g. no checkpoint folder): every acceptance and
        #: ending is written to it before it is answered.
        self.wal: ChangeLog | None = None
        # Changes a previous process applied after its checkpoint (from the write-ahead log),
        # in (applied_step, version) order: each is loaded again at its step with its version.
        self._replays: list[Change] = []
        self._ids = itertools.count(1)
        self._state, self._version = target.read()  # what the engine holds
        self._pending: dict[int, Change] = {}  # in submission order
        self._due: list[tuple[int, int]] = []  # heap of (due step, id); stale ids are skipped
        self._next_due: int | None = None
        self._applying: set[int] = set()  # taken by the training thread, being applied
        self._finished: collections.OrderedDict[int, Change] = collections.OrderedDict()
        self._by_request_id: dict[str, int] = {}
        self._by_version: dict[int, int] = {}
        self._history: collections.deque[Change] = collections.deque(maxlen=history_size)
        self._waiters: collections.Counter[int] = collections.Counter()
        self._ended: collections.Counter[ChangeStatus] = collections.Counter()  # for metrics
        #: Each is called by the training thread with the seconds each `apply_due` that
        #: finished a change took (the outcomes and the one engine load): metrics hooks.
        self.apply_observers: list[Callable[[float], None]] = []
        #: Each is called by the training thread with every local change attempt (one made in
        #: the trainer's process, e.g. a Keras callback assigning `optimizer.learning_rate`)
        #: and how it ended: its final record, or the error that refused it. A server with a
        #: journal registers one, so local changes are journaled like a client's.
        self.local_observers: list[Callable[[ChangeRequest, Change | Exception], None]] = []
        self._results: dict[int, Change] = {}  # final records of waited-for changes
        # An upper bound on the step at the latest step boundary (exact when the training
        # thread read it). An apply_at_step at or below it may have been passed already.
        self._boundary_step: float = -math.inf
        self._shutting_down = False  # set by shut_down(): every new change gets UNAVAILABLE
        self._changed_step = -1  # the applied_step of the last applied change (-1: none)
        self._epochs_done = 0  # epochs `fit` ran to their end: where a resume starts (Keras's initial_epoch)
        self._throughput = Throughput()
        # A run id given by the caller names the run; a drawn one yields to a checkpoint's.
        self._run_id_given = run_id is not None
        self._snapshot = Snapshot(
            incarnation=incarnation or uuid.uuid4().hex[:12],
            run_id=run_id or uuid.uuid4().hex[:12], phase=Phase.STARTING, step=0, epoch=0,
            learning_rate=math.nan, schedule=self._state, version=self._version, metrics={},
            optimizer=optimizer, pending=(), recent=(), updated_time=clock(), guardrails=guardrails,
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
        pending. One attribute read, no lock."""
        return self._next_due

    def submit(self, request: ChangeRequest, *, validate_only: bool = False,
               preview_steps: int = 0) -> Change:
        """Validate `request` now and queue it for the first step boundary where it is due.

        Returns the record: PENDING (queued), VALIDATED (`validate_only`, with the LR over
        `preview_steps` steps if > 0), or FAILED when its `apply_at_step` may already have
        passed (recorded, never applied late). A retry with a known `request_id` and the same
        payload returns the first request's current record. Raises InvalidArgumentError,
        VersionConflictError, FailedPreconditionError (a guardrail, the phase),
        RequestIdReusedError or ResourceExhaustedError; then nothing was queued.
        """
        _check_request(request)
        if not 0 <= preview_steps <= APPLY_HORIZON:
            raise InvalidArgumentError("preview_steps", f"must be in [0, {APPLY_HORIZON}]", preview_steps)
        if validate_only:
            return self._decide(request, validate_only=True, preview_steps=preview_steps)[0]
        with self._submit_lock:
            change, new = self._decide(request, validate_only=False, preview_steps=0)
            if not new:
                return change
            try:  # durable before it is answered (or queued: the training thread may apply it)
                self._log([change])
            except OSError as e:
                raise self._unwritable(e, "it was not queued") from e
            with self._cond:
                if request.request_id:
                    self._by_request_id[request.request_id] = change.id
                ended = self._snapshot.phase in (Phase.FINISHED, Phase.FAILED)
                if ended and change.status is ChangeStatus.PENDING:
                    # The run ended while the record was written: cancelled, like the rest.
                    change = dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                 applied_time=self._clock())
                if change.status is not ChangeStatus.PENDING:
                    self._finish(change)
                    self._republish(history=True)
                else:
                    self._pending[change.id] = change
                    heapq.heappush(self._due, (change.due_key, change.id))
                    self._republish(pending=True)
            if change.status is ChangeStatus.CANCELLED:
                self._log_after([change])
            return change

    def _decide(self, request: ChangeRequest, *, validate_only: bool,
                preview_steps: int) -> tuple[Change, bool]:
        """`submit`'s checks under the condition: the record to answer with, and whether it is
        new (PENDING, or FAILED for a missed step: to log and commit) or an answer already."""
        with self._cond:
            # A retry is answered from the ledger before any fence: after a resume the fences
            # may have moved on, and the change they guarded was already decided.
            if request.request_id and not validate_only:
                known = self._by_request_id.get(request.request_id)
                if known is not None and (record := self._lookup(known)) is not None:
                    if _unfenced(record.request) != _unfenced(request):
                        raise RequestIdReusedError(request.request_id)
                    return record, False
            self._check_fences(request.expected_run_id, request.expected_incarnation)
            snap = self._snapshot
            if self._shutting_down or snap.phase in (Phase.STOPPING, Phase.STOPPED):
                raise UnavailableError("the trainer is shutting down; it accepts no more changes. "
                                       "Retry with the same request_id once it has restarted")
            if snap.phase in ENDED_PHASES:
                raise FailedPreconditionError(f"the run is {snap.phase.value}; it accepts no more changes")
            # While replays are outstanding, a new change meets the state after the last one.
            replayed = self._replays[-1] if self._replays else None
            version = replayed.version if replayed else self._version
            if request.expected_version is not None and request.expected_version != version:
                raise VersionConflictError(request.expected_version, version)
            at = request.apply_at_step
            if at is not None and at > snap.step + APPLY_HORIZON:
                raise InvalidArgumentError(
                    "apply_at_step", f"must be at most {APPLY_HORIZON} steps ahead of the current "
                    f"step {snap.step}", at)
            floor = (replayed.applied_step or 0) if replayed else 0
            start = max(snap.step, at or 0, floor) + (request.apply_after_steps or 0)
            before = self._state_before(start, snap.step)
            after, lr_after = _check_change(request.action, before, start, self.guardrails)
            if not request.force:
                self.guardrails.check_factor(forms.learning_rate(before, start), lr_after, start)
            missed = at is not None and (at < snap.step or at <= self._boundary_step)
            if at is not None and missed and validate_only:
                raise self._missed_error(at, snap.step)
            if at is not None and not missed and replayed is not None and at <= floor:
                raise FailedPreconditionError(
                    f"apply_at_step={at}: the run is repeating steps after a restart and re-applies "
                    f"the changes acknowledged before it until step {floor}; a new change can apply "
                    f"only after that step", field="apply_at_step")
            if at is not None and not missed and snap.boundaries and not snap.boundaries.reaches(at):
                below, above = snap.boundaries.around(at)
                raise InvalidArgumentError(
                    "apply_at_step", f"must be a step where a step boundary falls, or the change "
                    f"would land late: boundaries fall every {snap.boundaries.spacing} steps from step "
                    f"{snap.boundaries.origin} (steps_per_execution or sync_every); the nearest are "
                    f"{below} and {above}", at)
            if not validate_only and not missed and len(self._pending) >= MAX_PENDING:
                raise ResourceExhaustedError(
                    f"{MAX_PENDING} changes are pending already; wait for some to apply or cancel them")
            if not validate_only:
                self._rate.take()
            change = Change(
                id=next(self._ids), request=request,
                status=ChangeStatus.VALIDATED if validate_only else ChangeStatus.PENDING,
                requested_step=snap.step, requested_time=self._clock(),
            )
            if validate_only:
                self._ended[ChangeStatus.VALIDATED] += 1
                if not preview_steps:
                    return change, False
                return dataclasses.replace(
                    change, preview=tuple(guardrails.sample(after, start, preview_steps)),
                    preview_current=tuple(guardrails.sample(before, start, preview_steps))), False
            if at is not None and missed:
                change = dataclasses.replace(change, status=ChangeStatus.FAILED, applied_time=change.requested_time,
                                             error=self._missed_error(at, snap.step))
            return change, True

    @property
    def shutting_down(self) -> bool:
        """Whether `shut_down` was called: the run ends STOPPED, not FINISHED."""
        return self._shutting_down

    def shut_down(self) -> None:
        """The process is going away (SIGTERM): from now on `submit` raises UnavailableError.
        One attribute store and no lock, so a signal handler may call it."""
        self._shutting_down = True

    def export_state(self, step: int | None = None) -> dict[str, Any]:
        """The control state as JSON-able data, for a checkpoint taken at a step boundary (on
        the training thread, so nothing is being applied) at `step` (default: the last step
        published, which may lag the boundary): the schedule and version in force,
        the pending changes, and every remembered finished record (the dedup window, in the
        order they finished; the history is its newest `history_size`). `import_state` in a
        new process puts it back: a retry of any of these request ids returns its record.
        "epoch" is the number of epochs completed (`complete_epoch`), which is what `fit`'s
        `initial_epoch` takes to resume: an epoch cut short runs again from its start, as
        with Keras's BackupAndRestore (the input pipeline starts over anyway).
        `wal_seq`: the last write-ahead log record it includes (the submit lock keeps out a
        record written but not yet committed); `replay`: the ids of changes still to re-apply."""
        with self._submit_lock, self._cond:
            snap = self._snapshot
            history_ids = [c.id for c in self._history]
            finished = list(self._finished.values())
            # History records older than the dedup window (only with history_size > DEDUP_WINDOW).
            known = set(self._finished)
            older = [c for c in self._history if c.id not in known]
            return {
                "format": STATE_FORMAT, "run_id": snap.run_id, "step": snap.step if step is None else step,
                "epoch": self._epochs_done,
                "version": self._version, "schedule": _schedule_json(self._state),
                "next_id": max([0, *self._pending, *self._finished, *history_ids]) + 1,
                "pending": [_change_json(c) for c in self._pending.values()],
                "finished": [_change_json(c) for c in [*older, *finished]],
                "history": history_ids,
                "wal_seq": self.wal.seq if self.wal is not None else 0,
                "replay": [c.id for c in self._replays],
            }

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Put back what `export_state` returned, before training starts (training thread).
        The engine's variables must already hold the same schedule and version (restored with
        the optimizer from the same checkpoint); if they do not, the next `resync` treats the
        difference as a restore, so the version still never goes back. Raises ValueError for
        data of another format."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"control state format {data.get('format')!r} is not {STATE_FORMAT}")
        pending = [_change_from_json(c) for c in data["pending"]]
        finished = [_change_from_json(c) for c in data["finished"]]
        by_id = {c.id: c for c in finished}
        history = [by_id[i] for i in data["history"] if i in by_id]
        with self._cond:
            self._state, self._version = _schedule_from_json(data["schedule"]), int(data["version"])
            self._ids = itertools.count(max(int(data["next_id"]), 1))
            self._pending = {c.id: c for c in pending}
            self._due = [(c.due_key, c.id) for c in pending]
            heapq.heapify(self._due)
            self._finished.clear()
            self._by_request_id.clear()
            self._by_version.clear()
            for change in finished[-DEDUP_WINDOW:]:
                self._finished[change.id] = change
                if change.version:
                    self._by_version[change.version] = change.id
            for change in [*finished[-DEDUP_WINDOW:], *pending]:
                if change.request.request_id:
                    self._by_request_id[change.request.request_id] = change.id
            self._history.clear()
            self._history.extend(history)
            self._replays = sorted((by_id[i] for i in data.get("replay", ()) if i in by_id),
                                   key=lambda c: (c.applied_step or 0, c.version))
            step = int(data["step"])
            self._epochs_done = int(data.get("epoch", 0))
            self._boundary_step = max(self._boundary_step, step)
            # A resumed run is the same run: it keeps its id (unless the caller named one).
            run_id = self._snapshot.run_id if self._run_id_given else str(data.get("run_id") or
                                                                          self._snapshot.run_id)
            self._snapshot = dataclasses.replace(
                self._snapshot, run_id=run_id, step=step, epoch=int(data.get("epoch", 0)), schedule=self._state,
                version=self._version, learning_rate=forms.learning_rate(self._state, step),
                updated_time=self._clock())
            self._republish(pending=True, history=True)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Put back what the write-ahead log recorded after the state `import_state` restored
        (training thread, before training): the records with a higher seq than its `wal_seq`,
        in seq order; a change's last record wins. Accepted: pending again. Applied: kept in
        the ledger as it was answered, and loaded again with its version at the first boundary
        at or after its step (training repeats those steps); pending changes and new ones wait
        until then. Cancelled, aborted, failed: in the ledger. Ids and versions continue above
        every one in the log. Returns how many changes were put back."""
        last: dict[int, Change] = {}
        run_id = ""
        for record in records:
            change = _change_from_json(record["change"])
            last[change.id] = change
            run_id = str(record.get("run_id") or run_id)
        if not last:
            return 0
        with self._cond:
            count = 0
            for change in sorted(last.values(), key=lambda c: c.id):
                known = self._lookup(change.id)
                if known is not None and known.status is not ChangeStatus.PENDING:
                    continue  # its ending is in the checkpoint already
                count += 1
                if change.request.request_id:
                    self._by_request_id[change.request.request_id] = change.id
                if change.status is ChangeStatus.PENDING:
                    if known is None:
                        self._pending[change.id] = change
                        heapq.heappush(self._due, (change.due_key, change.id))
                    continue
                self._pending.pop(change.id, None)
                self._finish(change, replayed=True)
                if change.status is ChangeStatus.APPLIED:
                    self._replays.append(change)
            self._replays.sort(key=lambda c: (c.applied_step or 0, c.version))
            self._ids = itertools.count(max(next(self._ids), max(last) + 1))
            # Clients see the newest version acknowledged, while training repeats its steps.
            self._snapshot = dataclasses.replace(self._snapshot, version=self._top_version())
            if run_id and not self._run_id_given:  # no checkpoint yet: the log names the run
                self._snapshot = dataclasses.replace(self._snapshot, run_id=run_id)
            self._republish(pending=True, history=True)
        if self._replays:
            first, final = self._replays[0], self._replays[-1]
            logger.info("replaying %d change(s) applied before the restart: from step %s to step %s "
                        "(v%d to v%d); other changes wait until then", len(self._replays),
                        first.applied_step, final.applied_step, first.version, final.version)
        return count

    def cancel(self, *, request_id: str = "", version: int | None = None,
               expected_run_id: str = "", expected_incarnation: str = "", reason: str = "") -> Change:
        """Cancel a pending change, named by its request_id or (once applied) its version.

        Returns the CANCELLED record (again, if it was cancelled already). Raises NotFoundError
        for an unknown change and FailedPreconditionError for one that has ended otherwise or
        is being applied at this very boundary; RunIdMismatchError when `expected_run_id` is
        set and is not this run's id.
        """
        if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgumentError("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes",
                                       f"{len(request_id.encode())} bytes")
        _check_id_size(expected_run_id)
        _check_id_size(expected_incarnation, "expected_incarnation")
        with self._submit_lock:
            with self._cond:
                self._check_fences(expected_run_id, expected_incarnation)
                if request_id:
                    change_id = self._by_request_id.get(request_id)
                    name = f"request_id {request_id!r}"
                else:
                    change_id = self._by_version.get(version or 0)
                    name = f"version {version}"
                record = None if change_id is None else self._lookup(change_id)
                if record is None:
                    raise NotFoundError(f"no change with {name} is known (the last {DEDUP_WINDOW} are)")
                if record.status is ChangeStatus.CANCELLED:
                    return record
                if record.status is not ChangeStatus.PENDING:
                    raise FailedPreconditionError(
                        f"the change with {name} is already {record.status.value}; nothing to cancel")
                if record.id in self._applying:
                    raise FailedPreconditionError(f"the change with {name} is being applied right now")
                # Out of the queue while its record is written: the training thread must not
                # apply what is being cancelled (its heap entry is skipped, being stale).
                del self._pending[record.id]
                final = dataclasses.replace(record, status=ChangeStatus.CANCELLED, applied_time=self._clock(),
                                            error=FailedPreconditionError(f"cancelled: {reason}") if reason else None)
            try:
                self._log([final])
            except OSError as e:
                with self._cond:
                    self._pending[record.id] = record
                    heapq.heappush(self._due, (record.due_key, record.id))
                    self._republish(pending=True)
                raise self._unwritable(e, "it stays pending") from e
            with self._cond:
                self._finish(final)
                self._republish(pending=True, history=True)
            return final

    def list_changes(self, page_size: int, before_id: int | None = None) -> tuple[list[Change], int | None]:
        """Pending and remembered finished changes, newest (by submission) first.

        Returns one page and the id to continue before, or None on the last page.
        """
        with self._cond:
            ids = sorted(itertools.chain(self._pending, self._finished), reverse=True)
            if before_id is not None:
                ids = [i for i in ids if i < before_id]
            page = [r for i in ids[:page_size] if (r := self._lookup(i)) is not None]
            return page, (ids[page_size - 1] if len(ids) > page_size else None)

    def wait(self, change: Change, timeout: float | None) -> Change:
        """Block until `change` leaves PENDING; return its final record.

        Raises WaitTimeoutError when `timeout` (seconds; None waits forever) runs out first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiters[change.id] += 1
            try:
                while True:
                    record = self._results.get(change.id) or self._lookup(change.id) or change
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
                    self._cond.wait(remaining)
            finally:
                self._waiters[change.id] -= 1
                if not self._waiters[change.id]:
                    del self._waiters[change.id]
                    self._results.pop(change.id, None)

    def updates(self, min_interval: float, is_active: Callable[[], bool],
                poll: float = 0.5, *, every_steps: int = 0, on_epoch: bool = False,
                changes_only: bool = False) -> Iterator[Snapshot]:
        """Snapshots for a watcher: the current one at once, then the latest one at most every
        `min_interval` while training advances, and at once after each applied change or phase
        change. A slow consumer skips intermediate states; it never holds up the trainer.
        `is_active` is polled every `poll` seconds so that a cancelled watcher is let go.
        Triggers: `every_steps` (> 0) sends at once when the step is that far past the last
        one sent, `on_epoch` when the epoch changes; `changes_only` drops the time-based
        updates (the triggers, changes and phase changes still send)."""
        sent: Snapshot | None = None
        sent_at = -math.inf
        while is_active():
            with self._cond:
                snap = self._snapshot
                urgent = sent is None or snap.version != sent.version or snap.phase != sent.phase
                if sent is not None and not urgent:
                    urgent = (on_epoch and snap.epoch != sent.epoch) or (
                        every_steps > 0 and snap.step - sent.step >= every_steps)
                since = time.monotonic() - sent_at
                if not urgent and (changes_only or sent is None or snap.seq == sent.seq
                                   or since < min_interval):
                    idle = sent is not None and (changes_only or snap.seq == sent.seq)
                    self._cond.wait(poll if idle else min(poll, max(min_interval - since, 0.0)))
                    continue
            sent, sent_at = snap, time.monotonic()
            yield snap
            if snap.phase in ENDED_PHASES:
                return

    # -- training thread -------------------------------------------------------------------
    def at_boundary(self, step_bound: float) -> bool:
        """A step boundary, where at most `step_bound` steps have completed (an upper bound
        kept without reading the step). Returns whether a pending change may be due."""
        with self._cond:
            self._boundary_step = step_bound
            return self._next_due is not None and self._next_due <= step_bound

    def apply_due(self, step: int) -> list[Change]:
        """Apply, in submission order, every pending change whose `apply_at_step` <= `step`.

        Called by the training thread at a step boundary: `step` steps have completed and
        none is running, so the engine's variables can be assigned safely. The outcome of
        each change is computed in pure Python; the engine is loaded once, outside the lock.
        """
        started = time.perf_counter()
        with self._cond:
            self._boundary_step = step
            replays = []
            while self._replays and (self._replays[0].applied_step or 0) <= step:
                replays.append(self._replays.pop(0))
            due_ids = []
            resolved = False
            while not self._replays and self._due and self._due[0][0] <= step:
                _, change_id = heapq.heappop(self._due)
                pending = self._pending.get(change_id)
                if pending is None:
                    continue
                after = pending.request.apply_after_steps
                if after and pending.due_step is None:
                    # The first boundary that sees this change: it is due `after` steps on, at
                    # the first step a boundary reaches.
                    grid = self._snapshot.boundaries
                    due_step = grid.first_from(step + after) if grid else step + after
                    self._pending[change_id] = dataclasses.replace(pending, due_step=due_step)
                    heapq.heappush(self._due, (due_step, change_id))
                    resolved = True
                    continue
                due_ids.append(change_id)
            if not due_ids and not replays:
                if resolved:
                    self._republish(pending=True)
                return []
            due = [self._pending[i] for i in sorted(due_ids)]
            self._applying.update(due_ids)
            base_state, base_version = self._state, self._version

        # Replays first, as they came in the run that answered them: their state and version.
        replayed_state, replayed_version = base_state, base_version
        for change in replays:
            assert change.schedule_after is not None
            replayed_state, replayed_version = change.schedule_after, change.version
            logger.info("v%d step %d: re-applied as before the restart (%s)", change.version, step,
                        change.description)
            if change.applied_step != step:
                logger.warning("v%d was applied at step %s before the restart; the first boundary "
                               "at or after it is step %d: re-applied there", change.version,
                               change.applied_step, step)
        finals, state, version = _outcomes(due, replayed_state, replayed_version, step, self._clock,
                                           self.guardrails)
        try:  # each ending durable before the engine makes it true and anyone is told
            self._log(finals)
        except OSError as e:
            logger.error("step %d: the write-ahead log refused the records of %d due change(s) (%s); "
                         "they stay pending and are tried again at the next boundary", step,
                         len(finals), e)
            with self._cond:
                self._applying.difference_update(due_ids)
                for change_id in due_ids:
                    heapq.heappush(self._due, (self._pending[change_id].due_key, change_id))
            finals, state, version = [], replayed_state, replayed_version
        if (state, version) != (base_state, base_version):
            try:
                self._target.load(state, version)
            except Exception as e:  # noqa: BLE001 -- any engine failure fails the changes, not training
                error = ApplyError(f"the engine could not load the new schedule: {e!r}; nothing changed")
                corrected = [dataclasses.replace(f, status=ChangeStatus.FAILED, version=0, applied_step=None,
                                                 learning_rate_after=None, schedule_after=None, error=error)
                             for f in finals if f.status is ChangeStatus.APPLIED]
                failed = {f.id: f for f in corrected}
                finals = [failed.get(f.id, f) for f in finals]
                state, version = base_state, base_version
                if replays:
                    logger.error("step %d: the replays of v%s could not be loaded: %r", step,
                                 ", v".join(str(c.version) for c in replays), e)
                try:
                    self._log(corrected)
                except OSError as log_error:
                    logger.error("the write-ahead log refused the FAILED records of %d change(s): %s",
                                 len(corrected), log_error)

        with self._cond:
            self._state, self._version = state, version
            for final in finals:
                del self._pending[final.id]
                self._applying.discard(final.id)
                self._finish(final)
            lr = self._snapshot.learning_rate
            if version != base_version:
                for change in replays:
                    self._changed_step = max(self._changed_step, step)
                    lr = change.learning_rate_after if change.learning_rate_after is not None else lr
            for final in finals:
                lr = final.learning_rate_after if final.learning_rate_after is not None else lr
            self._snapshot = dataclasses.replace(
                self._snapshot, step=step, schedule=state, version=self._top_version(), learning_rate=lr,
                updated_time=self._clock(),
            )
            self._republish(pending=True, history=True)
        for observe in self.apply_observers:
            observe(time.perf_counter() - started)
        return finals

    def publish(self, *, step: int, learning_rate: float, metrics: Mapping[str, float] | None = None,
                epoch: int | None = None, metrics_step: int | None = None,
                metrics_time: float | None = None, lr_clamp_count: int | None = None) -> None:
        """Record the training thread's view at a step boundary, for readers and watchers.

        `metrics` were taken at `metrics_step` (default: `step`) and `metrics_time` (default:
        now). The throughput is measured over the last `throughput.WINDOW` seconds of publications."""
        with self._cond:
            # An exact step tightens the bound left by `at_boundary` at this same boundary; it
            # does not open a new one (a change for this step may still apply at the next).
            self._boundary_step = min(self._boundary_step, step)
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
            self._snapshot = dataclasses.replace(
                snap, step=step, learning_rate=learning_rate,
                epoch=snap.epoch if epoch is None else epoch, updated_time=now, **changes,
            )
            self._republish()

    def publish_epoch(self, *, epoch: int, metrics: Mapping[str, float], step: int) -> None:
        """Record an epoch's end-of-epoch logs (`val_*` included), taken at `step`."""
        with self._cond:
            now = self._clock()
            self._snapshot = dataclasses.replace(
                self._snapshot, epoch_metrics=dict(metrics), epoch_metrics_epoch=epoch,
                epoch_metrics_step=step, epoch_metrics_time=now, updated_time=now)
            self._republish()

    def ended_counts(self) -> dict[ChangeStatus, int]:
        """How many changes ended with each status since this controller started (exact)."""
        with self._cond:
            return dict(self._ended)

    @property
    def engine_state(self) -> tuple[ActiveSchedule, int]:
        """What the controller last loaded into (or read from) the engine."""
        return self._state, self._version

    def restored(self, state: ActiveSchedule, version: int, *, step: int) -> int:
        """The engine's variables were restored (from a checkpoint) to `state` at `version`,
        at step boundary `step`.

        Later changes build on `state`. The version never decreases: a restore to an older
        version becomes a new version, which the caller writes back to the engine. The version
        in force gets a record (an APPLIED change, action RevertSchedule, reason "restored"),
        so every version the state reports is in the ledger. Returns the version now in force.
        """
        with self._cond:
            if (state, version) == (self._state, self._version):
                return self._version
            saved = version
            if version <= self._top_version():
                version = self._top_version() + 1
            now = self._clock()
            change = Change(
                id=next(self._ids), status=ChangeStatus.APPLIED, requested_step=step,
                request=ChangeRequest(RevertSchedule(state), reason=f"restored: a checkpoint brought "
                                      f"back the schedule of its version {saved}"),
                requested_time=now, version=version, applied_step=step,
                learning_rate_after=forms.learning_rate(state, step), schedule_after=state,
                applied_time=now)
        self._log_after([change])  # the restore has happened: a refused record is only reported
        with self._cond:
            self._state, self._version = state, version
            self._finish(change)
            self._snapshot = dataclasses.replace(self._snapshot, schedule=state, version=version)
            self._republish(history=True)
            return version

    def follow(self, state: ActiveSchedule, version: int) -> None:
        """A follower worker loaded the chief's `state` at `version`: take both as they are
        (the chief alone numbers versions, so a follower never renumbers one)."""
        with self._cond:
            self._state, self._version = state, version
            self._snapshot = dataclasses.replace(self._snapshot, schedule=state, version=version)
            self._republish()

    def set_boundaries(self, boundaries: Boundaries | None, *, epoch_start_step: int | None = None) -> None:
        """Where the coming step boundaries fall (training thread, e.g. at an epoch's start),
        and the step the current epoch began at. A pending `apply_at_step` that the new
        boundaries skip ends FAILED at the first boundary past it, never applied late."""
        with self._cond:
            changes: dict[str, Any] = {"boundaries": boundaries}
            if epoch_start_step is not None:
                changes["epoch_start_step"] = epoch_start_step
            self._snapshot = dataclasses.replace(self._snapshot, **changes)
            self._republish()

    def complete_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (0-based) ran all its steps (training thread): a resume from a
        checkpoint taken from now on starts at the next one."""
        with self._cond:
            self._epochs_done = epoch + 1

    @property
    def epochs_done(self) -> int:
        """Epochs completed, counting those before a resume: `fit`'s `initial_epoch`."""
        return self._epochs_done

    def set_workers(self, workers: tuple[WorkerState, ...]) -> None:
        """Record what the last exchange said about each worker of a multi-worker job."""
        with self._cond:
            if workers != self._snapshot.workers:
                self._snapshot = dataclasses.replace(self._snapshot, workers=workers)
                self._republish()

    def set_phase(self, phase: Phase) -> None:
        """Move the run to `phase`. Completing or failing cancels every pending change;
        STOPPED (a shutdown) keeps them pending, for the checkpoint and the restart."""
        cancelled = []
        with self._cond:
            if phase in (Phase.FINISHED, Phase.FAILED):
                for change in list(self._pending.values()):
                    if change.id not in self._applying:
                        del self._pending[change.id]
                        cancelled.append(dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                             applied_time=self._clock()))
                        self._finish(cancelled[-1])
            self._snapshot = dataclasses.replace(self._snapshot, phase=phase, updated_time=self._clock())
            self._republish(pending=True, history=True)
        self._log_after(cancelled)

    def apply_automatic(self, state: ActiveSchedule, *, step: int, reason: str) -> Change:
        """lrctl itself puts `state` in force at this step boundary (the divergence guard
        undoing a change). It becomes a new version (never a lower one) and an APPLIED change,
        a swap to `state`'s schedule with `reason`, so history, ListChanges, waiters and
        watchers see it like a client's change. `state` is loaded exactly, origin step and
        scale included. No guardrail or rate limit applies: it restores a schedule that was
        in force. Raises what the engine or the write-ahead log raises; then nothing is in force."""
        lr = forms.learning_rate(state, step)
        with self._cond:
            version = self._top_version() + 1  # only the training thread moves it: no race below
            now = self._clock()
            change = Change(
                id=next(self._ids), status=ChangeStatus.APPLIED, requested_step=step,
                request=ChangeRequest(RevertSchedule(state), reason=reason),
                requested_time=now, version=version, applied_step=step,
                learning_rate_after=lr, schedule_after=state, applied_time=now,
            )
        self._log([change])  # durable first, like every applied change
        self._target.load(state, version)  # no lock across engine work
        with self._cond:
            self._state, self._version = state, version
            self._finish(change)
            self._snapshot = dataclasses.replace(self._snapshot, step=step, schedule=state,
                                                 version=version, learning_rate=lr, updated_time=now)
            self._republish(history=True)
        return change

    # -- the write-ahead log (no lock held: an fsync) ----------------------------------------
    def _log(self, changes: Sequence[Change]) -> None:
        """Write `changes`' records to the write-ahead log and wait until they are durable.
        Raises OSError if the disk refuses."""
        if self.wal is not None and changes:
            run_id = self._snapshot.run_id
            self.wal.append([{"run_id": run_id, "change": _change_json(c)} for c in changes])

    def _log_after(self, changes: Sequence[Change]) -> None:
        """Log endings that are already decided (the run ended): a refusal is only reported,
        and a crash before them brings the changes back pending, which is safe."""
        try:
            self._log(changes)
        except OSError as e:
            logger.error("the write-ahead log refused the records of %d change(s) already decided: %s",
                         len(changes), e)

    @staticmethod
    def _unwritable(error: OSError, outcome: str) -> UnavailableError:
        return UnavailableError(
            f"the change could not be written to the write-ahead log ({error.strerror or error}); "
            f"{outcome}. Retry with the same request_id once the disk accepts writes")

    # -- internals (lock held) ---------------------------------------------------------------
    def _check_fences(self, expected_run_id: str, expected_incarnation: str) -> None:
        snap = self._snapshot
        if expected_run_id and expected_run_id != snap.run_id:
            raise RunIdMismatchError(expected_run_id, snap.run_id)
        if expected_incarnation and expected_incarnation != snap.incarnation:
            raise IncarnationMismatchError(expected_incarnation, snap.incarnation)

    def _top_version(self) -> int:
        """The newest version handed out: the engine's, or, while changes acknowledged before a
        restart are still to be re-applied, the last of those (never handed out again)."""
        if self._replays:
            return max(self._version, self._replays[-1].version)
        return self._version

    def _state_before(self, step: int, current_step: int) -> ActiveSchedule:
        """The state a change due at `step` will meet: the engine's (or, while replays are
        outstanding, the last replay's), with every pending change due before it (or at the
        same step: submitted earlier) applied in due order."""
        due = sorted((_expected_due(c, current_step), c.id) for c in self._pending.values())
        state = self._replays[-1].schedule_after or self._state if self._replays else self._state
        for due_step, change_id in due:
            if due_step > step:
                break
            state = _next_state(state, self._pending[change_id].request.action, due_step)
        return state

    @staticmethod
    def _missed_error(apply_at_step: int, step: int) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"apply_at_step={apply_at_step} may already have passed: the run is at step {step} "
            "and changes apply only at step boundaries; the change was not applied",
            field="apply_at_step",
        )

    def _lookup(self, change_id: int) -> Change | None:
        return self._pending.get(change_id) or self._finished.get(change_id)

    def _finish(self, change: Change, *, replayed: bool = False) -> None:
        """Record `change`'s end (`replayed`: put back from the write-ahead log, not counted,
        and not in force yet)."""
        self._finished[change.id] = change
        if change.status is ChangeStatus.APPLIED and change.applied_step is not None and not replayed:
            self._changed_step = max(self._changed_step, change.applied_step)
        if change.version:
            self._by_version[change.version] = change.id
        if change.id in self._waiters:
            self._results[change.id] = change
        while len(self._finished) > DEDUP_WINDOW:
            _, old = self._finished.popitem(last=False)
            if self._by_request_id.get(old.request.request_id) == old.id:
                del self._by_request_id[old.request.request_id]
            self._by_version.pop(old.version, None)
        self._history.append(change)
        if not replayed:
            self._ended[change.status] += 1

    def _republish(self, *, pending: bool = False, history: bool = False) -> None:
        changes: dict[str, Any] = {}
        if pending:
            while self._due and self._due[0][1] not in self._pending:
                heapq.heappop(self._due)  # cancelled or finished: drop lazily
            if len(self._due) > 2 * len(self._pending) + 64:
                self._due = [(c.due_key, i) for i, c in self._pending.items()
                             if i not in self._applying]
                heapq.heapify(self._due)
            # Replays come first: other changes wait until the last one is in force.
            self._next_due = (self._replays[0].applied_step or 0) if self._replays else \
                self._due[0][0] if self._due else None
            changes.update(pending=tuple(itertools.islice(self._pending.values(), SNAPSHOT_PENDING)),
                           pending_count=len(self._pending))
        if history:
            changes["recent"] = tuple(self._history)
        taken = self._snapshot.metrics_step
        if taken is not None and taken <= self._changed_step:
            # Taken before the last change took effect (at its step or earlier): never present
            # them as if they came after it.
            changes.update(metrics={}, metrics_step=None, metrics_time=None)
        self._snapshot = dataclasses.replace(self._snapshot, seq=self._snapshot.seq + 1, **changes)
        self._cond.notify_all()

    def checkpointed(self, step: int | None, error: str = "") -> None:
        """Record a checkpoint attempt: `step` of a complete one (written or resumed from), or
        None and the `error` of a write that failed (counted)."""
        with self._cond:
            snap = self._snapshot
            if step is not None:
                self._snapshot = dataclasses.replace(snap, checkpoint_step=step, checkpoint_error="")
            else:
                self._snapshot = dataclasses.replace(
                    snap, checkpoint_failures=snap.checkpoint_failures + 1, checkpoint_error=error)
            self._republish()


def _check_request(request: ChangeRequest) -> None:
    """Rules that need no state: values, sizes and step ranges."""
    action = request.action
    if isinstance(action, PinLearningRate):
        check_number("learning_rate", action.learning_rate, minimum=0)
    elif isinstance(action, ScaleLearningRate):
        check_number("scale", action.factor, minimum=0, inclusive=False)
    # A SwapSchedule's spec validated itself when it was built.
    if len(request.reason.encode()) > MAX_REASON_BYTES:
        raise InvalidArgumentError("reason", f"must be at most {MAX_REASON_BYTES} bytes",
                                   f"{len(request.reason.encode())} bytes")
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgumentError("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes",
                                   f"{len(request.request_id.encode())} bytes")
    if request.apply_at_step is not None and request.apply_at_step < 0:
        raise InvalidArgumentError("apply_at_step", "must be >= 0", request.apply_at_step)
    after = request.apply_after_steps
    if after is not None:
        if request.apply_at_step is not None:
            raise InvalidArgumentError("apply_after_steps", "must not be set together with "
                                       "`apply_at_step`", after)
        if not 0 <= after <= APPLY_HORIZON:
            raise InvalidArgumentError("apply_after_steps", f"must be in [0, {APPLY_HORIZON}]", after)
    _check_id_size(request.expected_run_id)
    _check_id_size(request.expected_incarnation, "expected_incarnation")
    if isinstance(action, SwapSchedule):
        if not 0 <= action.start_step <= APPLY_HORIZON:
            raise InvalidArgumentError("schedule_start_step", f"must be in [0, {APPLY_HORIZON}]",
                                       action.start_step)
        if action.start_step and action.origin is Origin.GLOBAL:
            raise InvalidArgumentError("schedule_start_step", "must be 0 with STEP_ORIGIN_GLOBAL",
                                       action.start_step)
        if action.scale is not None:
            check_number("scale", action.scale, minimum=0, inclusive=False)


def _check_id_size(value: str, field: str = "expected_run_id") -> None:
    """A fence id (run id, incarnation) longer than any this server hands out: refused."""
    if len(value.encode()) > MAX_RUN_ID_BYTES:
        raise InvalidArgumentError(field, f"must be at most {MAX_RUN_ID_BYTES} bytes",
                                   f"{len(value.encode())} bytes")


def _unfenced(request: ChangeRequest) -> ChangeRequest:
    """`request` without its fences: a retry is the same request whatever they say now."""
    return dataclasses.replace(request, expected_run_id="", expected_incarnation="")


def _schedule_json(state: ActiveSchedule) -> dict[str, Any]:
    return {"class_name": state.spec.keras_name, "config": state.spec.to_config(),
            "origin": state.origin.value, "origin_step": state.origin_step, "scale": state.scale}


def _schedule_from_json(data: Mapping[str, Any]) -> ActiveSchedule:
    return ActiveSchedule(spec_from_config(data["class_name"], data["config"]), Origin(data["origin"]),
                          int(data["origin_step"]), float(data["scale"]))


def _action_json(action: Action) -> dict[str, Any]:
    if isinstance(action, RevertSchedule):
        return {"revert": _schedule_json(action.state)}
    if isinstance(action, PinLearningRate):
        return {"pin": action.learning_rate}
    if isinstance(action, ScaleLearningRate):
        return {"scale": action.factor}
    return {"swap": {"class_name": action.schedule.keras_name, "config": action.schedule.to_config(),
                     "origin": action.origin.value, "start_step": action.start_step, "scale": action.scale}}


def _action_from_json(data: Mapping[str, Any]) -> Action:
    if "revert" in data:
        return RevertSchedule(_schedule_from_json(data["revert"]))
    if "pin" in data:
        return PinLearningRate(float(data["pin"]))
    if "scale" in data:
        return ScaleLearningRate(float(data["scale"]))
    swap = data["swap"]
    scale = swap.get("scale")
    return SwapSchedule(spec_from_config(swap["class_name"], swap["config"]), Origin(swap["origin"]),
                        int(swap.get("start_step", 0)), None if scale is None else float(scale))


def _error_json(error: Exception | None) -> dict[str, Any] | None:
    if error is None:
        return None
    if isinstance(error, VersionConflictError):
        return {"type": type(error).__name__, "message": str(error), "expected": error.expected,
                "current": error.current, "step": error.step}
    return {"type": type(error).__name__, "message": str(error),
            "field": getattr(error, "field", ""), "kind": getattr(error, "kind", "")}


def _error_from_json(data: Mapping[str, Any] | None) -> Exception | None:
    """A FAILED record's error: ApplyError stays one; any other is a FailedPreconditionError
    (the only other kind a FAILED record holds), with its field and kind."""
    if data is None:
        return None
    if data["type"] == ApplyError.__name__:
        return ApplyError(data["message"])
    if data["type"] == VersionConflictError.__name__:
        return VersionConflictError(int(data["expected"]), int(data["current"]), step=data.get("step"))
    return FailedPreconditionError(data["message"], field=data.get("field", ""), kind=data.get("kind", ""))


def _change_json(change: Change) -> dict[str, Any]:
    request = change.request
    return {
        "id": change.id, "status": change.status.value, "requested_step": change.requested_step,
        "requested_time": change.requested_time, "version": change.version,
        "applied_step": change.applied_step, "learning_rate_after": change.learning_rate_after,
        "schedule_after": None if change.schedule_after is None else _schedule_json(change.schedule_after),
        "applied_time": change.applied_time, "current_version": change.current_version,
        "error": _error_json(change.error), "due_step": change.due_step,
        "request": {"action": _action_json(request.action), "request_id": request.request_id,
                    "expected_version": request.expected_version, "apply_at_step": request.apply_at_step,
                    "reason": request.reason, "force": request.force,
                    "expected_run_id": request.expected_run_id,
                    "expected_incarnation": request.expected_incarnation,
                    "apply_after_steps": request.apply_after_steps},
    }


def _change_from_json(data: Mapping[str, Any]) -> Change:
    request = data["request"]
    after = data["schedule_after"]
    return Change(
        id=int(data["id"]), status=ChangeStatus(data["status"]), requested_step=int(data["requested_step"]),
        requested_time=float(data["requested_time"]), version=int(data["version"]),
        applied_step=data["applied_step"], learning_rate_after=data["learning_rate_after"],
        schedule_after=None if after is None else _schedule_from_json(after),
        applied_time=data["applied_time"], current_version=data["current_version"],
        error=_error_from_json(data["error"]), due_step=data.get("due_step"),
        request=ChangeRequest(_action_from_json(request["action"]), request_id=request["request_id"],
                              expected_version=request["expected_version"],
                              apply_at_step=request["apply_at_step"], reason=request["reason"],
                              force=bool(request["force"]),
                              expected_run_id=request.get("expected_run_id", ""),
                              expected_incarnation=request.get("expected_incarnation", ""),
                              apply_after_steps=request.get("apply_after_steps")),
    )


_ACTION_FIELD = {PinLearningRate: "learning_rate", ScaleLearningRate: "scale", SwapSchedule: "schedule",
                 RevertSchedule: "schedule"}


def _next_state(state: ActiveSchedule, action: Action, step: int) -> ActiveSchedule:
    if isinstance(action, RevertSchedule):
        return action.state
    if isinstance(action, PinLearningRate):
        return ActiveSchedule(Constant(action.learning_rate), Origin.RESTART, step, 1.0)
    if isinstance(action, ScaleLearningRate):
        return dataclasses.replace(state, scale=state.scale * action.factor)
    # RESTART: the schedule sees its own step `start_step` at `step` (the engine evaluates
    # max(step - origin_step, 0), so a negative origin_step is fine).
    origin_step = step - action.start_step if action.origin is Origin.RESTART else 0
    return ActiveSchedule(action.schedule, action.origin, origin_step,
                          1.0 if action.scale is None else action.scale)


def _expected_due(change: Change, current_step: int) -> int:
    """The step at which a pending change is expected to apply (its `apply_after_steps`
    counted from `current_step` until a boundary has fixed it)."""
    if change.due_step is not None:
        return change.due_step
    request = change.request
    return max(current_step, request.apply_at_step or 0) + (request.apply_after_steps or 0)


def _check_change(action: Action, state: ActiveSchedule, step: int,
                  limits: Guardrails) -> tuple[ActiveSchedule, float]:
    """The state `action` makes from `state` at `step`, and its learning rate there.

    InvalidArgumentError naming the request's field if the cumulative scale, or the learning
    rate at any step of the guardrails' horizon from `step`, is not a usable float32;
    FailedPreconditionError naming the guardrail if the learning rate leaves [min, max] at
    any step of that horizon (exact extremes, no sampling). Pure numpy: no TensorFlow."""
    after = _next_state(state, action, step)
    field = _ACTION_FIELD[type(action)]
    if not _MIN_SCALE <= after.scale <= FLOAT32_MAX:
        raise InvalidArgumentError(
            "scale" if isinstance(action, SwapSchedule) else field,
            f"would make the cumulative scale {after.scale:g}, outside float32's normal range",
            getattr(action, "factor", None) if not isinstance(action, SwapSchedule) else action.scale)
    extremes = forms.extremes(after, step, step + limits.horizon_steps)
    for at, lr in ((extremes.max_step, extremes.max_lr), (extremes.min_step, extremes.min_lr)):
        if not forms.is_finite_float32(lr):
            raise InvalidArgumentError(field, f"would make the learning rate {lr} at step {at} in "
                                       "float32, the precision training uses", action.describe())
    limits.check_bounds([(extremes.max_step, extremes.max_lr), (extremes.min_step, extremes.min_lr)])
    return after, forms.learning_rate(after, step)


def _late_error(due: int, step: int) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"apply_at_step={due}: no step boundary fell on that step (the next one came at step "
        f"{step}: an epoch ended early, or the boundaries moved); the change was not applied late",
        field="apply_at_step")


def _outcomes(due: list[Change], state: ActiveSchedule, version: int, step: int,
              clock: Callable[[], float], limits: Guardrails) -> tuple[list[Change], ActiveSchedule, int]:
    """Each due change's final record, applied one after the other from (`state`, `version`)."""
    finals = []
    now = clock()
    for change in due:
        if change.due_key and change.due_key < step:  # its boundary never came: never apply late
            finals.append(dataclasses.replace(change, status=ChangeStatus.FAILED, applied_time=now,
                                              error=_late_error(change.due_key, step)))
            continue
        expected = change.request.expected_version
        if expected is not None and expected != version:
            finals.append(dataclasses.replace(change, status=ChangeStatus.ABORTED, current_version=version,
                                              applied_time=now,
                                              error=VersionConflictError(expected, version, step=step)))
            continue
        try:  # over the whole horizon from here, as on arrival, from the state it meets now
            after, lr = _check_change(change.request.action, state, step, limits)
        except (InvalidArgumentError, FailedPreconditionError) as e:  # fine on arrival, not now
            error = e if isinstance(e, FailedPreconditionError) else FailedPreconditionError(str(e))
            finals.append(dataclasses.replace(change, status=ChangeStatus.FAILED, applied_time=now,
                                              error=error))
            continue
        state = after
        version += 1
        finals.append(dataclasses.replace(
            change, status=ChangeStatus.APPLIED, version=version, applied_step=step,
            learning_rate_after=lr, schedule_after=state, applied_time=now,
        ))
    return finals, state, version


__all__ = [
    "APPLY_HORIZON", "DEDUP_WINDOW", "ENDED_PHASES", "MAX_PENDING", "MAX_REASON_BYTES", "MAX_REQUEST_ID_BYTES",
    "MAX_RUN_ID_BYTES", "SNAPSHOT_PENDING", "STATE_FORMAT", "Action", "Boundaries", "Change", "ChangeRequest",
    "ChangeStatus", "Controller", "Phase", "PinLearningRate", "RevertSchedule", "ScaleLearningRate",
    "ScheduleTarget", "Snapshot", "SwapSchedule",
]
