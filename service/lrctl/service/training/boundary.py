"""What the training thread does at a step boundary: in `fit` (before each batch, at each
epoch's start) or a custom loop, with one worker or at a multi-worker exchange, notice a
restore (`resync`), apply what is due through the controller in one engine load, log each
outcome, open the divergence window, and publish. The fit callback, the custom-loop hook and
local changes share it (through TrainingControl)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lrctl.service.control.changes import Boundaries, Change, ChangeStatus
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import short
from lrctl.service.schedules import forms
from lrctl.service.training.divergence import DivergenceWatch
from lrctl.service.training.engine_target import EngineTarget
from lrctl.service.training.exchange import WorkerSync
from lrctl.service.training.lifecycle import Lifecycle
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
    `watch`: revert_on_nan's, None when off; `workers`: the exchange of a multi-worker job,
    None for one worker (then `run.agreed` follows the exchanges' votes)."""

    def __init__(self, controller: Controller, engine: EngineTarget, clock: StepClock,
                 publisher: Publisher, watch: DivergenceWatch | None, workers: WorkerSync | None,
                 run: Lifecycle) -> None:
        self._controller = controller
        self._engine = engine
        self._clock = clock
        self._publisher = publisher
        self._watch = watch
        self._workers = workers
        self._run = run

    def custom_loop_step(self, logs: Mapping[str, Any] | None) -> list[Change]:
        """`TrainingControl.step_boundary`."""
        watch = self._watch
        if watch is not None and not watch.knows_weights:
            raise ValueError("revert_on_nan in a custom loop needs the weights to snapshot: "
                             "pass TrainingControl(..., model=model) or variables=[...]")
        step = self._clock.read()
        if watch is not None:
            watch.boundary_logs = logs
            if watch.guard.watching:
                watch.check(watch.logged_loss(logs))
        applied = self._exchange(step) if self._workers is not None else self._decide(step)
        self._publisher.publish(logs)
        return applied

    def before_batch(self, steps: int | None, logs: Mapping[str, Any] | None, *,
                     logs_step: int | None, logs_time: float | None) -> None:
        """`TrainingControl.before_batch`."""
        self._clock.settle()
        if self._watch is not None and self._watch.guard.watching:
            self._watch.check(self._watch.current_loss())
        if self._workers is not None:  # every worker reads the step: exchanges need it exactly
            self._exchange(self._clock.read())
        elif self._controller.at_boundary(self._clock.ceiling):
            self.apply_due(self._clock.read())
        self._publisher.publish(logs, logs_step=logs_step, logs_time=logs_time)
        self._clock.announce(steps)

    def epoch_begins(self, epoch: int, steps_per_batch: int | None) -> int:
        """`TrainingControl.epoch_begins`: the epoch's first step."""
        self._publisher.epoch = epoch
        self._clock.settle()  # the last epoch's batches have run: the read is exact
        start = self._clock.read()  # one scalar read an epoch
        # Executions of steps_per_execution steps from the epoch's first step (Keras runs whole
        # executions, unless the data runs out: then the next epoch starts them again).
        boundaries = Boundaries(start, steps_per_batch) if steps_per_batch is not None else None
        if self._workers is not None:  # the exchanges' grid holds across epochs
            boundaries = self._workers.boundaries
        self._controller.set_boundaries(boundaries, epoch_start_step=start)
        if self._workers is None and self._controller.at_boundary(start):
            self.apply_due(start)
        return start

    def epoch_ends(self, epoch: int, logs: Mapping[str, Any] | None, *, complete: bool) -> None:
        """`TrainingControl.epoch_ends`."""
        if complete:
            self._controller.complete_epoch(epoch)
        if self._watch is not None:
            self._watch.epoch_end(logs)
        self._publisher.publish_epoch(epoch, logs)

    def _decide(self, step: int) -> list[Change]:
        """Apply what is due at `step`: at this boundary, or, under a multi-worker exchange, at
        the exchange boundary `step` that every worker will load it at."""
        return self.apply_due(step) if self._controller.at_boundary(step) else []

    def _exchange(self, step: int) -> list[Change]:
        assert self._workers is not None
        ended, stop = self._workers.boundary(step, lambda: self._run.vote, self._decide)
        self._run.agreed = stop or self._run.agreed
        return ended

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
        if self._watch is not None and self._watch.weights_replaced():
            logger.info("revert_on_nan: a restore replaced the state; the watch ends")
        now = self._controller.restored(state, version, step=self._clock.read())
        if now != version:
            self._engine.schedule.set_version(now)
            self._engine.read_packed()  # what the variables hold now, version included
        logger.info("v%d: the schedule was restored (checkpoint version %d): %s",
                    now, version, short(state.spec.describe()))
        return True

