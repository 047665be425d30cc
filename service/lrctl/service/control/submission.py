"""Submissions: a change request from any thread becomes a queued (or recorded) change, and a
pending change can be cancelled.

Each runs its checks under the controller's lock (`policy` judges), writes the record to the
write-ahead log outside it (an fsync must never stall the training thread), then commits.
A retry of a known request id is answered from the ledger before anything else.
"""

from __future__ import annotations

import dataclasses

from lrctl.service.control import policy
from lrctl.service.control.changes import RUN_ACTIONS, Change, ChangeRequest, ChangeStatus, Phase
from lrctl.service.control.core import ControlCore, unwritable
from lrctl.service.control.limits import APPLY_HORIZON, DEDUP_WINDOW
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RequestIdReusedError,
)


def submit(core: ControlCore, request: ChangeRequest, *, validate_only: bool = False,
           preview_steps: int = 0) -> Change:
    """`Controller.submit`: check, decide, log, then queue (or record) the change."""
    policy.check_request(request)
    if isinstance(request.action, RUN_ACTIONS) and not _known(core, request.request_id):
        # Outside the lock: resolving a LoadCheckpoint path reads the file system.
        policy.check_capability(request.action, core.run_target)
    if not 0 <= preview_steps <= APPLY_HORIZON:
        raise InvalidArgumentError("preview_steps", f"must be in [0, {APPLY_HORIZON}]", preview_steps)
    if validate_only:
        return _decide(core, request, validate_only=True, preview_steps=preview_steps)[0]
    with core.submit_lock:
        change, new = _decide(core, request, validate_only=False, preview_steps=0)
        if not new:
            return change
        try:  # durable before it is answered (or queued: the training thread may apply it)
            core.log([change])
        except OSError as e:
            raise unwritable(e, "it was not queued") from e
        with core.cond:
            core.ledger.name(change)
            if core.board.current.phase in (Phase.FINISHED, Phase.FAILED) \
                    and change.status is ChangeStatus.PENDING:
                # The run ended while the record was written: cancelled, like the rest.
                change = dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                             applied_time=core.clock())
            if change.status is not ChangeStatus.PENDING:
                core.finish(change)
                core.republish(history=True)
            else:
                core.queue.add(change)
                core.republish(pending=True)
        if change.status is ChangeStatus.CANCELLED:
            core.log_after([change])
        return change


def _known(core: ControlCore, request_id: str) -> bool:
    """Whether a retry of `request_id` would be answered from the ledger."""
    if not request_id:
        return False
    with core.cond:
        return core.ledger.by_request_id(request_id) is not None


def _decide(core: ControlCore, request: ChangeRequest, *, validate_only: bool,
            preview_steps: int) -> tuple[Change, bool]:
    """`submit`'s checks under the condition: the record to answer with, and whether it is
    new (PENDING, or FAILED for a missed step: to log and commit) or an answer already."""
    with core.cond:
        # A retry is answered from the ledger before any fence: after a resume the fences
        # may have moved on, and the change they guarded was already decided.
        known = core.ledger.by_request_id(request.request_id) if request.request_id else None
        if known is not None and not validate_only and (record := core.lookup(known)) is not None:
            if policy.unfenced(record.request) != policy.unfenced(request):
                raise RequestIdReusedError(request.request_id)
            return record, False
        snap = core.board.current
        policy.check_fences(snap, request.expected_run_id, request.expected_incarnation)
        policy.check_open(snap, core.shutting_down)
        replays = core.queue.replays
        arrival = core.policy.judge(
            request, snapshot=snap, state=core.state, version=core.version,
            replayed=replays[-1] if replays else None, pending=core.queue.changes(),
            boundary_step=core.boundary_step, validate_only=validate_only)
        if not validate_only:
            core.policy.admit(len(core.queue), missed=arrival.missed is not None)
        change = Change(
            id=next(core.ids), request=request,
            status=ChangeStatus.VALIDATED if validate_only else ChangeStatus.PENDING,
            requested_step=snap.step, requested_time=core.clock(),
        )
        if validate_only:
            core.ledger.count(ChangeStatus.VALIDATED)
            return (core.policy.preview(change, arrival, preview_steps) if preview_steps else change), False
        if arrival.missed is not None:
            change = dataclasses.replace(change, status=ChangeStatus.FAILED,
                                         applied_time=change.requested_time, error=arrival.missed)
        return change, True


def cancel(core: ControlCore, *, request_id: str = "", version: int | None = None,
           expected_run_id: str = "", expected_incarnation: str = "", reason: str = "") -> Change:
    """`Controller.cancel`: take the change out of the queue, log its ending, record it."""
    policy.check_reason(reason)
    policy.check_request_id(request_id)
    policy.check_id_size(expected_run_id)
    policy.check_id_size(expected_incarnation, "expected_incarnation")
    with core.submit_lock:
        with core.cond:
            policy.check_fences(core.board.current, expected_run_id, expected_incarnation)
            if request_id:
                change_id, name = core.ledger.by_request_id(request_id), f"request_id {request_id!r}"
            else:
                change_id, name = core.ledger.by_version(version or 0), f"version {version}"
            record = None if change_id is None else core.lookup(change_id)
            if record is None:
                raise NotFoundError(f"no change with {name} is known (the last {DEDUP_WINDOW} are)")
            if record.status is ChangeStatus.CANCELLED:
                return record
            if record.status is not ChangeStatus.PENDING:
                raise FailedPreconditionError(
                    f"the change with {name} is already {record.status.value}; nothing to cancel")
            if core.queue.is_applying(record.id):
                raise FailedPreconditionError(f"the change with {name} is being applied right now")
            # Out of the queue while its record is written: the training thread must not
            # apply what is being cancelled.
            core.queue.remove(record.id)
            final = dataclasses.replace(record, status=ChangeStatus.CANCELLED, applied_time=core.clock(),
                                        error=FailedPreconditionError(f"cancelled: {reason}") if reason else None)
        try:
            core.log([final])
        except OSError as e:
            with core.cond:
                core.queue.add(record)
                core.republish(pending=True)
            raise unwritable(e, "it stays pending") from e
        with core.cond:
            core.finish(final)
            core.republish(pending=True, history=True)
        return final
