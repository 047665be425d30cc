"""What the controller's operations share: the state under one lock, and the few steps every
operation ends with (record an ending, republish, write the log).

The operations live by concern in `submission` (submit, cancel), `boundary` (the training
thread's changes at a step boundary) and `recovery` (checkpoint state and log replay); each is
a function of this core, and `Controller` is the façade over them. The core holds no rule of its
own: the rules are in `policy`, the queue in `queue`, the records in `ledger`, the snapshot in
`broadcast`, the JSON in `persistence`.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lrctl.service.control import parameters, persistence
from lrctl.service.control.broadcast import Board
from lrctl.service.control.changes import (
    Change,
    ChangeRequest,
    ChangeStatus,
    Phase,
    RevertSchedule,
    Snapshot,
)
from lrctl.service.control.filters import ChangeFilter
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.control.ledger import Ledger
from lrctl.service.control.limits import DEDUP_WINDOW, LIST_SCAN_LIMIT, SNAPSHOT_PENDING
from lrctl.service.control.measurements import Measurements, Page
from lrctl.service.control.policy import Policy
from lrctl.service.control.queue import ChangeQueue
from lrctl.service.control.targets import ChangeLog, ParameterTarget, RunTarget, ScheduleTarget
from lrctl.service.errors import InvalidArgumentError, NotFoundError, UnavailableError
from lrctl.service.schedules import forms
from lrctl.service.schedules.specs import ActiveSchedule

logger = logging.getLogger("lrctl.controller")


class ControlCore:
    """The controller's state. `cond` guards all of it; nobody holds it across engine work or
    an fsync. Only the training thread moves `state`, `version` and the engine."""

    def __init__(self, target: ScheduleTarget, *, run_id: str | None, optimizer: str, history_size: int,
                 guardrails: Guardrails, clock: Callable[[], float], incarnation: str | None) -> None:
        self.target = target
        self.clock = clock
        self.policy = Policy(guardrails)
        # Held across a whole submit or cancel, its write-ahead log append included (outside
        # the condition: an fsync under it would stall the training thread's boundaries). It
        # serializes submitters only, and lets `export_state` see no record half-committed.
        self.submit_lock = threading.Lock()
        #: The write-ahead log (None: none): every acceptance and ending is written to it
        #: before it is answered.
        self.wal: ChangeLog | None = None
        self.ids = itertools.count(1)
        self.state, self.version = target.read()  # what the engine holds
        #: The hyperparameter variables (None: none attached); only the training thread reads
        #: or loads them. `parameter_values`: what they held at the last read or load.
        self.parameters: ParameterTarget | None = None
        self.parameter_values: dict[str, float] = {}
        self.queue = ChangeQueue()
        #: The batch and epoch logs recorded, for ListMeasurements (under `cond`).
        self.measurements = Measurements()
        self.ledger = Ledger(history_size)
        #: Called by the training thread with the seconds each `apply_due` that finished a
        #: change took (the outcomes and the one engine load): metrics hooks.
        self.apply_observers: list[Callable[[float], None]] = []
        #: An upper bound on the step at the latest step boundary (exact when the training
        #: thread read it). An apply_at_step at or below it may have been passed already.
        self.boundary_step: float = -math.inf
        #: What the engine still holds while changes decided ahead of their step wait to be
        #: loaded (a pipelined multi-worker exchange); None: it holds `state` and `version`.
        self.engine_behind: tuple[ActiveSchedule, int] | None = None
        self.shutting_down = False  # every new change gets UNAVAILABLE
        self.epochs_done = 0  # epochs `fit` ran to their end: where a resume starts (initial_epoch)
        #: The training layer's run actions (None: only pause, resume and stop, recorded).
        self.run_target: RunTarget | None = None
        #: The step a StopTraining ended the run at (None: not stopped): a restart has nothing to do.
        self.stopped_step: int | None = None
        # A run id given by the caller names the run; a drawn one yields to a checkpoint's.
        self.run_id_given = run_id is not None
        self.board = Board(Snapshot(
            incarnation=incarnation or uuid.uuid4().hex[:12],
            run_id=run_id or uuid.uuid4().hex[:12], phase=Phase.STARTING, step=0, epoch=0,
            learning_rate=math.nan, schedule=self.state, version=self.version, metrics={},
            optimizer=optimizer, pending=(), recent=(), updated_time=clock(), guardrails=guardrails,
        ), lambda: self.clock())
        self.cond = self.board.cond

    @property
    def guardrails(self) -> Guardrails:
        return self.policy.guardrails

    @guardrails.setter
    def guardrails(self, limits: Guardrails) -> None:
        self.policy.guardrails = limits

    # -- any thread: each takes `cond` ------------------------------------------------------------
    def get_change(self, change_id: int) -> Change:
        """`Controller.get_change`."""
        with self.cond:
            record = self.lookup(change_id)
        if record is None:
            raise NotFoundError(f"no change {change_id} is known (every pending change and the "
                                f"last {DEDUP_WINDOW} finished ones are)")
        return record

    def measurement_page(self, *, after_sequence: int | None, same_process: bool, start_step: int,
                         page_size: int) -> Page:
        """`Controller.list_measurements`: O(page_size) under the lock."""
        with self.cond:
            if after_sequence is not None:
                after_sequence = self.measurements.position(after_sequence, same_process=same_process)
            return self.measurements.page(after_sequence, start_step, page_size)

    # -- under `cond` ----------------------------------------------------------------------------
    def top_version(self) -> int:
        """The newest version handed out: the engine's, or, while changes acknowledged before a
        restart are still to be re-applied, the last of those (never handed out again)."""
        replays = self.queue.replays
        return max(self.version, replays[-1].version) if replays else self.version

    def lookup(self, change_id: int) -> Change | None:
        return self.queue.get(change_id) or self.ledger.get(change_id)

    def page(self, page_size: int, before_id: int | None,
             where: ChangeFilter | None = None) -> tuple[list[Change], int | None]:
        """`Controller.list_changes` (takes `cond`): walks the ledger's ascending ids down from
        `before_id`, so a page costs what it holds, not a sort of every id; and stops after
        `LIST_SCAN_LIMIT` records, a short page with a place to go on from."""
        if page_size <= 0:
            raise InvalidArgumentError("page_size", "must be > 0", page_size)
        with self.cond:
            if where is not None and (indexed := self._indexed(where)) is not None:
                return [c for c in indexed if before_id is None or c.id < before_id], None
            page: list[Change] = []
            ids = self.ledger.ids_before(before_id, max(LIST_SCAN_LIMIT, page_size))
            pending, finished = self.queue.get, self.ledger.get
            last = None  # the last id examined: the next page continues below it
            for last in ids:
                record = finished(last) or pending(last)  # None: being cancelled right now
                if record is not None and (where is None or where.matches(record)):
                    page.append(record)
                    if len(page) == page_size:
                        break
            oldest = self.ledger.oldest_id()
            return page, (last if last is not None and oldest is not None and last > oldest else None)

    def _indexed(self, where: ChangeFilter) -> list[Change] | None:
        """The matches of a filter that fixes a request id or a version, found by the
        ledger's index (at most one change has either); None: the filter fixes neither."""
        if where.request_id:
            change_id = self.ledger.by_request_id(where.request_id)
        elif where.version is not None and where.version > 0:
            change_id = self.ledger.by_version(where.version)
        else:
            return None
        record = None if change_id is None else self.lookup(change_id)
        return [record] if record is not None and where.matches(record) else []

    def finish(self, change: Change, *, replayed: bool = False) -> None:
        """Record `change`'s end (`replayed`: put back from the write-ahead log, not counted,
        and not in force yet)."""
        if change.status is ChangeStatus.APPLIED and change.applied_step is not None and not replayed:
            self.board.changed_step = max(self.board.changed_step, change.applied_step)
        self.board.ended(change)
        self.ledger.record(change, counted=not replayed)

    def report_parameters(self) -> None:
        """Put the hyperparameters as last read or loaded in the snapshot (under `cond`)."""
        self.board.update(hyperparameters=parameters.report(
            self.policy.parameters, self.parameter_values, self.guardrails))

    def ended_counts(self) -> dict[ChangeStatus, int]:
        with self.cond:
            return self.ledger.ended_counts()

    def complete_epoch(self, epoch: int) -> None:
        with self.cond:
            self.epochs_done = epoch + 1

    def set_engine_behind(self, held: tuple[ActiveSchedule, int] | None) -> None:
        with self.cond:
            self.engine_behind = held

    def republish(self, *, pending: bool = False, history: bool = False) -> None:
        changes: dict[str, Any] = {}
        if pending:
            self.queue.tidy()
            changes.update(pending=self.queue.oldest(SNAPSHOT_PENDING), pending_count=len(self.queue))
        if history:
            changes["recent"] = self.ledger.history()
        self.board.publish(**changes)

    def automatic(self, state: ActiveSchedule, step: int, reason: str, version: int) -> Change:
        """The APPLIED record of lrctl itself putting `state` in force at `step`."""
        now = self.clock()
        return Change(id=next(self.ids), status=ChangeStatus.APPLIED, requested_step=step,
                      request=ChangeRequest(RevertSchedule(state), reason=reason), requested_time=now,
                      version=version, applied_step=step, learning_rate_after=forms.learning_rate(state, step),
                      schedule_after=state, applied_time=now)

    # -- without `cond` --------------------------------------------------------------------------
    def put_in_force(self, change: Change, step: int | None = None) -> None:
        """Record `change`, already loaded, as the state in force (and, with `step`, the
        step and learning rate readers see)."""
        assert change.schedule_after is not None
        with self.cond:
            self.state, self.version = change.schedule_after, change.version
            self.finish(change)
            self.board.update(schedule=self.state, version=self.version)
            if step is not None:
                self.board.update(step=step, learning_rate=change.learning_rate_after,
                                  updated_time=change.applied_time)
            self.republish(history=True)

    def log(self, changes: Sequence[Change]) -> None:
        """Write `changes`' records to the write-ahead log and wait until they are durable
        (never under `cond`: an fsync). Raises OSError if the disk refuses."""
        if self.wal is not None and changes:
            run_id = self.board.current.run_id
            self.wal.append([persistence.log_record(run_id, c) for c in changes])

    def log_after(self, changes: Sequence[Change]) -> None:
        """Log endings that are already decided (the run ended, the engine refused): a refusal
        is only reported, and a crash before them brings the changes back pending, which is safe."""
        try:
            self.log(changes)
        except OSError as e:
            logger.error("the write-ahead log refused the records of %d change(s) already decided: %s",
                         len(changes), e)


def unwritable(error: OSError, outcome: str) -> UnavailableError:
    """The answer when the write-ahead log refused a change's record."""
    return UnavailableError(
        f"the change could not be written to the write-ahead log ({error.strerror or error}); "
        f"{outcome}. Retry with the same request_id once the disk accepts writes")
