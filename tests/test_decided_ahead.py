"""Decisions made one exchange ahead (the pipelined multi-worker exchange, `Boundaries.lead`),
as the controller sees them, pure Python on tests/fakes.py's MemoryTarget: a step already
decided for is missed, never reopened by a publish, and a checkpoint taken between a decision
and its load carries what the engine ran and the decided change as a replay at its step.
The two-process job itself is tests/test_multiworker.py."""

from __future__ import annotations

from fakes import MemoryTarget

from lrctl.service.control.changes import (
    Boundaries,
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
)
from lrctl.service.control.controller import Controller
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.specs import ActiveSchedule


def _controller(target: MemoryTarget, step: int) -> Controller:
    controller = Controller(target)
    controller.set_boundaries(Boundaries(0, 1, lead=1))
    controller.set_phase(Phase.TRAINING)
    controller.publish(step=step, learning_rate=0.1)
    return controller


def test_a_step_decided_for_is_missed_and_a_publish_does_not_reopen_it() -> None:
    target = MemoryTarget(ActiveSchedule(Constant(0.1)))
    controller = _controller(target, 10)
    exact = controller.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=11))
    # At the boundary before step 10, the chief decides for step 11.
    assert controller.at_boundary(11)
    (applied,) = controller.apply_due(11)
    assert (applied.id, applied.status, applied.applied_step) == (exact.id, ChangeStatus.APPLIED, 11)
    controller.publish(step=10, learning_rate=0.1)  # the step that runs next is still 10
    late = controller.submit(ChangeRequest(PinLearningRate(0.02), apply_at_step=11))
    assert late.status is ChangeStatus.FAILED and late.error is not None
    assert "apply_at_step=11" in str(late.error)
    ahead = controller.submit(ChangeRequest(PinLearningRate(0.03), apply_at_step=12))
    assert ahead.status is ChangeStatus.PENDING


def test_a_checkpoint_between_a_decision_and_its_load_replays_it_at_its_step() -> None:
    target = MemoryTarget(ActiveSchedule(Constant(0.1)))
    controller = _controller(target, 20)
    held = target.read()
    change = controller.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=21))
    assert controller.at_boundary(21)
    (applied,) = controller.apply_due(21)
    controller.set_engine_behind(held)  # decided, loaded by every worker at step 21 only
    saved = controller.export_state(20)
    assert (saved["version"], saved["replay"]) == (0, [change.id])
    controller.set_engine_behind(None)  # loaded: a checkpoint now holds it in force
    assert controller.export_state(21)["version"] == 1 and controller.export_state(21)["replay"] == []

    resumed_target = MemoryTarget(ActiveSchedule(Constant(0.1)))
    resumed = _controller(resumed_target, 20)
    resumed.import_state(saved)
    assert not resumed.at_boundary(20)  # nothing lands at the checkpoint's own step
    assert resumed.at_boundary(21)
    resumed.apply_due(21)
    assert resumed_target.read() == (applied.schedule_after, applied.version)
    assert resumed.snapshot().version == applied.version
