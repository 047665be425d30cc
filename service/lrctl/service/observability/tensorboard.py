"""TensorBoard logging of the learning rate and of every applied change
(`lrctl-trainer --tensorboard-dir DIR [--tensorboard-every N]`).

    board = TensorBoardLogger(control, "logs/lrctl", every=1)
    model.fit(..., callbacks=[control.callback, board])   # after control.callback
    board.close()

Writes, on the training thread, with `tf.summary`:

- `learning_rate` (a scalar): the learning rate the optimizer uses for the next step,
  at every step divisible by `every` (under `steps_per_execution=k`, only the steps at which
  a batch begins). The step and the value are read on the device, in one small graph: no
  host sync per step.
- `lrctl/changes` (text): each applied change (automatic reverts included) at the step where
  it applied: version, step, what, the learning rate after, and the reason.

The records are written with TensorFlow's own `tf.summary.write` and the plugin names
TensorBoard's scalar and text dashboards read, so the `tensorboard` package is not needed
to write them. In a custom loop, call `log()` after `control.step_boundary()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from lrctl.service.control.changes import Change, ChangeStatus
from lrctl.service.observability.logs import short
from lrctl.service.training.integration import TrainingControl

LR_TAG = "learning_rate"
CHANGES_TAG = "lrctl/changes"


def _metadata(plugin: str) -> summary_pb2.SummaryMetadata:
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin  # TensorBoard's "scalars" / "text" dashboards
    return metadata


def describe(change: Change) -> str:
    """The text written for an applied change."""
    lr = change.learning_rate_after
    text = (f"v{change.version} at step {change.applied_step}: {short(change.description)}"
            f"{f' (lr {lr:.6g})' if lr is not None else ''}")
    if change.request.reason:
        text += f"; reason: {short(change.request.reason)}"
    return text


class TensorBoardLogger(keras.callbacks.Callback):
    """A `fit` callback (put it after `control.callback`) writing the LR and applied changes."""

    def __init__(self, control: TrainingControl, logdir: str, every: int = 1) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        self.control = control
        self.logdir = logdir
        self.every = every
        self.writer = tf.summary.create_file_writer(logdir)
        self._version = control.controller.engine_state[1]
        iterations = control.optimizer.iterations
        schedule = control.schedule
        scalar = _metadata("scalars")

        @tf.function
        def write_lr() -> None:
            step = tf.cast(iterations, tf.int64)
            with tf.summary.record_if(step % every == 0):
                tf.summary.write(LR_TAG, tf.cast(schedule(step), tf.float32), step=step,
                                 metadata=scalar)

        self._write_lr = write_lr
        self._text = _metadata("text")

    def log(self) -> None:
        """At a step boundary, after changes were applied: write the changes applied since the
        last call, and the learning rate if the step is one of every `every`."""
        self.log_changes()
        with self.writer.as_default():
            self._write_lr()

    def log_changes(self) -> None:
        version = self.control.controller.engine_state[1]  # no lock: unchanged almost always
        if version == self._version:
            return
        applied = [c for c in self.control.controller.snapshot().recent
                   if c.status is ChangeStatus.APPLIED and c.version > self._version
                   and c.applied_step is not None]
        with self.writer.as_default():
            for change in sorted(applied, key=lambda c: c.version):
                tf.summary.write(CHANGES_TAG, tf.constant(describe(change)),
                                 step=change.applied_step, metadata=self._text)
        self._version = version

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    # -- fit --------------------------------------------------------------------------------
    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.log()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.log_changes()  # a revert_on_nan revert may land here
        self.flush()

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self.log_changes()
        self.flush()
