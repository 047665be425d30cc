"""revert_on_nan: a change whose first steps make the loss NaN or Inf is undone with the weights.

The model: one weight `w` (1 at the start), input 1, loss w². SGD with momentum trains it
smoothly at lr 0.05; at lr 1e30 the first step throws `w` to ~1e30 and the next loss, ~1e60,
overflows float32 to inf, then NaN. Real `model.fit`, the real server and client, real
TensorFlow throughout. Without the revert every assertion on finite values fails.
"""

from __future__ import annotations

import gc
import math
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from lrctl.client import TrainingControlClient, pb
from lrctl.service import TrainingControl
from lrctl.service.control.changes import ChangeRequest, ChangeStatus, PinLearningRate
from lrctl.service.rpc.convert import spec_to_proto
from lrctl.service.rpc.server import serve

LR = 0.05
HUGE = 1e30
BATCH = 4


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss=lambda y, p: ops.square(ops.squeeze(p, -1)))
    return model


def _weight(model: keras.Model) -> float:
    return float(np.asarray(model.layers[0].kernel.numpy()).reshape(()))


def _velocity(optimizer: keras.optimizers.Optimizer) -> float:
    if not optimizer.built:  # fit builds it inside the first step: the momentum starts at 0
        return 0.0
    return float(np.asarray(optimizer.momentums[0].numpy()).reshape(()))


class _Probe(keras.callbacks.Callback):
    """After lrctl's callback, at each boundary: the step, `w`, the momentum, whether a window
    is open; and every batch's logged loss. Not async-safe: Keras runs it all in order."""

    def __init__(self, control: TrainingControl | None = None) -> None:
        super().__init__()
        self._control = control
        self.boundaries: dict[int, tuple[float, float, bool]] = {}
        self.after: dict[int, tuple[float, float]] = {}  # step -> (w, logged loss) after it
        self.window: weakref.ReferenceType | None = None

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        guard = self._control.divergence if self._control is not None else None
        watching = guard is not None and guard.watching
        if watching and self.window is None:
            self.window = weakref.ref(guard.window)
        self.boundaries[step] = (_weight(self.model), _velocity(self.model.optimizer), watching)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.after[step] = (_weight(self.model), logs["loss"])


def _fit(model: keras.Model, callbacks: list, steps_per_epoch: int, epochs: int) -> keras.callbacks.History:
    x = np.ones((steps_per_epoch * BATCH, 1), "float32")
    return model.fit(x, np.zeros_like(x), batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks)


# (step the change applies at, step whose loss is inf, where it is seen): 2 epochs of 5 steps.
@pytest.mark.parametrize(("change_at", "revert_at"), [(1, 3), (3, 5)],
                         ids=["seen-at-a-batch-boundary", "seen-at-the-epoch-end"])
def test_a_change_that_makes_the_loss_nan_is_reverted_with_the_weights(change_at, revert_at) -> None:
    reference = _Probe()  # the same run without any change
    _fit(_model(), [reference], steps_per_epoch=5, epochs=2)

    model = _model()
    control = TrainingControl(model.optimizer, revert_on_nan=4)
    before, _ = control.schedule.read()
    probe = _Probe(control)
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        pin = client.set_learning_rate(HUGE, apply_at_step=change_at, reason="too bold")
        history = _fit(model, [control.callback, probe], steps_per_epoch=5, epochs=2)
        state = client.get_state()
        watched = list(client.watch(min_interval=0.0, timeout=60))  # the run is over: final state

    # The revert is an applied change, a new version, with the reason, in GetState and WatchState.
    for recent in (state.recent_changes, watched[-1].recent_changes):
        pinned, reverted = recent[-2:]
        assert pinned.request_id == pin.request_id and pinned.version == 1
        assert pinned.applied_step == change_at
        assert reverted.status == pb.CHANGE_STATUS_APPLIED and reverted.version == 2
        assert reverted.applied_step == revert_at
        assert reverted.reason.startswith(
            f"auto-revert: loss was inf at step {revert_at}, within 4 steps of v1")
        assert reverted.learning_rate_after == pytest.approx(LR)
        assert reverted.schedule.WhichOneof("kind") == "constant"
        # Recorded as what it is: a revert to the exact schedule, origin and scale before v1.
        assert reverted.WhichOneof("action") == "revert", reverted
        assert reverted.revert.schedule == spec_to_proto(before.spec)
        assert (reverted.revert.schedule_origin_step, reverted.revert.scale) == (before.origin_step, before.scale)
        assert reverted.description.startswith("revert to ")
    assert state.version == 2 and state.learning_rate == pytest.approx(LR)
    assert state.guardrails.revert_on_nan_steps == 4  # the guard is reported in the state
    (auto,) = [c for c in control.controller.snapshot().recent if c.version == 2]
    assert auto.status is ChangeStatus.APPLIED and auto.request.reason.startswith("auto-revert:")
    # The previous schedule is back in the engine, at the new version.
    engine_state, engine_version = control.schedule.read()
    assert engine_version == 2 and engine_state == before
    assert float(control.engine.learning_rate(10)) == pytest.approx(LR)

    # The divergence happened, then the weights and the momentum came back exactly as they were
    # at the change's boundary, and training went on from there at the old LR: the reference
    # run's trajectory from that point, step for step.
    assert not math.isfinite(probe.after[revert_at][1])
    assert probe.boundaries[revert_at][:2] == probe.boundaries[change_at][:2]
    for step in range(revert_at + 1, 11):
        w, loss = probe.after[step]
        assert math.isfinite(loss) and math.isfinite(w)
        assert w == pytest.approx(reference.after[change_at + step - revert_at][0], rel=1e-6)
    # The step counter moved forward all along. A revert inside an epoch restarts its metrics
    # (else its mean loss would stay inf); an epoch that ended diverged was reported so.
    assert int(model.optimizer.iterations.numpy()) == 10
    ended_diverged = revert_at == 5
    assert [math.isfinite(loss) for loss in history.history["loss"]] == [not ended_diverged, True]
    assert control.divergence is not None and control.divergence.window is None


def test_the_window_closes_after_k_finite_steps_and_frees_the_snapshot() -> None:
    model = _model()
    control = TrainingControl(model.optimizer, revert_on_nan=3)
    before, _ = control.schedule.read()
    probe = _Probe(control)
    control.controller.submit(ChangeRequest(PinLearningRate(0.04), apply_at_step=2))
    _fit(model, [control.callback, probe], steps_per_epoch=8, epochs=1)
    guard = control.divergence
    assert guard is not None
    # Open at the change's boundary (step 2) and the two after it; closed at step 5 = 2 + 3.
    assert [s for s, (_, _, watching) in sorted(probe.boundaries.items()) if watching] == [2, 3, 4]
    # The loss was read only inside the window (at steps 3, 4 and 5), never outside it.
    assert guard.snapshots == 1 and guard.checks == 3
    gc.collect()
    assert probe.window is not None and probe.window() is None  # the host copy is gone
    (change,) = control.controller.snapshot().recent
    assert change.version == 1 and change.request.action == PinLearningRate(0.04)
    assert control.schedule.read()[1] == 1 and control.schedule.read()[0] != before


@pytest.mark.parametrize("off", [None, 0])
def test_without_revert_on_nan_nothing_is_snapshotted_and_the_nan_stays(off) -> None:
    model = _model()
    control = TrainingControl(model.optimizer, revert_on_nan=off)
    assert control.divergence is None  # no guard: no snapshot, no loss read, ever
    probe = _Probe(control)
    control.controller.submit(ChangeRequest(PinLearningRate(HUGE), apply_at_step=1))
    _fit(model, [control.callback, probe], steps_per_epoch=6, epochs=1)
    assert not any(watching for _, _, watching in probe.boundaries.values())
    assert not math.isfinite(_weight(model))  # pinning a sane LR back would not help now
    assert [c.version for c in control.controller.snapshot().recent] == [1]


@pytest.mark.parametrize("given", ["model", "variables"])
def test_a_custom_loop_is_reverted_too(given) -> None:
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    optimizer = keras.optimizers.SGD(LR, momentum=0.9)
    weights = {"model": {"model": model}, "variables": {"variables": model.weights}}[given]
    control = TrainingControl(optimizer, revert_on_nan=3, **weights)
    x = tf.ones((BATCH, 1))

    @tf.function
    def train_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    # At step 0 the optimizer is not built yet: its momentum must be snapshotted all the same.
    control.controller.submit(ChangeRequest(PinLearningRate(HUGE), apply_at_step=0))
    weights_at: dict[int, tuple[float, float]] = {}
    losses: list[float] = []
    loss = None
    with control.training():
        for _ in range(8):
            control.step_boundary(None if loss is None else {"loss": loss})
            weights_at[control.step] = (_weight(model), _velocity(optimizer))
            loss = train_step()
            losses.append(float(loss))
    # Step 1 ran at 1e30, step 2's loss was inf: reverted at step 2 to the state of step 0.
    assert not math.isfinite(losses[1])
    assert weights_at[2] == weights_at[0] == (1.0, 0.0)
    assert all(math.isfinite(v) for v in losses[2:]) and math.isfinite(_weight(model))
    (auto,) = [c for c in control.controller.snapshot().recent if c.version == 2]
    assert auto.applied_step == 2 and auto.request.reason.startswith(
        "auto-revert: loss was inf at step 2, within 3 steps of v1")
    assert control.controller.snapshot().learning_rate == pytest.approx(LR)


def test_a_custom_loop_must_say_what_to_snapshot() -> None:
    control = TrainingControl(keras.optimizers.SGD(LR), revert_on_nan=3)
    with pytest.raises(ValueError, match="model="):
        control.step_boundary()
    with pytest.raises(ValueError, match="positive"):
        TrainingControl(keras.optimizers.SGD(LR), revert_on_nan=-1)
