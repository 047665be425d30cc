"""Publishing the training state (step, LR, clamp count, metrics) to the controller, which
serves it to GetState and WatchState: throttled, since reading the step and LR is a device sync."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lrctl.service.control.controller import Controller
from lrctl.service.training.engine_target import EngineTarget
from lrctl.service.training.step_clock import StepClock


def _to_floats(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue  # non-scalar logs (e.g. per-class metrics) are not published
    return out


class Publisher:
    """At most one publish every `interval` seconds unless forced. Training thread only.
    `resync` notices a restore first, so the state published is the engine's."""

    def __init__(self, controller: Controller, engine: EngineTarget, clock: StepClock,
                 resync: Callable[[], bool], interval: float) -> None:
        self._controller = controller
        self._engine = engine
        self._clock = clock
        self._resync = resync
        self._interval = interval
        self._last = -math.inf
        self.epoch: int | None = None  #: None: keep the controller's (0, or a resumed run's)

    def publish(self, logs: Mapping[str, Any] | None = None, *, force: bool = False,
                logs_step: int | None = None, logs_time: float | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        step = self._clock.read()
        if self._engine.replaced():
            self._resync()
        lr, clamps = self._engine.learning_rate_and_clamps(step)
        self._controller.publish(step=step, learning_rate=lr, lr_clamp_count=clamps,
                                 metrics=_to_floats(logs) if logs is not None else None, epoch=self.epoch,
                                 metrics_step=logs_step, metrics_time=logs_time)

    def publish_epoch(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        """An epoch's end-of-epoch logs (`val_*` included), marked as such, with the step and
        learning rate they were taken at: one consistent state, never logs from a step later
        than the state's."""
        if logs:
            self.publish(force=True)
            step = self._controller.snapshot().step
            self._controller.publish_epoch(epoch=epoch, metrics=_to_floats(logs), step=step)

    def published(self) -> None:
        """The controller just published (changes ended): the next throttled publish waits."""
        self._last = time.monotonic()

    def soon(self) -> None:
        """Readers should see what just happened (a revert) at the next boundary."""
        self._last = -math.inf
