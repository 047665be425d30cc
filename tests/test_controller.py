"""The controller's rules (validation, versions, idempotency, waiting, end of run) and `attach`,
against the real engine on a real Keras optimizer. The training thread's calls (`apply_due`,
`begin`) are made directly, as a custom training loop makes them."""

from __future__ import annotations

import math
import threading

import keras
import numpy as np
import pytest

from lrctl.service import TrainingControl, attach, build_optimizer
from lrctl.service.control.controller import (
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.control.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.specs import (
    ActiveSchedule,
    Constant,
    ExponentialDecay,
    Origin,
    PiecewiseConstantDecay,
    PiecewiseLinear,
    spec_from_config,
)


@pytest.fixture
def control():
    """A run at step 10, training, with no change yet."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    control.optimizer.iterations.assign(10)
    control.begin()
    return control


def lr_now(control) -> float:
    return float(np.asarray(control.optimizer.learning_rate))


BAD_REQUESTS = [
    # (request builder, message)
    (lambda: ChangeRequest(PinLearningRate(math.nan)),
     "Argument `learning_rate` must be finite and >= 0. Received: learning_rate=nan"),
    (lambda: ChangeRequest(PinLearningRate(math.inf)),
     "Argument `learning_rate` must be finite and >= 0. Received: learning_rate=inf"),
    (lambda: ChangeRequest(PinLearningRate(-1.0)),
     "Argument `learning_rate` must be finite and >= 0. Received: learning_rate=-1.0"),
    (lambda: ChangeRequest(ScaleLearningRate(0.0)),
     "Argument `scale` must be finite and > 0. Received: scale=0.0"),
    (lambda: ChangeRequest(ScaleLearningRate(-2.0)),
     "Argument `scale` must be finite and > 0. Received: scale=-2.0"),
    (lambda: ChangeRequest(ScaleLearningRate(math.nan)),
     "Argument `scale` must be finite and > 0. Received: scale=nan"),
    (lambda: ChangeRequest(SwapSchedule(ExponentialDecay(0.1, 0, 0.9))),
     "Argument `decay_steps` must be > 0. Received: decay_steps=0"),
    (lambda: ChangeRequest(SwapSchedule(spec_from_config(
        "ExponentialDecay", {"initial_learning_rate": 0.1, "decay_steps": -5, "decay_rate": 0.9}))),
     "Argument `decay_steps` must be > 0. Received: decay_steps=-5"),
    (lambda: ChangeRequest(SwapSchedule(PiecewiseConstantDecay((20, 10), (0.1, 0.01, 0.001)))),
     "Argument `boundaries` must be strictly increasing. Received: boundaries=[20, 10]"),
    (lambda: ChangeRequest(SwapSchedule(PiecewiseConstantDecay((10, 20), (0.1, 0.01)))),
     "Argument `values` must have len(boundaries) + 1 = 3 entries. Received: values=2 entries"),
    (lambda: ChangeRequest(SwapSchedule(PiecewiseLinear(tuple((i, 0.1) for i in range(65))))),
     "Argument `knots` must have 1 to 64 entries. Received: knots=65 entries"),
    (lambda: ChangeRequest(PinLearningRate(0.01), apply_at_step=-1),
     "Argument `apply_at_step` must be >= 0. Received: apply_at_step=-1"),
]


@pytest.mark.parametrize(("build", "message"), BAD_REQUESTS)
def test_bad_input_is_rejected_and_changes_nothing(control, build, message):
    before = control.controller.snapshot()
    engine_before = control.schedule.read()
    with pytest.raises(ValueError) as info:
        control.controller.submit(build())
    assert isinstance(info.value, InvalidArgumentError)
    assert str(info.value) == message
    assert control.controller.snapshot() is before  # not even republished
    assert not control.controller.has_pending
    assert control.step_boundary() == []
    assert control.schedule.read() == engine_before
    assert engine_before == (ActiveSchedule(Constant(0.1)), 0)  # as typed, not float32-rounded


def test_version_conflict_and_past_step_are_refused(control):
    controller = control.controller
    before = controller.snapshot()
    with pytest.raises(VersionConflictError) as info:
        controller.submit(ChangeRequest(PinLearningRate(0.01), expected_version=1))
    assert (info.value.expected, info.value.current) == (1, 0)
    # A step that has passed: recorded as not applied, with the reason; nothing else changes.
    missed = controller.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=9))
    assert missed.status is ChangeStatus.FAILED
    assert isinstance(missed.error, FailedPreconditionError) and missed.error.field == "apply_at_step"
    assert "apply_at_step=9 may already have passed" in str(missed.error)
    after = controller.snapshot()
    assert after.recent == (missed,) and not controller.has_pending
    assert (after.version, after.schedule) == (before.version, before.schedule)
    # The current version and the current step are fine.
    change = controller.submit(ChangeRequest(PinLearningRate(0.01), expected_version=0, apply_at_step=10))
    (applied,) = control.step_boundary()
    assert (applied.id, applied.status, applied.version, applied.applied_step) == \
        (change.id, ChangeStatus.APPLIED, 1, 10)
    with pytest.raises(VersionConflictError):
        controller.submit(ChangeRequest(PinLearningRate(0.02), expected_version=0))


def test_expected_version_is_checked_again_when_applied(control):
    controller = control.controller
    first = controller.submit(ChangeRequest(PinLearningRate(0.01), expected_version=0))
    second = controller.submit(ChangeRequest(PinLearningRate(0.02), expected_version=0))
    applied = control.step_boundary()
    assert [c.status for c in applied] == [ChangeStatus.APPLIED, ChangeStatus.ABORTED]
    assert applied[1].id == second.id and applied[1].current_version == 1
    assert applied[0].id == first.id
    assert controller.snapshot().version == 1
    assert lr_now(control) == pytest.approx(0.01)


def test_validate_only_queues_nothing(control):
    controller = control.controller
    before = controller.snapshot()
    record = controller.submit(ChangeRequest(PinLearningRate(0.5), request_id="r1"), validate_only=True)
    assert record.status is ChangeStatus.VALIDATED
    assert controller.snapshot() is before and not controller.has_pending
    assert control.step_boundary() == []
    assert lr_now(control) == pytest.approx(0.1)
    # validate_only does not reserve the request id either.
    real = controller.submit(ChangeRequest(PinLearningRate(0.5), request_id="r1"))
    assert real.status is ChangeStatus.PENDING and real.id != record.id
    with pytest.raises(ValueError):
        controller.submit(ChangeRequest(PinLearningRate(-0.5)), validate_only=True)


def test_duplicate_request_id_returns_the_first_record_and_applies_once(control):
    controller = control.controller
    first = controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="retry-me"))
    again = controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="retry-me"))
    assert again == first
    assert len(controller.snapshot().pending) == 1
    assert [c.id for c in control.step_boundary()] == [first.id]
    after = controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="retry-me"))
    assert after.id == first.id and after.status is ChangeStatus.APPLIED and after.version == 1
    assert control.step_boundary() == []
    assert controller.snapshot().version == 1
    assert lr_now(control) == pytest.approx(0.05)  # scaled once, not twice


def test_wait_returns_the_applied_record_or_times_out(control):
    controller = control.controller
    change = controller.submit(ChangeRequest(PinLearningRate(0.02), apply_at_step=12))
    with pytest.raises(WaitTimeoutError):
        controller.wait(change, timeout=0)
    control.optimizer.iterations.assign(11)
    assert control.step_boundary() == []  # not due yet
    with pytest.raises(WaitTimeoutError):
        controller.wait(change, timeout=0)

    results = []
    waiter = threading.Thread(target=lambda: results.append(controller.wait(change, timeout=None)))
    waiter.start()
    control.optimizer.iterations.assign(12)
    (applied,) = control.step_boundary()
    waiter.join()
    assert results == [applied]
    assert applied.status is ChangeStatus.APPLIED and applied.applied_step == 12
    assert applied.learning_rate_after == pytest.approx(0.02)
    assert controller.wait(change, timeout=0) == applied  # already final: no waiting


def test_ending_the_run_cancels_pending_and_rejects_new_changes(control):
    controller = control.controller
    change = controller.submit(ChangeRequest(PinLearningRate(0.02), apply_at_step=1000))
    control.end()
    assert controller.snapshot().phase is Phase.FINISHED
    assert not controller.has_pending and controller.snapshot().pending == ()
    cancelled = controller.wait(change, timeout=0)
    assert cancelled.status is ChangeStatus.CANCELLED and cancelled.version == 0
    with pytest.raises(FailedPreconditionError, match="finished"):
        controller.submit(ChangeRequest(PinLearningRate(0.03)))
    assert controller.snapshot().version == 0
    assert lr_now(control) == pytest.approx(0.1)


def test_pin_and_scale_semantics(control):
    controller = control.controller
    controller.submit(ChangeRequest(SwapSchedule(ExponentialDecay(0.2, 10, 0.5), Origin.GLOBAL)))
    controller.submit(ChangeRequest(ScaleLearningRate(0.5)))
    controller.submit(ChangeRequest(ScaleLearningRate(0.5)))
    applied = control.step_boundary()
    assert [c.version for c in applied] == [1, 2, 3]
    state, version = control.schedule.read()
    assert version == 3 and state.scale == 0.25 and state.origin is Origin.GLOBAL
    assert state.origin_step == 0
    assert lr_now(control) == pytest.approx(0.25 * 0.2 * 0.5 ** (10 / 10))
    controller.submit(ChangeRequest(PinLearningRate(0.3)))
    control.step_boundary()
    assert control.schedule.read()[0] == ActiveSchedule(Constant(0.3), Origin.RESTART, 10, 1.0)
    assert controller.snapshot().schedule == control.schedule.read()[0]
    assert lr_now(control) == pytest.approx(0.3)


# -- attach ----------------------------------------------------------------------------------


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
