"""The divergence guard: undo a learning-rate change whose first steps made the loss NaN or Inf.

Putting the previous schedule back is not enough: by the time the loss is NaN, the weights
(and the optimizer's slots) are NaN too, and no learning rate brings them back. So at the
boundary where a change is applied, the guard copies the weights and the optimizer's slots
to host memory; if the loss turns non-finite within the next K steps, the training thread
assigns them back and the controller records the old schedule as a new version.

TensorFlow work only: the training thread alone calls this module (see integration.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.specs import ActiveSchedule


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
