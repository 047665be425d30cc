"""The controller: one place that validates, one queue, one place that applies, versioned history.

Pure Python, no TensorFlow and no gRPC. Any thread may submit, cancel and list changes and
read snapshots; only the training thread calls `at_boundary`, `apply_due`, `publish` and
`restored`, at step boundaries. The engine is reached through the small `ScheduleTarget`
protocol, and no lock is held while it runs: a device sync never blocks an RPC.

`Controller` is a façade over the parts of the control package, each with one job: the
queue (`queue`), the ledger (`ledger`), the rules (`policy`), the published snapshot and
waiting (`broadcast`) and the JSON codec (`persistence`). It holds the state they share (what
the engine holds, the step bound, the lifecycle) and the order of each operation's steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from lrctl.service.control import persistence, policy
from lrctl.service.control.broadcast import Board
from lrctl.service.control.changes import (
    Boundaries,
    Change,
    ChangeLog,
    ChangeRequest,
    ChangeStatus,
    Phase,
    RevertSchedule,
    ScheduleTarget,
    Snapshot,
    WorkerState,
)
from lrctl.service.control.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RequestIdReusedError,
    UnavailableError,
)
from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails
from lrctl.service.control.ledger import Ledger
from lrctl.service.control.limits import APPLY_HORIZON, DEDUP_WINDOW, SNAPSHOT_PENDING
from lrctl.service.control.queue import ChangeQueue
from lrctl.service.schedules import forms
from lrctl.service.schedules.specs import ActiveSchedule

logger = logging.getLogger("lrctl.controller")


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
        self._policy = policy.Policy(guardrails)
        # Held across a whole submit or cancel, its write-ahead log append included (outside
        # the condition: an fsync under it would stall the training thread's boundaries). It
        # serializes submitters only, and lets `export_state` see no record half-committed.
        self._submit_lock = threading.Lock()
        #: The write-ahead log (None: none, e.g. no checkpoint folder): every acceptance and
        #: ending is written to it before it is answered.
        self.wal: ChangeLog | None = None
        self._ids = itertools.count(1)
        self._state, self._version = target.read()  # what the engine holds
        self._queue = ChangeQueue()
        self._ledger = Ledger(history_size)
        #: Each is called by the training thread with the seconds each `apply_due` that
        #: finished a change took (the outcomes and the one engine load): metrics hooks.
        self.apply_observers: list[Callable[[float], None]] = []
        #: Each is called by the training thread with every local change attempt (one made in
        #: the trainer's process, e.g. a Keras callback assigning `optimizer.learning_rate`)
        #: and how it ended: its final record, or the error that refused it. A server with a
        #: journal registers one, so local changes are journaled like a client's.
        self.local_observers: list[Callable[[ChangeRequest, Change | Exception], None]] = []
        # An upper bound on the step at the latest step boundary (exact when the training
        # thread read it). An apply_at_step at or below it may have been passed already.
        self._boundary_step: float = -math.inf
        self._shutting_down = False  # set by shut_down(): every new change gets UNAVAILABLE
        self._epochs_done = 0  # epochs `fit` ran to their end: where a resume starts (Keras's initial_epoch)
        # A run id given by the caller names the run; a drawn one yields to a checkpoint's.
        self._run_id_given = run_id is not None
        self._board = Board(Snapshot(
            incarnation=incarnation or uuid.uuid4().hex[:12],
            run_id=run_id or uuid.uuid4().hex[:12], phase=Phase.STARTING, step=0, epoch=0,
            learning_rate=math.nan, schedule=self._state, version=self._version, metrics={},
            optimizer=optimizer, pending=(), recent=(), updated_time=clock(), guardrails=guardrails,
        ), clock)
        self._cond = self._board.cond  # one condition guards everything the controller holds

    @property
    def guardrails(self) -> Guardrails:
        """The limits changes are checked against (the rate limit is fixed at construction)."""
        return self._policy.guardrails

    @guardrails.setter
    def guardrails(self, limits: Guardrails) -> None:
        self._policy.guardrails = limits

    # -- any thread ------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        return self._board.snapshot()

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
        policy.check_request(request)
        if not 0 <= preview_steps <= APPLY_HORIZON:
            raise InvalidArgumentError("preview_steps", f"must be in [0, {APPLY_HORIZON}]",
                                              preview_steps)
        if validate_only:
            return self._decide(request, validate_only=True, preview_steps=preview_steps)[0]
        with self._submit_lock:
            change, new = self._decide(request, validate_only=False, preview_steps=0)
            if not new:
                return change
            try:  # durable before it is answered (or queued: the training thread may apply it)
                self._log([change])
            except OSError as e:
                raise _unwritable(e, "it was not queued") from e
            with self._cond:
                self._ledger.name(change)
                if self._board.current.phase in (Phase.FINISHED, Phase.FAILED) \
                        and change.status is ChangeStatus.PENDING:
                    # The run ended while the record was written: cancelled, like the rest.
                    change = dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                 applied_time=self._clock())
                if change.status is not ChangeStatus.PENDING:
                    self._finish(change)
                    self._republish(history=True)
                else:
                    self._queue.add(change)
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
            known = self._ledger.by_request_id(request.request_id) if request.request_id else None
            if known is not None and not validate_only and (record := self._lookup(known)) is not None:
                if policy.unfenced(record.request) != policy.unfenced(request):
                    raise RequestIdReusedError(request.request_id)
                return record, False
            snap = self._board.current
            policy.check_fences(snap, request.expected_run_id, request.expected_incarnation)
            policy.check_open(snap, self._shutting_down)
            replays = self._queue.replays
            arrival = self._policy.judge(
                request, snapshot=snap, state=self._state, version=self._version,
                replayed=replays[-1] if replays else None, pending=self._queue.changes(),
                boundary_step=self._boundary_step, validate_only=validate_only)
            if not validate_only:
                self._policy.admit(len(self._queue), missed=arrival.missed is not None)
            change = Change(
                id=next(self._ids), request=request,
                status=ChangeStatus.VALIDATED if validate_only else ChangeStatus.PENDING,
                requested_step=snap.step, requested_time=self._clock(),
            )
            if validate_only:
                self._ledger.count(ChangeStatus.VALIDATED)
                return (self._policy.preview(change, arrival, preview_steps) if preview_steps else change), False
            if arrival.missed is not None:
                change = dataclasses.replace(change, status=ChangeStatus.FAILED,
                                             applied_time=change.requested_time, error=arrival.missed)
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
            snap = self._board.current
            return persistence.state_to_json(
                run_id=snap.run_id, step=snap.step if step is None else step, epoch=self._epochs_done,
                schedule=self._state, version=self._version, pending=self._queue.changes(),
                finished=self._ledger.finished(), history=self._ledger.history(),
                replay=self._queue.replays, wal_seq=self.wal.seq if self.wal is not None else 0)

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Put back what `export_state` returned, before training starts (training thread).
        The engine's variables must already hold the same schedule and version (restored with
        the optimizer from the same checkpoint); if they do not, the next `resync` treats the
        difference as a restore, so the version still never goes back. Raises ValueError for
        data of another format."""
        saved = persistence.state_from_json(data)
        with self._cond:
            self._state, self._version = saved.schedule, saved.version
            self._ids = itertools.count(saved.next_id)
            self._queue.restore(saved.pending, saved.replay)
            self._ledger.restore(saved.finished, saved.history, saved.pending)
            self._epochs_done = saved.epoch
            self._boundary_step = max(self._boundary_step, saved.step)
            # A resumed run is the same run: it keeps its id (unless the caller named one).
            run_id = self._board.current.run_id
            self._board.update(
                run_id=run_id if self._run_id_given else saved.run_id or run_id, step=saved.step,
                epoch=saved.epoch, schedule=self._state, version=self._version,
                learning_rate=forms.learning_rate(self._state, saved.step), updated_time=self._clock())
            self._republish(pending=True, history=True)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Put back what the write-ahead log recorded after the state `import_state` restored
        (training thread, before training): the records with a higher seq than its `wal_seq`,
        in seq order; a change's last record wins. Accepted: pending again. Applied: kept in
        the ledger as it was answered, and loaded again with its version at the first boundary
        at or after its step (training repeats those steps); pending changes and new ones wait
        until then. Cancelled, aborted, failed: in the ledger. Ids and versions continue above
        every one in the log. Returns how many changes were put back."""
        last, run_id = persistence.last_records(records)
        if not last:
            return 0
        with self._cond:
            count = 0
            replays = self._queue.replays
            for change in sorted(last.values(), key=lambda c: c.id):
                known = self._lookup(change.id)
                if known is not None and known.status is not ChangeStatus.PENDING:
                    continue  # its ending is in the checkpoint already
                count += 1
                self._ledger.name(change)
                if change.status is ChangeStatus.PENDING:
                    if known is None:
                        self._queue.add(change)
                    continue
                self._queue.remove(change.id)
                self._finish(change, replayed=True)
                if change.status is ChangeStatus.APPLIED:
                    replays.append(change)
            replays.sort(key=lambda c: (c.applied_step or 0, c.version))
            self._ids = itertools.count(max(next(self._ids), max(last) + 1))
            # Clients see the newest version acknowledged, while training repeats its steps.
            self._board.update(version=self._top_version())
            if run_id and not self._run_id_given:  # no checkpoint yet: the log names the run
                self._board.update(run_id=run_id)
            self._republish(pending=True, history=True)
        if replays:
            logger.info("replaying %d change(s) applied before the restart: from step %s to step %s "
                        "(v%d to v%d); other changes wait until then", len(replays),
                        replays[0].applied_step, replays[-1].applied_step, replays[0].version,
                        replays[-1].version)
        return count

    def cancel(self, *, request_id: str = "", version: int | None = None,
               expected_run_id: str = "", expected_incarnation: str = "", reason: str = "") -> Change:
        """Cancel a pending change, named by its request_id or (once applied) its version.

        Returns the CANCELLED record (again, if it was cancelled already). Raises
        InvalidArgumentError for a field over its size limit, NotFoundError for an unknown
        change and FailedPreconditionError for one that has ended otherwise or is being
        applied at this very boundary; RunIdMismatchError when `expected_run_id` is set and is
        not this run's id.
        """
        policy.check_reason(reason)
        policy.check_request_id(request_id)
        policy.check_id_size(expected_run_id)
        policy.check_id_size(expected_incarnation, "expected_incarnation")
        with self._submit_lock:
            with self._cond:
                policy.check_fences(self._board.current, expected_run_id, expected_incarnation)
                if request_id:
                    change_id, name = self._ledger.by_request_id(request_id), f"request_id {request_id!r}"
                else:
                    change_id, name = self._ledger.by_version(version or 0), f"version {version}"
                record = None if change_id is None else self._lookup(change_id)
                if record is None:
                    raise NotFoundError(f"no change with {name} is known (the last {DEDUP_WINDOW} are)")
                if record.status is ChangeStatus.CANCELLED:
                    return record
                if record.status is not ChangeStatus.PENDING:
                    raise FailedPreconditionError(
                        f"the change with {name} is already {record.status.value}; nothing to cancel")
                if self._queue.is_applying(record.id):
                    raise FailedPreconditionError(f"the change with {name} is being applied right now")
                # Out of the queue while its record is written: the training thread must not
                # apply what is being cancelled.
                self._queue.remove(record.id)
                final = dataclasses.replace(record, status=ChangeStatus.CANCELLED, applied_time=self._clock(),
                                            error=FailedPreconditionError(f"cancelled: {reason}") if reason else None)
            try:
                self._log([final])
            except OSError as e:
                with self._cond:
                    self._queue.add(record)
                    self._republish(pending=True)
                raise _unwritable(e, "it stays pending") from e
            with self._cond:
                self._finish(final)
                self._republish(pending=True, history=True)
            return final

    def list_changes(self, page_size: int, before_id: int | None = None) -> tuple[list[Change], int | None]:
        """Pending and remembered finished changes, newest (by submission) first.

        Returns one page and the id to continue before, or None on the last page.
        """
        with self._cond:
            ids = sorted(itertools.chain(self._queue.ids(), self._ledger.finished_ids()), reverse=True)
            if before_id is not None:
                ids = [i for i in ids if i < before_id]
            page = [r for i in ids[:page_size] if (r := self._lookup(i)) is not None]
            return page, (ids[page_size - 1] if len(ids) > page_size else None)

    def wait(self, change: Change, timeout: float | None) -> Change:
        """Block until `change` leaves PENDING; return its final record.

        Raises WaitTimeoutError when `timeout` (seconds; None waits forever) runs out first.
        """
        return self._board.wait(change, timeout, self._lookup)

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
        return self._board.updates(min_interval, is_active, poll, every_steps=every_steps,
                                   on_epoch=on_epoch, changes_only=changes_only)

    # -- training thread -------------------------------------------------------------------
    def at_boundary(self, step_bound: float) -> bool:
        """A step boundary, where at most `step_bound` steps have completed (an upper bound
        kept without reading the step). Returns whether a pending change may be due."""
        with self._cond:
            self._boundary_step = step_bound
            next_due = self._queue.next_due
            return next_due is not None and next_due <= step_bound

    def apply_due(self, step: int) -> list[Change]:
        """Apply, in submission order, every pending change whose `apply_at_step` <= `step`.

        Called by the training thread at a step boundary: `step` steps have completed and
        none is running, so the engine's variables can be assigned safely. The outcome of
        each change is computed in pure Python; the engine is loaded once, outside the lock.
        """
        started = time.perf_counter()
        with self._cond:
            self._boundary_step = step
            replays, due, resolved = self._queue.take_due(step, self._board.current.boundaries)
            if not due and not replays:
                if resolved:
                    self._republish(pending=True)
                return []
            base = self._state, self._version
        # Replays first, as they came in the run that answered them: their state and version.
        replayed = _replayed(replays, base, step)
        finals, state, version = self._policy.outcomes(due, *replayed, step, self._clock())
        try:  # each ending durable before the engine makes it true and anyone is told
            self._log(finals)
        except OSError as e:
            logger.error("step %d: the write-ahead log refused the records of %d due change(s) (%s); "
                         "they stay pending and are tried again at the next boundary", step,
                         len(finals), e)
            with self._cond:
                self._queue.put_back(due)
            finals, (state, version) = [], replayed
        if (state, version) != base:
            try:
                self._target.load(state, version)
            except Exception as e:  # noqa: BLE001 -- any engine failure fails the changes, not training
                finals, corrected = policy.failed_load(finals, e)
                state, version = base
                if replays:
                    logger.error("step %d: the replays of v%s could not be loaded: %r", step,
                                 ", v".join(str(c.version) for c in replays), e)
                self._log_after(corrected)
        with self._cond:
            self._state, self._version = state, version
            for final in finals:
                self._queue.remove(final.id)
                self._finish(final)
            lr = self._board.current.learning_rate
            if version != base[1]:
                for change in replays:
                    self._board.changed_step = max(self._board.changed_step, step)
                    lr = change.learning_rate_after if change.learning_rate_after is not None else lr
            for final in finals:
                lr = final.learning_rate_after if final.learning_rate_after is not None else lr
            self._board.update(step=step, schedule=state, version=self._top_version(), learning_rate=lr,
                               updated_time=self._clock())
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
            self._board.record_step(step=step, learning_rate=learning_rate, metrics=metrics, epoch=epoch,
                                    metrics_step=metrics_step, metrics_time=metrics_time,
                                    lr_clamp_count=lr_clamp_count)

    def publish_epoch(self, *, epoch: int, metrics: Mapping[str, float], step: int) -> None:
        """Record an epoch's end-of-epoch logs (`val_*` included), taken at `step`."""
        self._board.record_epoch(epoch=epoch, metrics=metrics, step=step)

    def ended_counts(self) -> dict[ChangeStatus, int]:
        """How many changes ended with each status since this controller started (exact)."""
        with self._cond:
            return self._ledger.ended_counts()

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
            reason = f"restored: a checkpoint brought back the schedule of its version {version}"
            top = self._top_version()
            change = self._automatic(state, step, reason, version if version > top else top + 1)
        self._log_after([change])  # the restore has happened: a refused record is only reported
        self._put_in_force(change)
        return change.version

    def follow(self, state: ActiveSchedule, version: int) -> None:
        """A follower worker loaded the chief's `state` at `version`: take both as they are
        (the chief alone numbers versions, so a follower never renumbers one)."""
        with self._cond:
            self._state, self._version = state, version
            self._board.publish(schedule=state, version=version)

    def set_boundaries(self, boundaries: Boundaries | None, *, epoch_start_step: int | None = None) -> None:
        """Where the coming step boundaries fall (training thread, e.g. at an epoch's start),
        and the step the current epoch began at. A pending `apply_at_step` that the new
        boundaries skip ends FAILED at the first boundary past it, never applied late."""
        self._board.set_boundaries(boundaries, epoch_start_step)

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
        self._board.set_workers(workers)

    def set_phase(self, phase: Phase) -> None:
        """Move the run to `phase`. Completing or failing cancels every pending change;
        STOPPED (a shutdown) keeps them pending, for the checkpoint and the restart."""
        cancelled = []
        with self._cond:
            if phase in (Phase.FINISHED, Phase.FAILED):
                for change in self._queue.changes():
                    if not self._queue.is_applying(change.id):
                        self._queue.remove(change.id)
                        cancelled.append(dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                             applied_time=self._clock()))
                        self._finish(cancelled[-1])
            self._board.update(phase=phase, updated_time=self._clock())
            self._republish(pending=True, history=True)
        self._log_after(cancelled)

    def apply_automatic(self, state: ActiveSchedule, *, step: int, reason: str) -> Change:
        """lrctl itself puts `state` in force at this step boundary (the divergence guard
        undoing a change). It becomes a new version (never a lower one) and an APPLIED change,
        a swap to `state`'s schedule with `reason`, so history, ListChanges, waiters and
        watchers see it like a client's change. `state` is loaded exactly, origin step and
        scale included. No guardrail or rate limit applies: it restores a schedule that was
        in force. Raises what the engine or the write-ahead log raises; then nothing is in force."""
        with self._cond:  # only the training thread moves the version: no race below
            change = self._automatic(state, step, reason, self._top_version() + 1)
        self._log([change])  # durable first, like every applied change
        self._target.load(state, change.version)  # no lock across engine work
        self._put_in_force(change, step=step)
        return change

    def checkpointed(self, step: int | None, error: str = "") -> None:
        """Record a checkpoint attempt: `step` of a complete one (written or resumed from), or
        None and the `error` of a write that failed (counted)."""
        self._board.checkpointed(step, error)

    # -- internals ---------------------------------------------------------------------------
    def _automatic(self, state: ActiveSchedule, step: int, reason: str, version: int) -> Change:
        """The APPLIED record of lrctl itself putting `state` in force at `step` (lock held)."""
        now = self._clock()
        return Change(id=next(self._ids), status=ChangeStatus.APPLIED, requested_step=step,
                      request=ChangeRequest(RevertSchedule(state), reason=reason), requested_time=now,
                      version=version, applied_step=step, learning_rate_after=forms.learning_rate(state, step),
                      schedule_after=state, applied_time=now)

    def _put_in_force(self, change: Change, step: int | None = None) -> None:
        """Record `change`, already loaded, as the state in force (and, with `step`, the
        step and learning rate readers see)."""
        assert change.schedule_after is not None
        with self._cond:
            self._state, self._version = change.schedule_after, change.version
            self._finish(change)
            self._board.update(schedule=self._state, version=self._version)
            if step is not None:
                self._board.update(step=step, learning_rate=change.learning_rate_after,
                                   updated_time=change.applied_time)
            self._republish(history=True)

    def _log(self, changes: Sequence[Change]) -> None:
        """Write `changes`' records to the write-ahead log and wait until they are durable
        (no lock held: an fsync). Raises OSError if the disk refuses."""
        if self.wal is not None and changes:
            run_id = self._board.current.run_id
            self.wal.append([persistence.log_record(run_id, c) for c in changes])

    def _log_after(self, changes: Sequence[Change]) -> None:
        """Log endings that are already decided (the run ended, the engine refused): a refusal
        is only reported, and a crash before them brings the changes back pending, which is safe."""
        try:
            self._log(changes)
        except OSError as e:
            logger.error("the write-ahead log refused the records of %d change(s) already decided: %s",
                         len(changes), e)

    def _top_version(self) -> int:
        """The newest version handed out: the engine's, or, while changes acknowledged before a
        restart are still to be re-applied, the last of those (never handed out again)."""
        replays = self._queue.replays
        return max(self._version, replays[-1].version) if replays else self._version

    def _lookup(self, change_id: int) -> Change | None:
        return self._queue.get(change_id) or self._ledger.get(change_id)

    def _finish(self, change: Change, *, replayed: bool = False) -> None:
        """Record `change`'s end (`replayed`: put back from the write-ahead log, not counted,
        and not in force yet). Lock held."""
        if change.status is ChangeStatus.APPLIED and change.applied_step is not None and not replayed:
            self._board.changed_step = max(self._board.changed_step, change.applied_step)
        self._board.ended(change)
        self._ledger.record(change, counted=not replayed)

    def _republish(self, *, pending: bool = False, history: bool = False) -> None:
        changes: dict[str, Any] = {}
        if pending:
            self._queue.tidy()
            changes.update(pending=self._queue.oldest(SNAPSHOT_PENDING), pending_count=len(self._queue))
        if history:
            changes["recent"] = self._ledger.history()
        self._board.publish(**changes)


def _replayed(replays: list[Change], base: tuple[ActiveSchedule, int],
              step: int) -> tuple[ActiveSchedule, int]:
    """The state and version after re-applying `replays` at boundary `step` (logged)."""
    state, version = base
    for change in replays:
        assert change.schedule_after is not None
        state, version = change.schedule_after, change.version
        logger.info("v%d step %d: re-applied as before the restart (%s)", change.version, step,
                    change.description)
        if change.applied_step != step:
            logger.warning("v%d was applied at step %s before the restart; the first boundary "
                           "at or after it is step %d: re-applied there", change.version,
                           change.applied_step, step)
    return state, version


def _unwritable(error: OSError, outcome: str) -> UnavailableError:
    return UnavailableError(
        f"the change could not be written to the write-ahead log ({error.strerror or error}); "
        f"{outcome}. Retry with the same request_id once the disk accepts writes")


__all__ = ["Controller"]
