"""The one step clock of the training thread, shared by the fit callback, the custom-loop hook
and the checkpointer: it says when a step *may* have been reached, so that the hot path reads
the step (a device sync) only then."""

from __future__ import annotations

import math

import keras

from lrctl.service.schedules.packing import value_reader


class StepClock:
    """Completed optimizer steps, and an upper bound on them kept without a device read.

    The bound (`ceiling`) is the last step read plus the steps the batch announced may still
    run (`announce`), so a read by another callback after the announcement (a checkpoint)
    never lowers it below the coming batch's end. Training thread only.
    """

    def __init__(self, iterations: keras.Variable) -> None:
        self._read_iterations = value_reader(iterations)
        #: At most this many steps will have completed at the next boundary.
        self.ceiling: float = 0
        self._in_flight: float = 0  # steps the announced batch may still run

    def read(self) -> int:
        """Completed optimizer steps. Reads a variable (a device sync)."""
        step = int(self._read_iterations())
        self.ceiling = step + self._in_flight
        return step

    def reached(self, step: int) -> bool:
        """Whether `step` steps have completed; reads the step only if the bound says they may."""
        return self.ceiling >= step and self.read() >= step

    def settle(self) -> None:
        """The announced batch has run (a boundary, an epoch or a run begins): a read is exact."""
        self._in_flight = 0

    def announce(self, steps: int | None) -> None:
        """The coming batch runs at most `steps` steps (None: unknown)."""
        self._in_flight = steps if steps is not None else math.inf
        self.ceiling += self._in_flight


class Periodic:
    """Due every `every` steps on `clock` (None: never), from the step read at creation."""

    def __init__(self, clock: StepClock, every: int | None) -> None:
        self._clock = clock
        self._every = every
        self._next = self._after(clock.read())

    def _after(self, step: int) -> int:
        every = self._every
        return step // every * every + every if every else 2**62

    def due(self) -> int | None:
        """The step, if an interval has passed since the last time it was due; else None."""
        if not self._clock.reached(self._next):
            return None
        step = self._clock.read()
        self._next = self._after(step)
        return step
