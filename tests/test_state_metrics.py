"""Metrics a controller can use: the state's batch metrics carry the step and time they were
taken at, epoch-end logs (`val_*` included) are published apart and marked with their epoch,
the state reports throughput, and no update presents pre-change metrics as post-change ones.
On a real `model.fit` with validation data behind the real server."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import keras
import numpy as np
import pytest
from fakes import MemoryTarget
from live import state_until

from lrctl.client import TrainingControlClient
from lrctl.service import TrainingControl
from lrctl.service.control.changes import ChangeRequest, Phase, PinLearningRate
from lrctl.service.control.controller import Controller
from lrctl.service.control.throughput import WINDOW, Throughput
from lrctl.service.rpc.server import serve
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.specs import ActiveSchedule

STEPS_PER_EPOCH = 8  # 64 samples, batch 8


class _Stop(keras.callbacks.Callback):
    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self._stop = stop

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        time.sleep(0.005)  # a few hundred steps a second at most: the test samples every step
        if self._stop.is_set():
            self.model.stop_training = True


class _Fit:
    def __init__(self) -> None:
        keras.utils.set_random_seed(0)
        self.model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        self.model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
        self.control = TrainingControl(self.model.optimizer, publish_interval=0.02)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 3)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        try:
            self.model.fit(x, y, batch_size=8, epochs=1_000_000, verbose=0, shuffle=False,
                           validation_data=(x[:16], y[:16]),
                           callbacks=[self.control.callback, _Stop(self.stop)])
        except BaseException as e:  # noqa: BLE001 -- surfaced by the test
            self.error = e


@pytest.fixture(scope="module")
def fit() -> Iterator[tuple[_Fit, TrainingControlClient]]:
    trainer = _Fit()
    with serve(trainer.control.controller, "127.0.0.1:0") as (_, port):
        thread = threading.Thread(target=trainer.run, name="trainer", daemon=True)
        thread.start()
        with TrainingControlClient(f"127.0.0.1:{port}") as client:
            try:
                yield trainer, client
            finally:
                trainer.stop.set()
                thread.join(timeout=60)
    assert trainer.error is None


def test_batch_metrics_say_when_they_were_taken(fit: tuple[_Fit, TrainingControlClient]) -> None:
    _, client = fit
    state = state_until(client, lambda s: s.HasField("metrics_step") and s.step >= 3)
    assert {"loss", "mae"} <= set(state.metrics)
    assert not any(k.startswith("val_") for k in state.metrics)  # batch logs have no val_*
    assert 1 <= state.metrics_step <= state.step
    assert state.HasField("metrics_time")
    taken = state.metrics_time.ToNanoseconds() / 1e9
    assert abs(taken - time.time()) < 30
    assert taken <= state.updated_time.ToNanoseconds() / 1e9 + 1e-3


def test_epoch_metrics_with_validation_are_marked(fit: tuple[_Fit, TrainingControlClient]) -> None:
    _, client = fit
    state = state_until(client, lambda s: s.HasField("epoch_metrics_epoch"))
    assert {"loss", "mae", "val_loss", "val_mae"} <= set(state.epoch_metrics)
    epoch = state.epoch_metrics_epoch
    assert epoch >= 0
    # fit ran every epoch in full: epoch N ends at step (N + 1) * steps per epoch.
    assert state.epoch_metrics_step == (epoch + 1) * STEPS_PER_EPOCH
    assert state.HasField("epoch_metrics_time")
    later = state_until(client, lambda s: s.epoch_metrics_epoch > epoch)
    assert later.epoch_metrics_step == (later.epoch_metrics_epoch + 1) * STEPS_PER_EPOCH
    assert "val_loss" in later.epoch_metrics


def test_throughput_is_reported(fit: tuple[_Fit, TrainingControlClient]) -> None:
    _, client = fit
    state = state_until(client, lambda s: s.HasField("steps_per_second"))
    assert 0 < state.steps_per_second < 1e6
    # What the figure means is tested below with an injected clock: on a shared machine no
    # wall-clock comparison is safe.


def test_throughput_is_steady_over_the_window() -> None:
    rate = Throughput()
    assert rate.observe(0, 1000.0) is None  # one sample: no span yet
    assert rate.observe(1, 1000.01) is None  # shorter than MIN_SPAN
    # 100 steps/s, published every 0.1 s, with a 2-s validation pass at each 10-s epoch end.
    step, now = 0, 1000.0
    figures: list[float] = []
    for _ in range(3):
        for _ in range(100):
            step, now = step + 10, now + 0.1
            figures.append(_figure(rate.observe(step, now)))
        now += 2.0
    # Once the window is full, the figure barely moves from one publication to the next,
    # however the validation passes fall: it is what a person reads off a clock.
    full = figures[100:]
    assert all(abs(b - a) < 0.05 * a for a, b in itertools.pairwise(full))
    assert min(full) >= 80 - 1e-6  # at worst the whole 2-s pause inside a 10-s window
    assert max(full) <= 100
    # With no pause in the last WINDOW seconds, it is exactly the training rate.
    for _ in range(int(WINDOW / 0.1) + 10):
        step, now = step + 10, now + 0.1
        last = _figure(rate.observe(step, now))
    assert last == pytest.approx(100.0)


def test_throughput_falls_while_stalled_and_restarts_after_a_restore() -> None:
    rate = Throughput()
    rate.observe(0, 0.0)
    assert rate.observe(50, 1.0) == pytest.approx(50.0)
    assert rate.observe(50, 2.0) == pytest.approx(25.0)  # no progress for a second
    # A restore moves the step back: the measurement starts over instead of going negative.
    assert rate.observe(10, 3.0) is None
    assert rate.observe(30, 4.0) == pytest.approx(20.0)


def test_throughput_history_stays_small_however_often_it_is_fed() -> None:
    rate = Throughput()
    for i in range(100_000):
        rate.observe(i, i * 0.001)
    assert len(rate._samples) <= 22
    assert rate.observe(100_000, 100.0) == pytest.approx(1000.0)


def _figure(value: float | None) -> float:
    assert value is not None
    return value


def test_no_update_shows_pre_change_metrics_as_post_change(fit: tuple[_Fit, TrainingControlClient]) -> None:
    _, client = fit
    state_until(client, lambda s: s.HasField("metrics_step"))
    seen: list[Any] = []
    done = threading.Event()

    def watch() -> None:
        with client.watch(0.0) as updates:
            for state in updates:
                seen.append(state)
                if done.is_set():
                    break

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.2)
    change = client.set_learning_rate(0.005, wait=True, reason="metrics test")
    after = state_until(client, lambda s: s.version >= change.version and s.HasField("metrics_step")
                   and s.metrics_step > change.applied_step)
    assert after.metrics
    time.sleep(0.2)
    done.set()
    watcher.join(timeout=10)
    post = [s for s in seen if s.version >= change.version]
    assert post, "the watch saw no update after the change"
    for state in post:
        if state.metrics:
            assert state.metrics_step > change.applied_step, state
        else:
            assert not state.HasField("metrics_step") and not state.HasField("metrics_time")
    # The update sent right after the change carries no pre-change loss.
    assert not post[0].metrics or post[0].metrics_step > change.applied_step


def test_controller_clears_metrics_taken_before_a_change() -> None:
    """The rule itself, on the controller with an injected clock: metrics taken at or before a
    change's step disappear when it applies; throughput comes from the publications."""
    now = [100.0]
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))), clock=lambda: now[0])
    controller.set_phase(Phase.TRAINING)
    controller.publish(step=10, learning_rate=0.1, metrics={"loss": 1.0})
    now[0] += 2.0
    controller.publish(step=30, learning_rate=0.1, metrics={"loss": 0.5}, metrics_step=30)
    snap = controller.snapshot()
    assert snap.metrics == {"loss": 0.5} and snap.metrics_step == 30 and snap.metrics_time == 102.0
    assert snap.steps_per_second == pytest.approx(10.0)
    controller.submit(ChangeRequest(PinLearningRate(0.05)))
    applied = controller.apply_due(30)
    assert applied[0].applied_step == 30
    snap = controller.snapshot()
    assert snap.metrics == {} and snap.metrics_step is None and snap.metrics_time is None
    # Late logs from before the change stay hidden; logs from after it are shown.
    controller.publish(step=31, learning_rate=0.05, metrics={"loss": 0.4}, metrics_step=30)
    assert controller.snapshot().metrics == {}
    controller.publish(step=31, learning_rate=0.05, metrics={"loss": 0.4}, metrics_step=31)
    assert controller.snapshot().metrics == {"loss": 0.4}
    controller.publish_epoch(epoch=0, metrics={"loss": 0.6, "val_loss": 0.7}, step=31)
    snap = controller.snapshot()
    assert snap.epoch_metrics == {"loss": 0.6, "val_loss": 0.7}
    assert (snap.epoch_metrics_epoch, snap.epoch_metrics_step) == (0, 31)
