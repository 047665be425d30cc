"""The controller: one place that validates, one queue, one place that applies, versioned history.

Pure Python, no TensorFlow and no gRPC. Any thread may submit, cancel and list changes and
read snapshots; only the training thread calls `at_boundary`, `apply_due`, `publish` and
`restored`, at step boundaries. The engine is reached through the small `ScheduleTarget`
protocol, and no lock is held while it runs: a device sync never blocks an RPC.

`Controller` is the façade: each method says what it does for its caller and hands the work to
the module of its concern: `submission` (submit, cancel), `boundary` (apply at a step boundary,
the phase, restores), `recovery` (checkpoint state, log replay), `broadcast` (snapshots,
waiting, listeners), over the state they share (`core`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, cast

from lrctl.service.control import boundary, recovery, run_control, submission
from lrctl.service.control.changes import (
    Boundaries,
    Change,
    ChangeRequest,
    ChangeStatus,
    Phase,
    Snapshot,
    WorkerState,
)
from lrctl.service.control.core import ControlCore
from lrctl.service.control.filters import ChangeFilter
from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails
from lrctl.service.control.measurements import Page
from lrctl.service.control.targets import ChangeLog, ParameterTarget, RunTarget, ScheduleTarget
from lrctl.service.schedules.specs import ActiveSchedule

T = TypeVar("T")


class _Shared(Generic[T]):
    """An attribute of the controller that lives in its core: read and assigned there."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, controller: Controller, owner: type | None = None) -> T:
        return cast(T, getattr(controller._core, self._name))

    def __set__(self, controller: Controller, value: T) -> None:
        setattr(controller._core, self._name, value)


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
        self._core = ControlCore(target, run_id=run_id, optimizer=optimizer, history_size=history_size,
                                 guardrails=guardrails, clock=clock, incarnation=incarnation)
        #: Each is called by the training thread with every local change attempt (one made in
        #: the trainer's process, e.g. a Keras callback assigning `optimizer.learning_rate`)
        #: and how it ended: its final record, or the error that refused it. A server with a
        #: journal registers one, so local changes are journaled like a client's.
        self.local_observers: list[Callable[[ChangeRequest, Change | Exception], None]] = []

    #: Each is called by the training thread with the seconds each `apply_due` that finished a
    #: change took (the outcomes and the one engine load): metrics hooks.
    apply_observers: _Shared[list[Callable[[float], None]]] = _Shared()
    #: The write-ahead log (None: none, e.g. no checkpoint folder): every acceptance and ending
    #: is written to it before it is answered.
    wal: _Shared[ChangeLog | None] = _Shared()
    #: The limits changes are checked against (the rate limit is fixed at construction).
    guardrails: _Shared[Guardrails] = _Shared()
    #: The training layer's run actions: what it can do (checked on arrival) and doing it at
    #: the boundary (`control.run_control`). None: SaveCheckpoint and LoadCheckpoint are
    #: refused; pause, resume and stop only change the run's state.
    run_target: _Shared[RunTarget | None] = _Shared()

    # -- any thread ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self._core.board.snapshot()

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
        return submission.submit(self._core, request, validate_only=validate_only,
                                 preview_steps=preview_steps)

    @property
    def shutting_down(self) -> bool:
        """Whether `shut_down` was called: the run ends STOPPED, not FINISHED."""
        return self._core.shutting_down

    def shut_down(self) -> None:
        """The process is going away (SIGTERM): from now on `submit` raises UnavailableError.
        One attribute store and no lock, so a signal handler may call it."""
        self._core.shutting_down = True

    def export_state(self, step: int | None = None) -> dict[str, Any]:
        """The control state as JSON-able data (`persistence.state_to_json` says what is in
        it), for a checkpoint taken at a step boundary (on the training thread, so nothing is
        being applied) at `step` (default: the last step published, which may lag the
        boundary). `import_state` in a new process puts it back: a retry of any request id it
        remembers returns its record."""
        return recovery.export_state(self._core, step)

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Put back what `export_state` returned, before training starts (training thread).
        The engine's variables must already hold the same schedule and version (restored with
        the optimizer from the same checkpoint); if they do not, the next `resync` treats the
        difference as a restore, so the version still never goes back. Raises ValueError for
        data of another format."""
        recovery.import_state(self._core, data)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Put back what the write-ahead log recorded after the state `import_state` restored
        (training thread, before training; `recovery.replay` says where each record goes).
        Returns how many changes were put back."""
        return recovery.replay(self._core, records)

    def cancel(self, *, request_id: str = "", version: int | None = None,
               expected_run_id: str = "", expected_incarnation: str = "", reason: str = "") -> Change:
        """Cancel a pending change, named by its request_id or (once applied) its version.

        Returns the CANCELLED record (again, if it was cancelled already). Raises
        InvalidArgumentError for a field over its size limit, NotFoundError for an unknown
        change and FailedPreconditionError for one that has ended otherwise or is being
        applied at this very boundary; RunIdMismatchError when `expected_run_id` is set and is
        not this run's id.
        """
        return submission.cancel(self._core, request_id=request_id, version=version,
                                 expected_run_id=expected_run_id,
                                 expected_incarnation=expected_incarnation, reason=reason)

    def list_changes(self, page_size: int, before_id: int | None = None, *,
                     where: ChangeFilter | None = None) -> tuple[list[Change], int | None]:
        """Pending and remembered finished changes, newest (by submission) first, those that
        match `where` if given (`filters.parse_filter`): one page (short, even empty, with a
        selective filter: `ControlCore.page`) and the id to continue before, or None on the
        last page. Raises InvalidArgumentError for a `page_size` < 1."""
        return self._core.page(page_size, before_id, where)

    def get_change(self, change_id: int) -> Change:
        """The change `change_id` as it is now: pending, or finished and remembered (the last
        `limits.DEDUP_WINDOW`). Raises NotFoundError for any other id."""
        return self._core.get_change(change_id)

    def wait(self, change: Change, timeout: float | None) -> Change:
        """Block until `change` leaves PENDING; return its final record. Raises
        WaitTimeoutError when `timeout` (seconds; None waits forever) runs out first."""
        return self._core.board.wait(change, timeout, self._core.lookup)

    def listen(self, listener: Callable[[Snapshot, tuple[Change, ...]], None]) -> Callable[[], None]:
        """Call `listener(snapshot, ended)` after every publish, under the controller's lock on
        the publishing thread (`Broadcast.listen` says what it may do). Returns the call that
        unsubscribes it. For a server without a thread per waiter (rpc/wakeups.py)."""
        return self._core.board.listen(listener)

    @property
    def stopped_step(self) -> int | None:
        """The step a StopTraining ended the run at (carried by checkpoints), or None: a run
        restarted from its checkpoint after a stop has nothing left to do."""
        return self._core.stopped_step

    @property
    def paused(self) -> bool:
        return self._core.board.current.phase is Phase.PAUSED

    # -- training thread -------------------------------------------------------------------
    def wait_paused(self, step: int) -> bool:
        """Paused at boundary `step`: wait, holding no lock, until something is due here
        (returns True: call `apply_due(step)`, then this again) or the pause is over (False:
        resumed, stopped, timed out, or the process is shutting down)."""
        return run_control.wait_paused(self._core, step)

    def at_boundary(self, step_bound: float) -> bool:
        """A step boundary, where at most `step_bound` steps have completed (an upper bound
        kept without reading the step). Returns whether a pending change may be due."""
        return boundary.at_boundary(self._core, step_bound)

    def apply_due(self, step: int) -> list[Change]:
        """Apply, in submission order, every pending change due at `step` (training thread, at
        a step boundary: `step` steps have completed and none is running). The outcomes are
        decided in pure Python; the engine is loaded once, outside the lock."""
        return boundary.apply_due(self._core, step)

    def publish(self, *, step: int, learning_rate: float, metrics: Mapping[str, float] | None = None,
                epoch: int | None = None, metrics_step: int | None = None,
                metrics_time: float | None = None, lr_clamp_count: int | None = None) -> None:
        """Record the training thread's view at a step boundary, for readers and watchers.

        `metrics` were taken at `metrics_step` (default: `step`) and `metrics_time` (default:
        now). The throughput is measured over the last `throughput.WINDOW` seconds of publications."""
        boundary.publish(self._core, step=step, learning_rate=learning_rate, metrics=metrics, epoch=epoch,
                         metrics_step=metrics_step, metrics_time=metrics_time,
                         lr_clamp_count=lr_clamp_count)

    def publish_epoch(self, *, epoch: int, metrics: Mapping[str, float], step: int) -> None:
        """Record an epoch's end-of-epoch logs (`val_*` included), taken at `step`."""
        boundary.publish_epoch(self._core, epoch=epoch, metrics=metrics, step=step)

    def list_measurements(self, *, after_sequence: int | None, same_process: bool, start_step: int,
                          page_size: int) -> Page:
        """A page of the measurements numbered after `after_sequence` (a page token's; None:
        the first page; `same_process`: issued by this process) with step >= `start_step`,
        oldest first (any thread; O(page_size) under the lock)."""
        return self._core.measurement_page(after_sequence=after_sequence, same_process=same_process,
                                           start_step=start_step, page_size=page_size)

    def ended_counts(self) -> dict[ChangeStatus, int]:
        """How many changes ended with each status since this controller started (exact)."""
        return self._core.ended_counts()

    @property
    def engine_state(self) -> tuple[ActiveSchedule, int]:
        """What the controller last loaded into (or read from) the engine."""
        return self._core.state, self._core.version

    def restored(self, state: ActiveSchedule, version: int, *, step: int) -> int:
        """The engine's variables were restored (from a checkpoint) to `state` at `version`,
        at step boundary `step`: later changes build on `state`, under a version that never
        decreases (`boundary.restored`), which the caller writes back to the engine. Returns
        the version now in force."""
        return boundary.restored(self._core, state, version, step=step)

    def attach_parameters(self, target: ParameterTarget) -> None:
        """The hyperparameter variables SetParameters loads (training thread, before training,
        or again when their space changes, e.g. a variable was registered): their space
        judges requests from now on, and their values are read and reported."""
        boundary.attach_parameters(self._core, target)

    def refresh_parameters(self) -> dict[str, float]:
        """Read the hyperparameter variables again (training thread: a restore may have
        brought back others) and report them. Returns what they hold."""
        return boundary.refresh_parameters(self._core)

    def follow(self, state: ActiveSchedule, version: int) -> None:
        """A follower worker loaded the chief's `state` at `version`: take both as they are
        (the chief alone numbers versions, so a follower never renumbers one)."""
        boundary.follow(self._core, state, version)

    def set_boundaries(self, boundaries: Boundaries | None, *, epoch_start_step: int | None = None) -> None:
        """Where the coming step boundaries fall (training thread, e.g. at an epoch's start),
        and the step the current epoch began at. A pending `apply_at_step` that the new
        boundaries skip ends FAILED at the first boundary past it, never applied late."""
        self._core.board.set_boundaries(boundaries, epoch_start_step)

    def complete_epoch(self, epoch: int) -> None:
        """Epoch `epoch` (0-based) ran all its steps (training thread): a resume from a
        checkpoint taken from now on starts at the next one."""
        self._core.complete_epoch(epoch)

    @property
    def epochs_done(self) -> int:
        """Epochs completed, counting those before a resume: `fit`'s `initial_epoch`."""
        return self._core.epochs_done

    def set_engine_behind(self, held: tuple[ActiveSchedule, int] | None) -> None:
        """Changes were decided ahead of their step (a pipelined multi-worker exchange) and
        the engine still holds `held` until they load (None: they loaded). A checkpoint taken
        meanwhile carries `held`, and those changes as replays at their step."""
        self._core.set_engine_behind(held)

    def set_workers(self, workers: tuple[WorkerState, ...]) -> None:
        """Record what the last exchange said about each worker of a multi-worker job."""
        self._core.board.set_workers(workers)

    def set_phase(self, phase: Phase) -> None:
        """Move the run to `phase`. Completing or failing cancels every pending change;
        STOPPED (a shutdown) keeps them pending, for the checkpoint and the restart."""
        boundary.set_phase(self._core, phase)

    def apply_automatic(self, state: ActiveSchedule, *, step: int, reason: str) -> Change:
        """lrctl itself puts `state` in force at this step boundary (the divergence guard
        undoing a change), as a new version and an APPLIED change (`boundary.apply_automatic`).
        Raises what the engine or the write-ahead log raises; then nothing is in force."""
        return boundary.apply_automatic(self._core, state, step=step, reason=reason)

    def checkpointed(self, step: int | None, error: str = "") -> None:
        """Record a checkpoint attempt: `step` of a complete one (written or resumed from), or
        None and the `error` of a write that failed (counted)."""
        self._core.board.checkpointed(step, error)


__all__ = ["Controller"]
