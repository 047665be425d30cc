"""`attach` and `build_optimizer` on real Keras optimizers: the engine takes over the
optimizer's learning rate (a float or a Keras schedule) exactly, and refuses what it cannot."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from lrctl.service import attach, build_optimizer
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.kinds import Constant, ExponentialDecay
from lrctl.service.schedules.specs import ActiveSchedule


def test_attach_keeps_a_float_learning_rate():
    optimizer = keras.optimizers.SGD(learning_rate=0.05)
    schedule = attach(optimizer)
    assert isinstance(optimizer._learning_rate, ControllableSchedule)
    assert schedule.read() == (ActiveSchedule(Constant(0.05)), 0)  # as typed, not float32-rounded
    assert float(np.asarray(optimizer.learning_rate)) == np.float32(0.05)
    assert attach(optimizer) is schedule  # idempotent
    tracked = {id(v) for v in optimizer.variables}
    assert all(id(v) in tracked for v in schedule.variables)


def test_attach_continues_a_keras_schedule():
    keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    optimizer = keras.optimizers.Adam(learning_rate=keras_schedule)
    schedule = attach(optimizer)
    assert schedule.read()[0] == ActiveSchedule(ExponentialDecay(0.1, 10, 0.5))
    for step in (0, 7, 25):
        optimizer.iterations.assign(step)
        assert float(np.asarray(optimizer.learning_rate)) == pytest.approx(
            float(keras_schedule(step)), rel=1e-6)


def test_attach_refuses_a_built_optimizer():
    optimizer = keras.optimizers.SGD(learning_rate=0.05)
    optimizer.build([keras.Variable(np.zeros(2, np.float32))])
    with pytest.raises(ValueError, match="already been built"):
        attach(optimizer)
    assert not isinstance(optimizer._learning_rate, ControllableSchedule)


def test_attach_refuses_custom_schedules_and_callables():
    class Halving(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return 0.1 / (1.0 + keras.ops.cast(step, "float32"))

    with pytest.raises(ValueError, match=r"custom schedule \(Halving\)"):
        attach(keras.optimizers.SGD(learning_rate=Halving()))
    with pytest.raises(TypeError, match="callable"):
        attach(keras.optimizers.SGD(learning_rate=lambda: 0.1))

    class Configured(Halving):  # serialisable, but not a kind lrctl knows
        def get_config(self):
            return {}

    with pytest.raises(ValueError, match=r"custom schedule \(Configured\)"):
        attach(keras.optimizers.SGD(learning_rate=Configured()))


def test_build_optimizer():
    optimizer = build_optimizer("sgd", keras.optimizers.schedules.PolynomialDecay(0.1, 100), momentum=0.9)
    assert isinstance(optimizer, keras.optimizers.SGD) and optimizer.momentum == 0.9
    assert isinstance(optimizer._learning_rate, ControllableSchedule)
    optimizer.iterations.assign(50)
    assert float(np.asarray(optimizer.learning_rate)) == pytest.approx((0.1 - 0.0001) * 0.5 + 0.0001)
    assert isinstance(build_optimizer(keras.optimizers.Adam, 0.01), keras.optimizers.Adam)
