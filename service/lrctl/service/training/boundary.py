"""What the training thread does at a step boundary where a change may apply: notice a restore
(`resync`), apply what is due through the controller in one engine load, log each outcome, and
open the divergence window. The fit callback, the custom-loop hook and local changes share it."""

from __future__ import annotations

import logging
import math

import numpy as np

from lrctl.service.control.changes import Change, ChangeStatus
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import short
from lrctl.service.schedules import forms
from lrctl.service.training.divergence import DivergenceWatch
from lrctl.service.training.engine_target import EngineTarget
from lrctl.service.training.publishing import Publisher
from lrctl.service.training.step_clock import StepClock

logger = logging.getLogger("lrctl")


def _log_outcomes(finished: list[Change], lr: float) -> None:
    """One log line per change that ended at a boundary; `lr`: the LR before the first."""
    for change in finished:
        reason = f" ({short(change.request.reason)})" if change.request.reason else ""
        if change.status is ChangeStatus.APPLIED:
            if not logger.isEnabledFor(logging.INFO):
                continue  # its arguments cost more than the rest of the line's work
            # As float32, the precision training uses, in its shortest exact form.
            logger.info("v%d step %d: lr %s -> %s  %s%s", change.version, change.applied_step,
                        np.float32(lr), np.float32(change.learning_rate_after),
                        short(change.description), reason)
            lr = change.learning_rate_after or lr
        else:
            error = f": {change.error}" if change.error else ""
            logger.warning("not applied (%s%s): %s%s", change.status.value, error,
                           short(change.description), reason)


class Boundary:
    """Applies due changes and notices restores. Training thread only, between steps.
    `watch`: revert_on_nan's, None when off."""

    def __init__(self, controller: Controller, engine: EngineTarget, clock: StepClock,
                 publisher: Publisher, watch: DivergenceWatch | None) -> None:
        self._controller = controller
        self._engine = engine
        self._clock = clock
        self._publisher = publisher
        self._watch = watch

    def apply_due(self, step: int) -> list[Change]:
        """Apply what is due now that `step` steps have completed; returns what ended. If a
        PauseTraining applied, wait here (holding no lock) until the pause is over, applying
        what falls due meanwhile at this same step (`Controller.wait_paused`)."""
        finished = self._apply_due(step)
        while self._controller.paused:
            if self._controller.wait_paused(step):
                finished += self._apply_due(step)
        return finished

    def _apply_due(self, step: int) -> list[Change]:
        self.resync()
        before = self._controller.engine_state
        # The LR the run had at this step, not the last published one (which lags under decay);
        # only for the log lines, so only when they are written.
        lr = forms.learning_rate(before[0], step) if logger.isEnabledFor(logging.INFO) else math.nan
        with self._engine.unchanged():  # the stamp was just read: the load needs no second read
            finished = self._controller.apply_due(step)
        _log_outcomes(finished, lr)
        if finished:
            self._publisher.published()
        applied = [c.version for c in finished if c.status is ChangeStatus.APPLIED]
        if applied and self._watch is not None:
            self._watch.opened(step, before, applied)
        return finished

    def resync(self) -> bool:
        """`TrainingControl.resync`: whether a restore replaced the engine's variables."""
        if not self._engine.replaced():
            return False
        # The hyperparameter variables ride in the same checkpoints as the schedule's.
        self._controller.refresh_parameters()
        # A restore may have brought another run's bounds: these are this trainer's.
        limits = self._controller.guardrails
        self._engine.schedule.set_bounds(limits.min_learning_rate, limits.max_learning_rate)
        state, version = self._engine.read()
        if (state, version) == self._controller.engine_state:
            return False
        if self._watch is not None and self._watch.guard.watching:
            # The snapshot belongs to the timeline the restore replaced: never put it back.
            self._watch.guard.close()
            logger.info("revert_on_nan: a restore replaced the state; the watch ends")
        now = self._controller.restored(state, version, step=self._clock.read())
        if now != version:
            self._engine.schedule.set_version(now)
            self._engine.read_packed()  # what the variables hold now, version included
        logger.info("v%d: the schedule was restored (checkpoint version %d): %s",
                    now, version, short(state.spec.describe()))
        return True

