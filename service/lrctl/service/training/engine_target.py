"""The engine as the controller and the multi-worker exchange drive it (the controller's
`ScheduleTarget`), on the training thread. Every load goes through
`ControllableSchedule.load_packed`; this class adds what the training thread needs on top:
noticing a restore with one scalar read, and the learning rate at a step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.specs import ActiveSchedule


class EngineTarget:
    """Reads and loads of one schedule as one int64 vector (`schedules.packing`). A load
    that fails puts back what the variables held: known without a read when nothing may
    have replaced them since the last read or load (`replaced`, `unchanged`)."""

    def __init__(self, schedule: ControllableSchedule) -> None:
        self.schedule = schedule
        # One compiled graph for "LR at step" (as clamped, not counted) and the clamp count:
        # eager evaluation would cost ~80 eager ops.
        self._lr_at = tf.function(
            lambda step: (schedule.bounded(step, count=False), schedule.clamp_count_variable.value),
            input_signature=[tf.TensorSpec([], tf.int64)],
        )
        #: What the variables held at the last read or load: put back if a load fails.
        self._held: np.ndarray | None = None
        self._stamp_at = schedule.offset_of(schedule.stamp_variable)
        self._version_at = schedule.offset_of(schedule.version_variable)
        #: Inside `unchanged()`: `_held` is known to be what the variables hold.
        self._trusted = False

    def replaced(self) -> bool:
        """Whether something (a restore) may have changed the variables since the last read
        or load through this target: one scalar read of the stamp every load writes."""
        if self._held is None:
            return True
        return not self._trusted and self.schedule.stamp() != int(self._held[self._stamp_at])

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        """A stretch of lrctl's own code on the training thread, entered right after
        `replaced()` said no or a read (`TrainingControl.resync`): nothing but this target
        changes the variables inside it (a restore is the trainer's code, which cannot run
        there), so a load inside knows what to put back if it fails (what the last read or
        load left), with no second read of the stamp."""
        if self._held is None:
            self.read_packed()
        self._trusted = True
        try:
            yield
        finally:
            self._trusted = False

    def load(self, state: ActiveSchedule, version: int) -> None:
        """All or nothing: the values are converted first; if the assignment fails, what the
        variables held before is put back."""
        self.load_packed(self.schedule.pack(state, version))

    def load_packed(self, vector: np.ndarray) -> None:
        # What to put back if the load fails: outside `unchanged()`, the stamp says whether
        # `_held` still is what the variables hold (else they are read).
        previous = self.read_packed() if self.replaced() else self._held
        self.schedule.load_packed(vector, previous)
        self._held = vector

    def read(self) -> tuple[ActiveSchedule, int]:
        return self.state_in(self.read_packed())

    def read_packed(self) -> np.ndarray:
        self._held = self.schedule.read_packed()
        return self._held

    def state_in(self, vector: np.ndarray) -> tuple[ActiveSchedule, int]:
        """The schedule and version a packed vector holds (host only, no TensorFlow)."""
        return self.schedule.state_in(vector)

    def version_in(self, vector: np.ndarray) -> int:
        return int(vector[self._version_at])

    def learning_rate(self, step: int) -> float:
        return self.learning_rate_and_clamps(step)[0]

    def learning_rate_and_clamps(self, step: int) -> tuple[float, int]:
        """The LR the optimizer gets at `step` and the engine's clamp count: one call."""
        lr, clamps = self._lr_at(tf.constant(step, tf.int64))
        return float(lr), int(clamps)
