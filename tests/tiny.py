"""The tiny model the training tests share: one weight `w`, input 1, loss = the prediction.

The gradient of the loss with respect to `w` is exactly 1, so plain SGD moves `w` by exactly
the learning rate each step, and `w_before - w_after` over an execution is the sum of the LRs
its steps used. The loss is per sample (not already a scalar) so that Keras averages it over
the batch and scales it for tf.distribute like any built-in loss.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

BATCH = 4


class TraceCountingModel(keras.Sequential):
    """`traces` grows only when Keras traces `train_step` (Python runs only while tracing)."""

    traces = 0

    def train_step(self, data):
        self.traces += 1
        return super().train_step(data)


def prediction_loss(y_true, y_pred):
    return ops.squeeze(y_pred, -1)


def make_model(lr: float, *, jit_compile: bool = False, steps_per_execution: int = 1):
    model = TraceCountingModel([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.0),
                  loss=prediction_loss, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    return model


def weight(model) -> float:
    return float(np.asarray(model.layers[0].kernel.numpy()).reshape(()))


def data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ones((steps * BATCH, 1), np.float32)
    return x, np.zeros_like(x)


class WeightRecorder(keras.callbacks.Callback):
    """`w` at fit start and after every execution, with the step count at that point."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []

    def _record(self) -> None:
        self.points.append((int(self.model.optimizer.iterations.numpy()), weight(self.model)))

    def on_train_begin(self, logs=None):
        self._record()

    def on_train_batch_end(self, batch, logs=None):
        self._record()

    def executions(self) -> list[tuple[int, int, float]]:
        """(first step, last step + 1, sum of the LRs those steps used) per execution."""
        return [(s0, s1, w0 - w1) for (s0, w0), (s1, w1) in zip(self.points, self.points[1:])]


def fit(model, control, steps: int, *callbacks, before=()) -> WeightRecorder:
    """Fit `steps` batches. `control.callback` runs before the other callbacks (but after
    `before`), so a change is applied before anything else sees the batch."""
    recorder = WeightRecorder()
    x, y = data(steps)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[*before, control.callback, *callbacks, recorder])
    return recorder
