"""The run's lifecycle: one `fit` is a whole run unless `control.training()` brackets several."""

from __future__ import annotations

import pytest
import tiny

from lrctl.service import Phase, TrainingControl
from lrctl.service.control.changes import ChangeRequest, ChangeStatus, PinLearningRate
from lrctl.service.errors import FailedPreconditionError


def test_a_lone_fit_is_the_whole_run() -> None:
    model = tiny.make_model(0.01)
    control = TrainingControl(model.optimizer)
    far = control.controller.submit(ChangeRequest(PinLearningRate(0.5), apply_at_step=1_000))
    tiny.fit(model, control, 10)
    snap = control.controller.snapshot()
    assert snap.phase is Phase.FINISHED and snap.step == 10
    assert [c.status for c in snap.recent if c.id == far.id] == [ChangeStatus.CANCELLED]
    with pytest.raises(FailedPreconditionError):
        control.controller.submit(ChangeRequest(PinLearningRate(0.1)))


def test_inside_training_changes_carry_over_between_fits() -> None:
    model = tiny.make_model(0.01)
    control = TrainingControl(model.optimizer)
    with control.training():
        tiny.fit(model, control, 10)
        assert control.controller.snapshot().phase is Phase.TRAINING
        # Between two fits the run still accepts changes; this one lands in the next fit.
        change = control.controller.submit(ChangeRequest(PinLearningRate(0.5), apply_at_step=15))
        recorder = tiny.fit(model, control, 10)
    applied = control.controller.wait(change, timeout=0)
    assert applied.status is ChangeStatus.APPLIED and applied.applied_step == 15
    assert [round(lr, 6) for s0, _, lr in recorder.executions() if s0 in (14, 15)] == [0.01, 0.5]
    assert control.controller.snapshot().phase is Phase.FINISHED
