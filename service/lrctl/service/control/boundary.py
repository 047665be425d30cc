"""The step boundary, on the training thread: due changes applied with one engine load, the
run's phase, restores noticed, and lrctl's own changes (the divergence guard's revert).

No lock is held across engine work or an fsync: a device sync never blocks an RPC. The outcome
of each due change is decided in pure Python (`outcomes`), written to the write-ahead log, and
only then loaded and made visible.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping

from lrctl.service.control import outcomes, run_control
from lrctl.service.control.changes import Change, ChangeStatus, Phase, SetParameters
from lrctl.service.control.core import ControlCore
from lrctl.service.control.targets import ParameterTarget
from lrctl.service.schedules.specs import ActiveSchedule

logger = logging.getLogger("lrctl.controller")


def apply_due(core: ControlCore, step: int) -> list[Change]:
    """`Controller.apply_due`: take the due changes (lock), decide their outcomes and log
    them (no lock), load the engine once (no lock), record them (lock)."""
    started = time.perf_counter()
    with core.cond:
        core.boundary_step = step
        replays, due, resolved = core.queue.take_due(step, core.board.current.boundaries)
        if not due and not replays:
            if resolved:
                core.republish(pending=True)
            return []
        base = core.state, core.version
    # Replays first, as they came in the run that answered them: their state and version.
    replayed = _replayed(replays, base, step)
    # The hyperparameters as the variables hold them now (a restore may have moved them),
    # read only when a change at this boundary sets some.
    setting = core.parameters is not None and any(
        isinstance(c.request.action, SetParameters) for c in [*replays, *due])
    held = core.parameters.read() if setting and core.parameters is not None else {}
    # Due changes meet the values after the replays (re-applied first, in this same load).
    meets = {**held, **_parameter_loads(replays, [])}
    runs = any(map(run_control.is_run_action, due)) or any(map(run_control.is_run_action, replays))
    if runs:  # in order, each run action performed where it stands (run_control)
        run_control.replay(core, replays, step)
        finals, state, version = run_control.decide(core, due, *replayed, step, core.clock(), meets)
    else:
        finals, state, version = outcomes.decide(due, *replayed, step, core.clock(), core.guardrails,
                                                  core.policy.parameters, meets)
    try:  # each ending durable before the engine makes it true and anyone is told
        core.log(finals)
    except OSError as e:
        logger.error("step %d: the write-ahead log refused the records of %d due change(s) (%s); "
                     "they stay pending and are tried again at the next boundary", step,
                     len(finals), e)
        with core.cond:
            core.queue.put_back(due)
        finals, (state, version) = [], replayed
    loads = _parameter_loads(replays, finals)
    if (state, version) != base:
        try:
            _load(core, state, version, loads, held)
        except Exception as e:  # noqa: BLE001 -- any engine failure fails the changes, not training
            finals, corrected = outcomes.failed_load(finals, e)
            state, version = base
            if replays:
                logger.error("step %d: the replays of v%s could not be loaded: %r", step,
                             ", v".join(str(c.version) for c in replays), e)
            try:
                core.log(corrected)
            except OSError as log_error:
                logger.error("the write-ahead log refused the FAILED records of %d change(s): %s",
                             len(corrected), log_error)
            loads = {}
    with core.cond:
        if loads:
            core.parameter_values.update(loads)
            core.report_parameters()
        core.state, core.version = state, version
        for final in finals:
            core.queue.remove(final.id)
            core.finish(final)
        lr = core.board.current.learning_rate
        if version != base[1]:
            for change in replays:
                core.board.changed_step = max(core.board.changed_step, step)
                lr = change.learning_rate_after if change.learning_rate_after is not None else lr
        for final in finals:
            lr = final.learning_rate_after if final.learning_rate_after is not None else lr
        core.board.update(step=step, schedule=state, version=core.top_version(), learning_rate=lr,
                           updated_time=core.clock())
        stop = run_control.settle(core, [*replays, *finals], step) if runs else None
        cancelled = run_control.stop_cancellations(core, stop) if stop is not None else []
        core.republish(pending=True, history=True)
    if stop is not None:
        core.log_after(cancelled)
        if core.run_target is not None:
            core.run_target.stop(step)
    for observe in core.apply_observers:
        observe(time.perf_counter() - started)
    return finals


def _parameter_loads(replays: list[Change], finals: list[Change]) -> dict[str, float]:
    """The hyperparameter values the replays and the applied changes set, the last one winning."""
    loads: dict[str, float] = {}
    for change in [*replays, *finals]:
        if change.status is ChangeStatus.APPLIED:
            loads.update((u.name, u.after) for u in change.parameter_updates)
    return loads


def _load(core: ControlCore, state: ActiveSchedule, version: int, loads: dict[str, float],
          held: dict[str, float]) -> None:
    """The hyperparameters, then the schedule and version: all or nothing (if the engine
    refuses, the hyperparameters are put back as they were)."""
    if loads and core.parameters is not None:
        core.parameters.load(loads)
    try:
        core.target.load(state, version)
    except Exception:
        if loads and core.parameters is not None:
            core.parameters.load({name: held[name] for name in loads if name in held})
        raise


def attach_parameters(core: ControlCore, target: ParameterTarget) -> None:
    """`Controller.attach_parameters`: their space judges requests, their values are reported."""
    with core.cond:
        core.parameters = target
        core.policy.parameters = target.space()
    refresh_parameters(core)


def refresh_parameters(core: ControlCore) -> dict[str, float]:
    """`Controller.refresh_parameters`: read the variables (training thread) and report them."""
    values = core.parameters.read() if core.parameters is not None else {}
    with core.cond:
        core.parameter_values = dict(values)
        core.report_parameters()
        core.republish()
    return values


def restored(core: ControlCore, state: ActiveSchedule, version: int, *, step: int) -> int:
    """`Controller.restored`: a record of the restored state, as a new version if need be.
    The version never decreases: a restore to an older version becomes a new one. The version
    in force gets a record (an APPLIED change, action RevertSchedule, reason "restored"), so
    every version the state reports is in the ledger."""
    with core.cond:
        if (state, version) == (core.state, core.version):
            return core.version
        reason = f"restored: a checkpoint brought back the schedule of its version {version}"
        top = core.top_version()
        change = core.automatic(state, step, reason, version if version > top else top + 1)
    core.log_after([change])  # the restore has happened: a refused record is only reported
    core.put_in_force(change)
    return change.version


def set_phase(core: ControlCore, phase: Phase) -> None:
    """`Controller.set_phase`."""
    cancelled = []
    with core.cond:
        if phase in (Phase.FINISHED, Phase.FAILED):
            for change in core.queue.changes():
                if not core.queue.is_applying(change.id):
                    core.queue.remove(change.id)
                    cancelled.append(dataclasses.replace(change, status=ChangeStatus.CANCELLED,
                                                         applied_time=core.clock()))
                    core.finish(cancelled[-1])
        core.board.update(phase=phase, updated_time=core.clock(), paused_until=None)
        core.republish(pending=True, history=True)
    core.log_after(cancelled)


def apply_automatic(core: ControlCore, state: ActiveSchedule, *, step: int, reason: str) -> Change:
    """`Controller.apply_automatic`: durable first, then loaded, then in force. An APPLIED
    change, a swap to `state`'s schedule with `reason`, so history, ListChanges, waiters and
    watchers see it like a client's change; `state` is loaded exactly, origin step and scale
    included. No guardrail or rate limit applies: it restores a schedule that was in force."""
    with core.cond:  # only the training thread moves the version: no race below
        change = core.automatic(state, step, reason, core.top_version() + 1)
    core.log([change])  # durable first, like every applied change
    core.target.load(state, change.version)  # no lock across engine work
    core.put_in_force(change, step=step)
    return change


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


def at_boundary(core: ControlCore, step_bound: float) -> bool:
    """`Controller.at_boundary`: one lock and one comparison, no device read."""
    with core.cond:
        core.boundary_step = step_bound
        next_due = core.queue.next_due
        return next_due is not None and next_due <= step_bound


def publish(core: ControlCore, *, step: int, learning_rate: float, metrics: Mapping[str, float] | None,
            epoch: int | None, metrics_step: int | None, metrics_time: float | None,
            lr_clamp_count: int | None) -> None:
    """`Controller.publish`."""
    with core.cond:
        # An exact step tightens the bound left by `at_boundary` at this same boundary; it
        # does not open a new one (a change for this step may still apply at the next).
        # Decisions made ahead (`Boundaries.lead`) stay made: no reopening the step decided for.
        grid = core.board.current.boundaries
        core.boundary_step = min(core.boundary_step, step + (grid.lead if grid else 0))
        if metrics:
            measured = core.measurements.batch(
                step=step if metrics_step is None else metrics_step,
                epoch=core.board.current.epoch if epoch is None else epoch, metrics=metrics,
                time=core.clock() if metrics_time is None else metrics_time, now=time.monotonic(),
                changed_step=core.board.changed_step)
            if measured is not None:
                core.board.update(measurement_sequence=measured.sequence)
        core.board.record_step(step=step, learning_rate=learning_rate, metrics=metrics, epoch=epoch,
                               metrics_step=metrics_step, metrics_time=metrics_time,
                               lr_clamp_count=lr_clamp_count)


def publish_epoch(core: ControlCore, *, epoch: int, metrics: Mapping[str, float], step: int) -> None:
    """`Controller.publish_epoch`: a measurement, and the snapshot's epoch logs."""
    with core.cond:
        measured = core.measurements.epoch_end(step=step, epoch=epoch, metrics=metrics, time=core.clock())
        core.board.update(measurement_sequence=measured.sequence)
        core.board.record_epoch(epoch=epoch, metrics=metrics, step=step)


def follow(core: ControlCore, state: ActiveSchedule, version: int) -> None:
    """`Controller.follow`: the chief's state and version, as they are."""
    with core.cond:
        core.state, core.version = state, version
        core.board.publish(schedule=state, version=version)
