"""Changes reach the weights: the LR the optimizer applies is the one requested, from the step
boundary where the change was applied, under jit_compile and steps_per_execution, without
retracing.

The model (tests/tiny.py) moves its one weight by exactly the LR each step. The LRs here are
powers of two, so every sum is exact in float32.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tiny import fit, make_model, weight

from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.schedules.kinds import (
    CosineDecay,
    ExponentialDecay,
    PiecewiseConstantDecay,
    PolynomialDecay,
)
from lrctl.service.schedules.specs import Origin


@pytest.mark.parametrize("steps_per_execution", [1, 8])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_applied_lr_follows_changes_from_their_boundary(jit_compile, steps_per_execution):
    spe = steps_per_execution
    model = make_model(0.125, jit_compile=jit_compile, steps_per_execution=spe)
    control = TrainingControl(model.optimizer)
    submit = control.controller.submit
    # Steps a boundary reaches (every step, or every 8th): a change lands exactly there. One
    # that no boundary reaches fails rather than land late (tests/test_guarantees.py).
    b_swap, b_scale, b_pin = (5, 21, 37) if spe == 1 else (8, 24, 40)
    swap = submit(ChangeRequest(SwapSchedule(ExponentialDecay(0.5, 4, 0.5, staircase=True)),
                                apply_at_step=b_swap))
    scale = submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=b_scale))
    pin = submit(ChangeRequest(PinLearningRate(0.0625), apply_at_step=b_pin))

    recorder = fit(model, control, 48)

    records = {c.id: c for c in control.controller.snapshot().recent}
    assert [records[c.id].status for c in (swap, scale, pin)] == [ChangeStatus.APPLIED] * 3
    assert [records[c.id].applied_step for c in (swap, scale, pin)] == [b_swap, b_scale, b_pin]
    assert [records[c.id].version for c in (swap, scale, pin)] == [1, 2, 3]

    def expected_lr(t: int) -> float:
        if t < b_swap:
            return 0.125
        decayed = 0.5 * 0.5 ** ((t - b_swap) // 4)  # the swap restarts at its boundary
        if t < b_scale:
            return decayed
        if t < b_pin:
            return decayed * 0.5
        return 0.0625

    executions = recorder.executions()
    assert [(s0, s1) for s0, s1, _ in executions] == [(i, i + spe) for i in range(0, 48, spe)]
    for s0, s1, lr_sum in executions:
        assert lr_sum == pytest.approx(sum(expected_lr(t) for t in range(s0, s1)), rel=1e-6, abs=0), \
            f"steps {s0}..{s1 - 1}"
    assert weight(model) == pytest.approx(-sum(expected_lr(t) for t in range(48)), rel=1e-6)
    # What each record reports is what the weights saw at its boundary.
    for change in (swap, scale, pin):
        record = records[change.id]
        assert record.learning_rate_after == pytest.approx(expected_lr(record.applied_step), rel=1e-6)
    assert model.traces == 1


def test_a_hundred_swaps_never_retrace():
    """One change at each of 100 consecutive boundaries, across every kind, under XLA."""
    model = make_model(1 / 64, jit_compile=True, steps_per_execution=1)
    control = TrainingControl(model.optimizer)
    values = [(i % 7 + 1) / 64 for i in range(100)]
    actions = []
    for i, v in enumerate(values):
        actions.append([
            PinLearningRate(v),
            SwapSchedule(ExponentialDecay(v, 3, 0.5)),
            SwapSchedule(PiecewiseConstantDecay((2, 4), (v, v / 2, v / 4))),
            SwapSchedule(CosineDecay(v, 10, alpha=0.5)),
            SwapSchedule(PolynomialDecay(v, 8, end_learning_rate=0.0, power=1.0)),
        ][i % 5])
    seen = {}

    class Submitter(keras.callbacks.Callback):
        """Another actor: submits one change per batch from batch 10 on, due at once."""

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 10:
                seen["traces"], seen["function"] = model.traces, model.train_function
            if 10 <= batch < 110:
                control.controller.submit(ChangeRequest(actions[batch - 10]))

    # The submitter runs before control.callback, so each change applies at its own batch.
    recorder = fit(model, control, 112, before=[Submitter()])

    snapshot = control.controller.snapshot()
    assert snapshot.version == 100
    assert seen["traces"] == 1 and model.traces == 1
    assert model.train_function is seen["function"]
    # Each restarted schedule is at its local step 0 when it applies, where every kind is `v`.
    per_step = [lr for _, _, lr in recorder.executions()]
    np.testing.assert_allclose(per_step[:10], [1 / 64] * 10, rtol=1e-6)
    np.testing.assert_allclose(per_step[10:110], values, rtol=1e-6)
    # The last swap (a PolynomialDecay to 0 over 8 steps) then keeps decaying: steps 110, 111.
    v = values[-1]
    np.testing.assert_allclose(per_step[110:], [v * 7 / 8, v * 6 / 8], rtol=1e-6)


@pytest.mark.parametrize("origin", [Origin.RESTART, Origin.GLOBAL])
def test_seed_article_swap_at_step_25(origin):
    """A run at step 25 swaps to ExponentialDecay(0.005, 5, 0.8, staircase=True). Restarted, the
    schedule starts afresh: 0.005 at the applied step and 0.004 five steps later. With origin
    global it is evaluated from optimizer step 0, as Keras would: already decayed, lower."""
    model = make_model(0.01)
    control = TrainingControl(model.optimizer)
    spec = ExponentialDecay(0.005, 5, 0.8, staircase=True)
    change = control.controller.submit(ChangeRequest(SwapSchedule(spec, origin), apply_at_step=25))
    lrs = [lr for _, _, lr in fit(model, control, 36).executions()]
    record = control.controller.wait(change, timeout=0)
    assert record.applied_step == 25
    np.testing.assert_allclose(lrs[:25], [0.01] * 25, rtol=1e-4)
    if origin is Origin.RESTART:
        expected = [0.005] * 5 + [0.004] * 5 + [0.0032]
    else:  # Keras's own value at the global step
        keras_schedule = keras.optimizers.schedules.ExponentialDecay(0.005, 5, 0.8, staircase=True)
        expected = [float(keras_schedule(t)) for t in range(25, 36)]
        assert expected[0] == pytest.approx(0.005 * 0.8**5) and expected[0] < 0.005
    np.testing.assert_allclose(lrs[25:], expected, rtol=1e-4)
    assert record.learning_rate_after == pytest.approx(expected[0], rel=1e-6)
