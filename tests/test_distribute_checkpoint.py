"""tf.distribute (MirroredStrategy over the two logical CPUs from conftest) and checkpoints."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny import BATCH, fit, prediction_loss

from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.schedules.kinds import ExponentialDecay, PiecewiseLinear
from lrctl.service.schedules.specs import Origin


def local_values(strategy, variable) -> list[np.ndarray]:
    return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]


def test_mirrored_strategy_replicas_agree_and_apply_the_lr(mirrored):
    assert mirrored.num_replicas_in_sync == 2, "conftest should have split the CPU into two logical devices"
    strategy = mirrored
    with strategy.scope():
        model = keras.Sequential([keras.Input((1,)),
                                  keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
        # steps_per_execution > 1 under MirroredStrategy fails in Keras 3.15 itself on CPU
        # ("You must feed a value for placeholder tensor"), with or without lrctl.
        model.compile(optimizer=keras.optimizers.SGD(0.125), loss=prediction_loss)
    # Attached outside the scope: attach must put the variables under the optimizer's strategy.
    control = TrainingControl(model.optimizer)
    control.controller.submit(ChangeRequest(SwapSchedule(ExponentialDecay(0.5, 2, 0.5, staircase=True)),
                                            apply_at_step=3))
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=7))
    control.controller.submit(ChangeRequest(PinLearningRate(0.25), apply_at_step=11))
    assert BATCH % 2 == 0  # each replica gets half of every batch
    recorder = fit(model, control, 14)

    for variable in control.schedule.variables:
        replicas = local_values(strategy, variable)
        assert len(replicas) == 2, f"{variable.name} is not mirrored"
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=variable.name)
    assert int(local_values(strategy, control.schedule._version)[1]) == 3
    kernel = local_values(strategy, model.layers[0].kernel)
    np.testing.assert_array_equal(kernel[0], kernel[1])
    assert int(model.optimizer.iterations.numpy()) == 14  # one increment per global step

    def expected_lr(t: int) -> float:
        if t < 3:
            return 0.125
        if t >= 11:
            return 0.25
        return 0.5 * 0.5 ** ((t - 3) // 2) * (0.5 if t >= 7 else 1.0)

    per_step = [lr for _, _, lr in recorder.executions()]
    np.testing.assert_allclose(per_step, [expected_lr(t) for t in range(14)], rtol=1e-6)


def _build():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    control = TrainingControl(model.optimizer)  # attached before any restore
    return model, control


_X = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(64, 3)
_Y = (_X @ np.array([[0.5], [-1.0], [2.0]], np.float32)).astype(np.float32)


def _train(model, control, epochs=1):
    model.fit(_X, _Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[control.callback])


def _changed_run():
    """A model trained 16 steps with a swap (restart at step 4) and a scale (at step 12)."""
    model, control = _build()
    control.controller.submit(ChangeRequest(
        SwapSchedule(PiecewiseLinear(((0, 0.02), (10, 0.005), (100, 0.001))), Origin.RESTART),
        apply_at_step=4))
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=12))
    _train(model, control, epochs=2)
    assert int(model.optimizer.iterations.numpy()) == 16
    assert control.schedule.read()[1] == 2
    return model, control


def _lr_at(schedule, steps):
    return [float(schedule(tf.constant(s, tf.int64))) for s in steps]


def _assert_same_state(a_model, a_control, b_model, b_control):
    assert b_control.schedule.read() == a_control.schedule.read()
    assert int(b_model.optimizer.iterations.numpy()) == int(a_model.optimizer.iterations.numpy())
    steps = [0, 4, 16, 17, 60, 10**6]
    assert _lr_at(b_control.schedule, steps) == _lr_at(a_control.schedule, steps)
    for a, b in zip(a_model.weights, b_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The controller learns the restored state when training (re)starts.
    assert b_control.controller.snapshot().version == 0
    b_control.resync()
    snapshot = b_control.controller.snapshot()
    assert (snapshot.schedule, snapshot.version) == a_control.schedule.read()
    # Continuing both runs the same way gives the same weights: LR, momentum and step restored.
    _train(a_model, a_control)
    _train(b_model, b_control)
    for a, b in zip(a_model.weights, b_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert b_control.controller.snapshot().version == 2  # on_train_begin resynced too


def test_tf_train_checkpoint_round_trip(tmp_path):
    a_model, a_control = _changed_run()
    path = tf.train.Checkpoint(optimizer=a_model.optimizer, model=a_model).save(str(tmp_path / "ckpt"))

    b_model, b_control = _build()
    assert b_control.schedule.read() != a_control.schedule.read()
    status = tf.train.Checkpoint(optimizer=b_model.optimizer, model=b_model).restore(path)
    status.assert_existing_objects_matched()
    # The optimizer's slots are created (and restored) on its first step; build them now.
    b_model.optimizer.build(b_model.trainable_variables)
    _assert_same_state(a_model, a_control, b_model, b_control)


def test_save_weights_round_trip(tmp_path):
    a_model, a_control = _changed_run()
    path = str(tmp_path / "model.weights.h5")
    a_model.save_weights(path)

    b_model, b_control = _build()
    # Keras loads optimizer state from a .weights.h5 only into a built optimizer (otherwise it
    # warns and skips it); lrctl is attached first, so the variable order matches the saved one.
    b_model.optimizer.build(b_model.trainable_variables)
    b_model.load_weights(path)
    _assert_same_state(a_model, a_control, b_model, b_control)


def test_a_restored_run_keeps_accepting_changes(tmp_path):
    a_model, _ = _changed_run()
    path = str(tmp_path / "model.weights.h5")
    a_model.save_weights(path)
    b_model, b_control = _build()
    b_model.optimizer.build(b_model.trainable_variables)
    b_model.load_weights(path)
    b_control.begin()
    assert b_control.controller.snapshot().step == 16
    change = b_control.controller.submit(ChangeRequest(PinLearningRate(0.001), expected_version=2))
    (applied,) = b_control.step_boundary()
    assert applied.id == change.id
    assert applied.version == 3 and applied.applied_step == 16
    assert float(np.asarray(b_model.optimizer.learning_rate)) == pytest.approx(0.001)
