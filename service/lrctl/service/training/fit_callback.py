"""The Keras callback that puts a TrainingControl's step boundary into `model.fit`, and the
one place that notices `fit` raised: Keras calls no callback then, so `fit` itself is wrapped."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import keras

from lrctl.service.control.changes import Phase

if TYPE_CHECKING:
    from lrctl.service.training.integration import TrainingControl

logger = logging.getLogger("lrctl")


class ControlCallback(keras.callbacks.Callback):
    """Applies pending changes and publishes the state before each train batch.

    Keras runs the batch-end hooks of async-safe callbacks on a helper thread, so `fit` is
    not forced to sync and convert its logs every batch. Ours only keeps the logs there; all
    TensorFlow work (applying changes, reading the step and LR) happens on the training
    thread, in `on_train_batch_begin` (and `on_epoch_end`, for revert_on_nan).
    """

    async_safe = True

    def __init__(self, control: TrainingControl) -> None:
        super().__init__()
        self._control = control
        # The last train batch's logs, the step after it and when it ended; or None.
        self._last: tuple[Mapping[str, Any] | None, int | None, float] | None = None
        self._epoch_start: int | None = None  # the step when the current epoch began
        self._batches = 0  # steps of the current epoch run so far (the last batch end's count)
        self._steps_per_batch: int | None = None  # steps one train batch call may run
        _watch_fit_exits()

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        spe = getattr(self.model, "steps_per_execution", 1)
        self._steps_per_batch = spe if isinstance(spe, int) and spe > 0 else None
        self._control.fit_begins(self.model)
        self._control.begin()
        if not self._control.inside_training:  # inside training(), its own `except` ends the run
            _FITS.append_to_innermost(self)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._batches = 0
        self._epoch_start = self._control.epoch_begins(epoch, self._steps_per_batch)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        # On the training thread (Keras runs epoch hooks there, after the batch-end ones).
        # Complete: all its steps ran (or, their number unknown, its data ran out, not a stop).
        steps = (self.params or {}).get("steps")
        complete = self._batches >= steps if isinstance(steps, int) else not self.model.stop_training
        self._control.epoch_ends(epoch, logs, complete=complete)

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs, logs_step, logs_time = self._last if self._last is not None else (None, None, None)
        self._control.before_batch(self._steps_per_batch, logs, logs_step=logs_step, logs_time=logs_time)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # Keras passes the batch's last step within the epoch: the step after it is known
        # without a device sync. One reference swap: safe from Keras's helper thread.
        start = self._epoch_start
        self._last = (logs, None if start is None else start + batch + 1, time.time())
        self._batches = batch + 1

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        _FITS.remove(self)
        logs, logs_step, logs_time = self._last if self._last is not None else (None, None, None)
        self._control.fit_ends(logs, logs_step=logs_step, logs_time=logs_time)

    def fit_raised(self) -> None:
        """`fit` raised (outside `training()`): the run ends as FAILED, so waiters are answered
        and readiness drops. The phase only: the device may be what failed."""
        controller = self._control.controller
        if controller.snapshot().phase in (Phase.TRAINING, Phase.STOPPING):
            logger.error("fit() raised: the run ends as failed")
            controller.set_phase(Phase.FAILED)


class _Fits(threading.local):
    """The callbacks to tell, per `fit` call running on this thread (innermost last)."""

    def __init__(self) -> None:
        self.stack: list[list[ControlCallback]] = []

    def append_to_innermost(self, callback: ControlCallback) -> None:
        if self.stack:
            self.stack[-1].append(callback)

    def remove(self, callback: ControlCallback) -> None:
        for callbacks in self.stack:
            if callback in callbacks:
                callbacks.remove(callback)


_FITS = _Fits()


def _watch_fit_exits() -> None:
    """Wrap `keras.Model.fit` once per process in a try/except: Keras calls `on_train_end`
    only when `fit` returns, and calls nothing when it raises, so without this a run whose
    `fit` raised would stay TRAINING (waiters hang, readiness stays SERVING). Exact and free:
    one list push and pop per `fit` call, nothing per step, no thread. A callback joins the
    innermost running `fit` at `on_train_begin` and leaves at `on_train_end`; those still in
    when `fit` raises are told. `training()` and lrctl-trainer end their runs themselves."""
    fit = keras.Model.fit
    if getattr(fit, "lrctl_watched", False):
        return

    @functools.wraps(fit)
    def watched_fit(model: keras.Model, *args: Any, **kwargs: Any) -> Any:
        _FITS.stack.append([])
        try:
            return fit(model, *args, **kwargs)
        except BaseException:
            for callback in _FITS.stack[-1]:
                try:
                    callback.fit_raised()
                except Exception:  # never hide what fit raised
                    logger.exception("could not end the run after fit() raised")
            raise
        finally:
            _FITS.stack.pop()

    watched_fit.lrctl_watched = True  # type: ignore[attr-defined]
    keras.Model.fit = watched_fit  # type: ignore[method-assign]
