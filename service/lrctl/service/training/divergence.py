"""The divergence guard: undo a learning-rate change whose first steps made the loss NaN or Inf.

Putting the previous schedule back is not enough: by the time the loss is NaN, the weights
(and the optimizer's slots) are NaN too, and no learning rate brings them back. So at the
boundary where a change is applied, the guard copies the weights and the optimizer's slots
to host memory; if the loss turns non-finite within the next K steps, the training thread
assigns them back and the controller records the old schedule as a new version.

`DivergenceGuard` holds the snapshot; `DivergenceWatch` decides when to take, check and
restore it at the training thread's step boundaries. The training thread alone calls this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lrctl.service.control.controller import Controller
from lrctl.service.schedules import forms
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.specs import ActiveSchedule
from lrctl.service.training.step_clock import StepClock

logger = logging.getLogger("lrctl")


@dataclass
class Window:
    """The K steps watched after a change, and what a revert puts back."""

    taken_at: int  #: steps completed when the snapshot was taken: the change's boundary
    until: int  #: the window closes at the first boundary at or past this step
    state: ActiveSchedule  #: the schedule in force before the window's first change
    version: int  #: its version
    versions: tuple[int, ...]  #: the changes watched (several if more land in the window)
    variables: list[keras.Variable]
    values: list[np.ndarray]  #: host copies, in the order of `variables`

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for value in self.values)


class DivergenceGuard:
    """Snapshots, watches and restores for `TrainingControl(revert_on_nan=K)`.

    Holds at most one host copy of the watched variables, and only while a window is open.
    """

    def __init__(self, steps: int, optimizer: keras.optimizers.Optimizer,
                 schedule: ControllableSchedule) -> None:
        if steps <= 0:
            raise ValueError(f"revert_on_nan must be a positive number of steps, got {steps}")
        self.steps = steps
        self._optimizer = optimizer
        self._schedule = schedule
        self.window: Window | None = None
        self.snapshots = 0  #: snapshots taken so far
        self.checks = 0  #: boundaries at which the loss was read

    @property
    def watching(self) -> bool:
        """Whether a window is open. The hot path's only cost outside a window: this read."""
        return self.window is not None

    def open(self, step: int, weights: Sequence[keras.Variable], trainable: Sequence[keras.Variable],
             state: ActiveSchedule, version: int, applied: Sequence[int]) -> Window:
        """Changes `applied` (their versions) were just loaded at the boundary where `step`
        steps have completed, replacing `state` at `version`: watch the next K steps.
        `weights` are the model's variables, `trainable` those the optimizer updates, in the
        order the train step passes them (`model.trainable_variables`).

        A change that lands inside an open window extends it and keeps the older snapshot: the
        weights then are the last ones known good, and a revert undoes every change since.
        """
        if self.window is not None:
            self.window.until = step + self.steps
            self.window.versions += tuple(applied)
            return self.window
        variables = self._watched(weights, trainable)
        # One host copy (a device sync), taken before the change's first step runs.
        values = [np.array(v.numpy(), copy=True) for v in variables]
        self.snapshots += 1
        self.window = Window(taken_at=step, until=step + self.steps, state=state, version=version,
                             versions=tuple(applied), variables=variables, values=values)
        return self.window

    def check(self, step: int, loss: float | None) -> Window | None:
        """At a boundary inside the window, `step` steps done and `loss` the latest loss (None
        if unknown). Returns the window to revert if the loss is not finite; closes the window
        (freeing the snapshot) once K steps have passed with a finite loss."""
        window = self.window
        if window is None:
            return None
        self.checks += 1
        if loss is not None and not math.isfinite(loss):
            self.window = None
            return window
        if step >= window.until:
            self.close()
        return None

    def close(self) -> None:
        """Drop the snapshot: its host memory goes with the last reference."""
        self.window = None

    @staticmethod
    def restore(window: Window) -> None:
        """Assign the snapshot back. Between steps, on the training thread, in cross-replica
        context: every replica gets the same values."""
        for variable, value in zip(window.variables, window.values, strict=True):
            variable.assign(value)

    def _watched(self, weights: Sequence[keras.Variable],
                 trainable: Sequence[keras.Variable]) -> list[keras.Variable]:
        """The model's weights (trainable and not: batch-norm statistics go NaN too) and the
        optimizer's state, minus what must move forward or belongs to the controller."""
        optimizer = self._optimizer
        if not optimizer.built:
            # Keras builds the optimizer (creates its slots) inside the first step, after this
            # boundary. Slots created during the window would escape the snapshot and stay NaN
            # after a revert, so build them now as Keras's own symbolic build does (same
            # variables, same order, under the optimizer's strategy).
            strategy = getattr(optimizer, "_distribution_strategy", None) or tf.distribute.get_strategy()
            with strategy.scope():
                optimizer.build(list(trainable))
        # The step counter is not restored. Rewinding it would rewind the schedule's step and
        # `apply_at_step`: changes due in the rewound steps would land twice or never, and the
        # controller's step bound and history would disagree with the engine. Steps only move
        # forward, so the restored slots meet a counter K steps ahead of them (Adam's bias
        # correction sees a slightly larger step: negligible, unlike NaN moments).
        # The schedule's variables belong to the controller, which puts the old schedule back
        # as a new version (so the version never decreases); the retired float LR holds nothing.
        # Everything else is restored, a LossScaleOptimizer's loss scale included: the diverged
        # steps lowered it.
        skip = {id(v) for v in self._schedule.variables} | {id(v) for v in self._schedule.retired}
        owner = optimizer
        while True:
            skip.add(id(owner.iterations))
            if not isinstance(owner, keras.optimizers.LossScaleOptimizer):
                break
            owner = owner.inner_optimizer
        watched: list[keras.Variable] = []
        for variable in [*weights, *optimizer.variables]:
            if id(variable) not in skip:
                skip.add(id(variable))  # a variable listed twice is copied once
                watched.append(variable)
        return watched


class DivergenceWatch:
    """`revert_on_nan` at the step boundaries: opens a window where changes apply, reads the
    loss inside it, and reverts weights and schedule when the loss turns non-finite.

    The loss is fit's loss tracker while `fit` runs (exact, on the training thread), else the
    `logs["loss"]` given to the custom loop's boundary. `resync` notices a restore (it returns
    whether it found one); `reverted` is told after a revert so readers see it at once.
    """

    def __init__(self, guard: DivergenceGuard, controller: Controller, clock: StepClock,
                 model: keras.Model | None, variables: Sequence[keras.Variable] | None,
                 resync: Callable[[], bool], reverted: Callable[[], None]) -> None:
        self.guard = guard
        self._controller = controller
        self._clock = clock
        self._model = model
        self._variables = list(variables) if variables is not None else None
        self._resync = resync
        self._reverted = reverted
        self._fit_loss: Callable[[], float | None] | None = None
        #: The logs the custom loop gave at its last boundary.
        self.boundary_logs: Mapping[str, Any] | None = None
        self._warned_no_loss = False

    @property
    def knows_weights(self) -> bool:
        """Whether there are weights to snapshot (fit's model, or the model or variables given)."""
        return self._model is not None or self._variables is not None

    def fit_begins(self, model: keras.Model) -> None:
        """fit starts: its model is the one to snapshot unless another was given, and its loss
        tracker (Keras's running mean of the loss) is the loss to watch."""
        if self._model is None and self._variables is None:
            self._model = model
        tracker = next((m for m in model.metrics if m.name == "loss"), None)
        self._fit_loss = (lambda: float(np.asarray(tracker.result()))) if tracker is not None else None

    def fit_ends(self) -> None:
        self._fit_loss = None

    def weights_replaced(self) -> bool:
        """The weights were replaced (a restore, a load): a snapshot held belongs to the
        timeline before, and is never put back. Returns whether one was held (the watch ends)."""
        if not self.guard.watching:
            return False
        self.guard.close()
        return True

    def current_loss(self) -> float | None:
        if self._fit_loss is not None:
            return self._fit_loss()
        return self.logged_loss(self.boundary_logs)

    @staticmethod
    def logged_loss(logs: Mapping[str, Any] | None) -> float | None:
        value = (logs or {}).get("loss")
        return None if value is None else float(np.asarray(value))  # a tensor: a device sync

    def opened(self, step: int, before: tuple[ActiveSchedule, int], applied: list[int]) -> None:
        """Changes `applied` were just loaded at this boundary: watch the next K steps."""
        if self._model is not None:
            weights, trainable = self._model.weights, self._model.trainable_variables
        elif self._variables is not None:
            weights, trainable = self._variables, [v for v in self._variables if v.trainable]
        else:  # a change applied before fit or step_boundary ever ran
            logger.warning("revert_on_nan: no model known yet; v%d is not watched", applied[-1])
            return
        loss = self.current_loss()
        if loss is not None and not math.isfinite(loss):
            logger.warning("revert_on_nan: the loss is already %s at step %d; v%d is not watched "
                           "(a snapshot now would hold the diverged weights)", loss, step, applied[-1])
            return
        window = self.guard.open(step, weights, trainable, *before, applied)
        logger.info("v%d step %d: watching the loss until step %d (revert_on_nan; host copy %.3g MB "
                    "of the state at step %d)", applied[-1], step, window.until, window.nbytes / 1e6,
                    window.taken_at)

    def check(self, loss: float | None) -> None:
        """A boundary inside the window: revert if the loss is not finite, else maybe close."""
        step = self._clock.read()
        if loss is None and not self._warned_no_loss:
            self._warned_no_loss = True
            logger.warning("revert_on_nan: no loss to watch (fit's loss tracker, or logs['loss'] "
                           "given to step_boundary); changes cannot be reverted")
        window = self.guard.check(step, loss)
        if window is not None:
            self._revert(window, step, loss)

    def epoch_end(self, logs: Mapping[str, Any] | None) -> None:
        """At the end of a fit epoch: Keras resets its loss tracker before the next epoch's
        first boundary, so the epoch's last steps are checked here, with the epoch's training
        loss (validation, if any, has replaced the tracker's value by now)."""
        if self.guard.watching:
            self.check(self.logged_loss(logs))

    def _revert(self, window: Window, step: int, loss: float | None) -> None:
        if self._resync():  # a checkpoint was restored by hand since the change
            logger.warning("revert_on_nan: loss %s at step %d, but a restore replaced the state "
                           "since the change; not reverting", loss, step)
            return
        versions = "v" + ", v".join(str(v) for v in window.versions)
        reason = (f"auto-revert: loss was {loss} at step {step}, within {self.guard.steps} "
                  f"steps of {versions}; weights and optimizer state restored from step "
                  f"{window.taken_at}, schedule of v{window.version}")
        # Weights first: if the engine load below fails, training still goes on from good weights.
        DivergenceGuard.restore(window)
        lr = forms.learning_rate(self._controller.engine_state[0], step)
        try:
            change = self._controller.apply_automatic(window.state, step=step, reason=reason)
        except Exception:
            logger.exception("revert_on_nan: weights restored but the old schedule could not be "
                             "loaded: %s", reason)
        else:
            logger.warning("v%d step %d: lr %.6g -> %.6g  %s", change.version, step, lr,
                           change.learning_rate_after, reason)
        if self._fit_loss is not None and self._model is not None:
            # Keras's loss tracker averages over the epoch: it would stay NaN until the epoch
            # ends, hiding the recovery from readers and from the next window's checks.
            self._model.reset_metrics()
        self._reverted()
