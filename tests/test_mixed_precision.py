"""Mixed precision: compile() wraps the optimizer in a LossScaleOptimizer, which never reads its
own learning rate. lrctl's schedule must go on the inner optimizer, which applies the updates,
or a pinned LR is reported while the weights move at another.

The model (tests/tiny.py) moves its one float32 weight by exactly the LR each step: the
gradient is 1, scaled by a power of two and unscaled exactly. The LRs are powers of two.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tiny import BATCH, WeightRecorder, fit, make_model, prediction_loss, weight

from lrctl.service import TrainingControl, load_model
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.schedules.kinds import ExponentialDecay
from lrctl.service.schedules.specs import Origin


@pytest.fixture(autouse=True)
def mixed_float16(request):
    keras.mixed_precision.set_global_policy("mixed_float16")
    request.addfinalizer(lambda: keras.mixed_precision.set_global_policy("float32"))


def _records(control):
    return {c.id: c for c in control.controller.snapshot().recent}


def test_the_schedule_goes_on_the_inner_optimizer():
    model = make_model(0.125)
    wrapper = model.optimizer
    assert isinstance(wrapper, keras.optimizers.LossScaleOptimizer)
    control = TrainingControl(wrapper)
    inner = wrapper.inner_optimizer
    assert inner._learning_rate is control.schedule
    ours = {id(v) for v in control.schedule.variables}
    assert ours <= {id(v) for v in inner.variables} and ours <= {id(v) for v in wrapper.variables}
    assert not ours & {id(v) for v in wrapper._variables}  # tracked once, by the inner optimizer


def test_a_pinned_lr_is_the_lr_the_weights_move_by():
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    pin = control.controller.submit(ChangeRequest(PinLearningRate(0.5), apply_at_step=4))

    recorder = fit(model, control, 8)

    record = _records(control)[pin.id]
    assert (record.status, record.applied_step) == (ChangeStatus.APPLIED, 4)
    per_step = [lr for _, _, lr in recorder.executions()]
    assert per_step == [0.125] * 4 + [0.5] * 4  # measured from the weight
    assert record.learning_rate_after == 0.5  # reported
    snapshot = control.controller.snapshot()
    assert (snapshot.step, snapshot.learning_rate) == (8, 0.5)


def test_swap_and_scale_reach_the_weights():
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    submit = control.controller.submit
    swap = submit(ChangeRequest(SwapSchedule(ExponentialDecay(0.5, 2, 0.5, staircase=True),
                                             Origin.RESTART), apply_at_step=3))
    scale = submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=7))

    recorder = fit(model, control, 10)

    def expected_lr(t: int) -> float:
        if t < 3:
            return 0.125
        return 0.5 * 0.5 ** ((t - 3) // 2) * (0.5 if t >= 7 else 1.0)

    assert [lr for _, _, lr in recorder.executions()] == [expected_lr(t) for t in range(10)]
    records = _records(control)
    for change, step in ((swap, 3), (scale, 7)):
        assert records[change.id].applied_step == step
        assert records[change.id].learning_rate_after == expected_lr(step)
    assert weight(model) == -sum(expected_lr(t) for t in range(10))


def test_a_skipped_step_is_not_a_step():
    """On non-finite gradients the LossScaleOptimizer skips the update and does not count the
    step; lrctl's step (the optimizer's `iterations`, the inner one's) agrees."""
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    pin = control.controller.submit(ChangeRequest(PinLearningRate(0.5), apply_at_step=4))
    x = np.ones((8 * BATCH, 1), np.float32)
    x[2 * BATCH: 3 * BATCH] = 1e5  # inf in float16: batch 2's gradient is not finite
    recorder = WeightRecorder()
    model.fit(x, np.zeros_like(x), batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[control.callback, recorder])

    executions = recorder.executions()
    assert [(s0, s1) for s0, s1, _ in executions] == [(0, 1), (1, 2), (2, 2), (2, 3), (3, 4),
                                                      (4, 5), (5, 6), (6, 7)]
    assert [lr for _, _, lr in executions] == [0.125, 0.125, 0.0, 0.125, 0.125, 0.5, 0.5, 0.5]
    assert _records(control)[pin.id].applied_step == 4
    assert control.controller.snapshot().step == 7
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15 / 2  # halved once


@pytest.mark.parametrize("attach_first", [False, True], ids=["wrapper", "inner_before_compile"])
def test_keras_file_round_trip_keeps_the_loss_scale(tmp_path, attach_first):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False,
                                                                    kernel_initializer="zeros")])
    optimizer = keras.optimizers.Adam(0.125)
    control = TrainingControl(optimizer) if attach_first else None  # compile() wraps it later
    model.compile(optimizer=optimizer, loss=prediction_loss)
    control = control or TrainingControl(model.optimizer)
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=2))
    x = np.ones((4 * BATCH, 1), np.float32)
    x[BATCH: 2 * BATCH] = 1e5  # one skipped step: the loss scale is no longer the initial one
    model.fit(x, np.zeros_like(x), batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[control.callback])
    model.save(tmp_path / "m.keras")

    loaded = load_model(tmp_path / "m.keras", custom_objects={"prediction_loss": prediction_loss})
    assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(loaded.optimizer.dynamic_scale.numpy()) == 2.0**14
    assert int(loaded.optimizer.iterations.numpy()) == 3
    assert TrainingControl(loaded.optimizer).schedule.read() == control.schedule.read()
    assert float(np.asarray(loaded.optimizer.learning_rate)) == 0.0625
