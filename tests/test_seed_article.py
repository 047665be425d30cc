"""The seed article's three snippets ("How do I reset the learning rate in TensorFlow 2?"),
done remotely: its custom `tf.GradientTape` loop, the real server, the real client.

Like the article, the LR is read with `optimizer.learning_rate`, the value Keras's optimizer
uses for its next step. No change ever retraces the train step (it traces on its first call
only; TF traces twice there because the optimizer creates its variables).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras
import pytest
import tensorflow as tf

from lrctl.client import TrainingControlClient, pb, schedules
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve


class ArticleLoop:
    """The article's model, data and train_step, with lrctl's step boundary added."""

    def __init__(self, learning_rate: object) -> None:
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="relu"),
                                       keras.layers.Dense(10, activation="softmax")])
        self.optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        self.control = TrainingControl(self.optimizer)
        loss_fn = keras.losses.CategoricalCrossentropy()
        self.x = tf.random.normal((32, 784))
        self.y = tf.one_hot(tf.random.uniform((32,), minval=0, maxval=9, dtype=tf.int32), depth=10)

        @tf.function
        def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, self.model(x))
            gradients = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
            return loss

        self.train_step = train_step
        self.lrs: dict[int, float] = {}  # step -> LR that step used

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.control.step_boundary()
            self.lrs[int(self.optimizer.iterations.numpy())] = float(self.optimizer.learning_rate)
            self.train_step(self.x, self.y)

    @property
    def traces(self) -> int:
        return self.train_step.experimental_get_tracing_count()


@pytest.fixture
def remote() -> Iterator[Callable[[ArticleLoop], TrainingControlClient]]:
    with contextlib.ExitStack() as stack:
        def connect(loop: ArticleLoop) -> TrainingControlClient:
            stack.enter_context(loop.control.training())
            _, port = stack.enter_context(serve(loop.control.controller, "127.0.0.1:0"))
            return stack.enter_context(TrainingControlClient(f"127.0.0.1:{port}"))
        yield connect


def test_snippet_1_reset_a_float_learning_rate(remote: Callable[[ArticleLoop], TrainingControlClient]) -> None:
    loop = ArticleLoop(learning_rate=0.001)
    client = remote(loop)
    loop.run(5)
    traces = loop.traces
    change = client.set_learning_rate(0.01)  # the article: optimizer.learning_rate.assign(0.01)
    loop.run(5)
    assert [round(loop.lrs[s], 6) for s in range(10)] == [0.001] * 5 + [0.01] * 5
    assert client.get_state().recent_changes[-1].request_id == change.request_id
    assert loop.traces == traces


def test_snippets_2_and_3_swap_the_schedule_remotely(
    remote: Callable[[ArticleLoop], TrainingControlClient]
) -> None:
    loop = ArticleLoop(keras.optimizers.schedules.ExponentialDecay(0.001, 10, 0.96, staircase=True))
    client = remote(loop)
    loop.run(25)
    assert round(loop.lrs[24], 8) == round(0.001 * 0.96**2, 8)  # snippet 2's decay, unchanged
    traces = loop.traces
    client.swap_schedule(schedules.ExponentialDecay(0.005, decay_steps=5, decay_rate=0.8, staircase=True))
    loop.run(25)
    applied = client.get_state().recent_changes[-1]
    assert applied.status == pb.CHANGE_STATUS_APPLIED and applied.applied_step == 25
    # Snippet 3 intended the new schedule to start at 0.005; in Keras it starts lower.
    assert [round(loop.lrs[s], 6) for s in (25, 29, 30, 35)] == [0.005, 0.005, 0.004, 0.0032]
    assert loop.traces == traces
