"""`.keras` files: `model.save` then lrctl.service.load_model gives back lrctl's schedule (kind,
scale, origin, origin step, version) and the optimizer's own state (step count, Adam's
moments); keras.models.load_model, which cannot restore the latter, is refused loudly."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from lrctl.service import TrainingControl, attach, build_optimizer, load_model
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.kinds import ExponentialDecay
from lrctl.service.schedules.specs import ActiveSchedule, Origin

_X = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(64, 3)
_Y = (_X @ np.array([[0.5], [-1.0], [2.0]], np.float32)).astype(np.float32)
_SWAP = ExponentialDecay(0.02, 4, 0.5)


def _train(model, control, epochs=1):
    model.fit(_X, _Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[control.callback])


def _changed_run(make_optimizer):
    """16 Adam steps; a swap restarted at step 4 and a scale at step 12 make version 2."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(optimizer=make_optimizer(), loss="mse")
    control = TrainingControl(model.optimizer)
    control.controller.submit(ChangeRequest(SwapSchedule(_SWAP, Origin.RESTART), apply_at_step=4))
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=12))
    _train(model, control, epochs=2)
    assert control.schedule.read() == (ActiveSchedule(_SWAP, Origin.RESTART, 4, 0.5), 2)
    assert int(model.optimizer.iterations.numpy()) == 16
    return model, control


def _lr_at(schedule, step):
    return float(schedule(tf.constant(step, tf.int64)))


def _slots(optimizer):
    """Adam's moments and velocities, in the optimizer's order (paths differ after a load)."""
    return [v.numpy() for v in optimizer.variables if v.name.endswith(("_momentum", "_velocity"))]


_OPTIMIZERS = {
    "float_lr_then_attached": lambda: keras.optimizers.Adam(0.01),
    "build_optimizer": lambda: build_optimizer("adam", 0.01),
}


@pytest.mark.parametrize("make_optimizer", _OPTIMIZERS.values(), ids=_OPTIMIZERS.keys())
def test_load_model_restores_schedule_and_optimizer_state(tmp_path, make_optimizer):
    a_model, a_control = _changed_run(make_optimizer)
    a_model.save(tmp_path / "m.keras")

    b_model = load_model(tmp_path / "m.keras")
    b_control = TrainingControl(b_model.optimizer)

    assert b_control.schedule.read() == a_control.schedule.read()
    assert int(b_model.optimizer.iterations.numpy()) == 16
    a_slots, b_slots = _slots(a_model.optimizer), _slots(b_model.optimizer)
    assert len(a_slots) == len(b_slots) == 8
    for a, b in zip(a_slots, b_slots, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(b_slots[0]).sum() > 0  # real moments, not fresh zeros
    for a, b in zip(a_model.weights, b_model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # The restored engine computes the same LR from the restored step on: scale * decay(t - 4).
    for step in (16, 17, 40):
        expected = 0.5 * 0.02 * 0.5 ** ((step - 4) / 4)
        assert _lr_at(b_control.schedule, step) == _lr_at(a_control.schedule, step)
        assert _lr_at(b_control.schedule, step) == pytest.approx(expected, rel=1e-6)
    b_control.begin()
    snapshot = b_control.controller.snapshot()
    assert (snapshot.step, snapshot.version) == (16, 2)
    assert snapshot.learning_rate == pytest.approx(0.5 * 0.02 * 0.5**3, rel=1e-6)

    # A further change builds on the restored version.
    pin = b_control.controller.submit(ChangeRequest(PinLearningRate(0.001), expected_version=2))
    (applied,) = b_control.step_boundary()
    assert (applied.id, applied.status) == (pin.id, ChangeStatus.APPLIED)
    assert (applied.version, applied.applied_step) == (3, 16)
    assert b_control.schedule.read()[1] == 3
    assert _lr_at(b_control.schedule, 16) == pytest.approx(0.001, rel=1e-6)


@pytest.mark.parametrize("make_optimizer", _OPTIMIZERS.values(), ids=_OPTIMIZERS.keys())
def test_training_resumes_as_if_never_saved(tmp_path, make_optimizer):
    """Same LR, step and moments: both runs continue to the same weights."""
    a_model, a_control = _changed_run(make_optimizer)
    a_model.save(tmp_path / "m.keras")
    b_model = load_model(tmp_path / "m.keras")
    b_control = TrainingControl(b_model.optimizer)

    _train(a_model, a_control)
    _train(b_model, b_control)

    assert int(b_model.optimizer.iterations.numpy()) == 24
    for a, b in zip(a_model.weights, b_model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert b_control.controller.snapshot().version == 2
    assert b_control.controller.snapshot().learning_rate == a_control.controller.snapshot().learning_rate


def test_plain_keras_load_model_is_refused_loudly(tmp_path):
    a_model, _ = _changed_run(_OPTIMIZERS["build_optimizer"])
    a_model.save(tmp_path / "m.keras")

    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        b_model = keras.models.load_model(tmp_path / "m.keras")
    assert int(b_model.optimizer.iterations.numpy()) == 0  # what Keras restored: nothing
    with pytest.raises(ValueError, match=r"lrctl\.service\.load_model\(path\)"):
        TrainingControl(b_model.optimizer)
    with pytest.raises(ValueError, match="without its saved state"):
        attach(b_model.optimizer)


def test_an_optimizer_saved_before_its_first_step_loads_with_keras(tmp_path):
    """An unbuilt optimizer holds no state but lrctl's, which the config carries whole."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=build_optimizer("adam", 0.01), loss="mse")
    control = TrainingControl(model.optimizer)
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.25)))
    control.step_boundary()
    model.save(tmp_path / "m.keras")

    with pytest.warns(UserWarning, match="Skipping variable loading"):  # nothing lost: unbuilt
        loaded = keras.models.load_model(tmp_path / "m.keras")
    assert TrainingControl(loaded.optimizer).schedule.read() == control.schedule.read()


def test_config_round_trip_keeps_the_whole_state():
    schedule = ControllableSchedule(ActiveSchedule(_SWAP, Origin.RESTART, 20_000_000, 0.375))
    schedule.load(ActiveSchedule(_SWAP, Origin.RESTART, 20_000_000, 0.375), 7)
    rebuilt = ControllableSchedule.from_config(schedule.get_config())
    assert rebuilt.read() == schedule.read() == (ActiveSchedule(_SWAP, Origin.RESTART,
                                                                20_000_000, 0.375), 7)
    assert rebuilt.saved_optimizer_layout is None  # not attached: no optimizer state to restore
    # A config from before lrctl kept the state (the spec alone) still loads.
    legacy = {"name": "lrctl", "schedule": schedule.get_config()["schedule"]}
    assert ControllableSchedule.from_config(legacy).read() == (ActiveSchedule(_SWAP), 0)
