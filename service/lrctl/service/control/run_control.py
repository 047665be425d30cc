"""Run actions at the step boundary: pause, resume, save a checkpoint, stop for good, load a
checkpoint (`changes.RUN_ACTIONS`), and the pause itself.

Each is a versioned change like a schedule change: decided in submission order with the others
due at the same boundary (`decide`), journaled and recorded by `boundary.apply_due`. What it
does beyond the ledger is done by the training layer through `RunTarget`, on the training
thread with no lock held; its outcome (APPLIED with the result fields, or FAILED with the
error) is decided from that. Then `settle` makes the run's state follow: PAUSED with
`paused_until`, back to TRAINING, or FINISHED with every pending change cancelled.

The pause: the training thread, back from `apply_due` at a boundary where a pause applied,
calls `wait_paused` in a loop. It sleeps on the controller's condition (released while
asleep), which every publish notifies (a submit, a cancel), and wakes when something falls
due at this step (it returns True: the caller applies it, a resume or a stop included, and
calls again), at the pause's timeout, or, within `PAUSE_POLL`, at a shutdown (a signal handler
sets a flag and takes no lock). Pure Python, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from lrctl.service.control import outcomes
from lrctl.service.control.changes import (
    RUN_ACTIONS,
    Change,
    ChangeStatus,
    LoadCheckpoint,
    PauseTraining,
    Phase,
    ResumeTraining,
    SaveCheckpoint,
    StopTraining,
)
from lrctl.service.control.core import ControlCore
from lrctl.service.control.targets import RunResult
from lrctl.service.errors import ApplyError, FailedPreconditionError
from lrctl.service.schedules import forms
from lrctl.service.schedules.specs import ActiveSchedule

logger = logging.getLogger("lrctl.controller")

#: How soon a paused training thread notices a shutdown (seconds): a signal handler only sets
#: a flag, so nothing notifies the condition then.
PAUSE_POLL = 0.25


def is_run_action(change: Change) -> bool:
    return isinstance(change.request.action, RUN_ACTIONS)


def decide(core: ControlCore, due: Sequence[Change], state: ActiveSchedule, version: int, step: int,
           now: float, values: dict[str, float] | None = None) -> tuple[list[Change], ActiveSchedule, int]:
    """Like `outcomes.decide`, in submission order, with each run action performed where it
    stands (no lock held): a load with its hyperparameters changes the state the changes after
    it build on, and a failed action takes no version. After an applied stop, the rest are
    cancelled with its reason."""
    finals: list[Change] = []
    stop: Change | None = None
    values = {} if values is None else values  # updated in place by each SetParameters
    for change in due:
        if stop is not None:
            finals.append(cancelled_by_stop(change, stop, now))
            continue
        [final], after, next_version = outcomes.decide([change], state, version, step, now, core.guardrails,
                                                        core.policy.parameters, values)
        if is_run_action(change) and final.status is ChangeStatus.APPLIED:
            final = _perform(core, final, state, step)
            if final.status is not ChangeStatus.APPLIED:
                after, next_version = state, version
            else:
                after = final.schedule_after or state
            if isinstance(change.request.action, StopTraining) and final.status is ChangeStatus.APPLIED:
                stop = final
        finals.append(final)
        state, version = after, next_version
    return finals, state, version


def _perform(core: ControlCore, change: Change, state: ActiveSchedule, step: int) -> Change:
    """`change` (decided APPLIED) done by the run target: its result fields, or FAILED."""
    action, target = change.request.action, core.run_target
    try:
        if isinstance(action, SaveCheckpoint):
            if target is None or target.checkpoint_dir is None:
                raise FailedPreconditionError("the trainer has no checkpoint folder (--checkpoint-dir)")
            result = target.save_checkpoint(step)
        elif isinstance(action, LoadCheckpoint):
            if target is None:
                raise FailedPreconditionError("the trainer cannot load checkpoints (--checkpoint-root)")
            result = target.load_checkpoint(action, step)
        else:  # pause, resume, stop: their effect follows the record (`settle`)
            result = RunResult()
    except Exception as e:  # noqa: BLE001 -- any failure fails the change, never training
        error = e if isinstance(e, (FailedPreconditionError, ApplyError)) else \
            ApplyError(f"{change.description} failed: {type(e).__name__}: {e}")
        logger.error("step %d: %s failed: %s", step, change.description, error)
        return dataclasses.replace(change, status=ChangeStatus.FAILED, version=0, applied_step=None,
                                   learning_rate_after=None, schedule_after=None, error=error)
    after = result.schedule if result.schedule is not None else state
    return dataclasses.replace(
        change, schedule_after=after, learning_rate_after=forms.learning_rate(after, step),
        checkpoint_path=result.checkpoint_path, checkpoint_step=result.checkpoint_step,
        checkpoint_run_id=result.checkpoint_run_id)


def cancelled_by_stop(change: Change, stop: Change, now: float) -> Change:
    reason = stop.request.reason or f"StopTraining ended the run at step {stop.applied_step}"
    return dataclasses.replace(change, status=ChangeStatus.CANCELLED, applied_time=now,
                               error=FailedPreconditionError(f"cancelled: {reason}"))


def replay(core: ControlCore, replays: Sequence[Change], step: int) -> None:
    """Run actions applied before a restart, met again at boundary `step` (no lock held): a
    load is performed again (its weights are what the steps after it trained from) if its
    checkpoint is still there; a save, pause or resume is only recorded (done already, or
    moot after the restart); a stop is settled again by `settle` (the run ends there)."""
    target = core.run_target
    for change in replays:
        action = change.request.action
        if not isinstance(action, LoadCheckpoint):
            continue
        if target is None:
            logger.error("v%d: cannot load %s again: the trainer cannot load checkpoints",
                         change.version, action.path)
            continue
        try:
            target.load_checkpoint(action, step)
            logger.info("v%d step %d: loaded %s again, as before the restart", change.version, step,
                        change.checkpoint_path or action.path)
        except Exception as e:  # noqa: BLE001 -- gone or changed: reported, training goes on
            logger.error("v%d step %d: could not load %s again after the restart (%s); training "
                         "goes on from the restored weights", change.version, step,
                         change.checkpoint_path or action.path, e)


def settle(core: ControlCore, changes: Sequence[Change], step: int) -> Change | None:
    """Under `core.cond`, after `changes` (applied and replayed, in order) were recorded: the
    run follows them (pause, resume, stop). Returns the applied stop, if any: the caller logs
    the cancellations it made (returned by `stop_cancellations`) and tells the target."""
    stop = None
    for change in changes:
        if change.status is not ChangeStatus.APPLIED:
            continue
        action = change.request.action
        if isinstance(action, PauseTraining):
            again = core.board.current.phase is Phase.PAUSED
            core.board.update(phase=Phase.PAUSED, paused_until=core.clock() + action.timeout)
            logger.info("step %d: paused for at most %gs%s", step, action.timeout,
                        " (the timeout restarted)" if again else "")
        elif isinstance(action, ResumeTraining):
            if core.board.current.phase is Phase.PAUSED:
                core.board.update(phase=Phase.TRAINING, paused_until=None)
                logger.info("step %d: resumed", step)
        elif isinstance(action, StopTraining):
            stop = change
    if stop is not None:
        core.stopped_step = stop.applied_step
        core.board.update(phase=Phase.FINISHED, paused_until=None)
    return stop


def stop_cancellations(core: ControlCore, stop: Change) -> list[Change]:
    """Under `core.cond`: every change still pending, cancelled with the stop's reason."""
    cancelled = []
    for change in core.queue.changes():
        if not core.queue.is_applying(change.id):
            core.queue.remove(change.id)
            cancelled.append(cancelled_by_stop(change, stop, core.clock()))
            core.finish(cancelled[-1])
    return cancelled


def wait_paused(core: ControlCore, step: int) -> bool:
    """`Controller.wait_paused`: True when something is due at `step` (apply it, call again);
    False once the run is not paused (resumed, stopped, timed out, shutting down)."""
    with core.cond:
        while True:
            snap = core.board.current
            if snap.phase is not Phase.PAUSED:
                return False
            if core.shutting_down:
                _end_pause(core, step, "the trainer is shutting down")
                return False
            left = (snap.paused_until or 0.0) - core.clock()
            if left <= 0:
                _end_pause(core, step, "the pause timed out; training resumes by itself")
                return False
            if core.queue.next_due is not None and core.queue.next_due <= step:
                return True
            core.cond.wait(min(left, PAUSE_POLL))


def _end_pause(core: ControlCore, step: int, why: str) -> None:
    logger.info("step %d: %s", step, why)
    core.board.update(phase=Phase.TRAINING, paused_until=None, updated_time=core.clock())
    core.republish()
