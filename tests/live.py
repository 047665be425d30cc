"""A live trainer for end-to-end tests: real `model.fit` on a background thread with the real
server on 127.0.0.1:0, built so that the LR applied at every step can be read off the weights.

The model is `y = w * x` with x = 1 and loss = mean(y): the gradient is exactly 1, so with
plain SGD each step moves `w` by exactly the learning rate that step used. `w` is put back to
1 after every step, so each LR is read at the float32 resolution of 1 whatever the step and
whatever ran before: a drifting `w` loses digits (past a few thousand steps, an LR of 0.02
no longer matched to 1e-4), which made tests depend on machine speed and on test order.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve


class _Recorder(keras.callbacks.Callback):
    """Weight after each batch, keyed by the step count at that moment; then `w` = 1 again."""

    def __init__(self, trainer: LiveTrainer) -> None:
        super().__init__()
        self._trainer = trainer

    def _record(self) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        self._trainer.weights[step] = float(self.model.layers[0].kernel.numpy()[0, 0])

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._record()

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._record()
        self.model.layers[0].kernel.assign(np.ones((1, 1), "float32"))  # between steps
        if self._trainer.stop.is_set():
            self.model.stop_training = True


class LiveTrainer:
    def __init__(self, learning_rate: float = 0.01, *,
                 optimizer: keras.optimizers.Optimizer | None = None, **control_options: Any) -> None:
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([
            keras.Input((1,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
        ])
        self.model.compile(optimizer=optimizer or keras.optimizers.SGD(learning_rate),
                           loss=lambda y_true, y_pred: ops.mean(y_pred))
        self.control = TrainingControl(self.model.optimizer, **control_options)
        self.weights: dict[int, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.port = 0

    def lr_at(self, step: int) -> float:
        """The learning rate the step that ran at `step` actually applied to the weights."""
        self.wait_for_step(step + 1)
        return 1.0 - self.weights[step + 1]  # every step starts from w = 1

    def wait_for_step(self, step: int, limit: float = 120.0) -> None:
        """Block until training has completed `step` steps (a safety limit, not a timing check)."""
        deadline = time.monotonic() + limit
        while step not in self.weights:
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training did not reach step {step}") from self.error
            time.sleep(0.01)

    def _fit(self) -> None:
        data = tf.data.Dataset.from_tensors((np.ones((1, 1), "float32"), np.zeros((1, 1), "float32")))
        try:
            self.model.fit(data.repeat(), steps_per_epoch=100, epochs=1_000_000, verbose=0,
                           shuffle=False, callbacks=[self.control.callback, _Recorder(self)])
        except BaseException as e:  # noqa: BLE001 -- any failure is surfaced by wait_for_step
            self.error = e

    @contextlib.contextmanager
    def running(self) -> Iterator[LiveTrainer]:
        with serve(self.control.controller, "127.0.0.1:0") as (_, port):
            self.port = port
            thread = threading.Thread(target=self._fit, name="trainer", daemon=True)
            thread.start()
            self.wait_for_step(1)
            try:
                yield self
            finally:
                self.stop.set()
                thread.join(timeout=60)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def wait_for_health(client: Any, service: str, status: str, limit: float = 60.0) -> None:
    """Poll `client.health(service)` until it reports `status`: health follows the run on the
    server's loop, told of each publish, so it lags a phase change a little (a safety limit, not a
    timing check)."""
    deadline = time.monotonic() + limit
    while client.health(service) != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"health of {service!r} never became {status}")
        time.sleep(0.01)


def state_until(client: Any, ok: Any, limit: float = 120.0) -> Any:
    """Poll `client.get_state()` until `ok(state)`; return that state (a safety limit, not a
    timing check)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = client.get_state()
        if ok(state):
            return state
        time.sleep(0.02)
    raise AssertionError("the state never got there")
