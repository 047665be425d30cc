"""Run actions in the pure controller (no TensorFlow): versions, ordering at one boundary,
the pause and its timeout, a stop that cancels what is pending, a failed save, and their
records through the checkpoint JSON and the write-ahead log."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fakes import MemoryTarget

from lrctl.service.control import persistence
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    LoadCheckpoint,
    PauseTraining,
    Phase,
    PinLearningRate,
    ResumeTraining,
    SaveCheckpoint,
    StopTraining,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.targets import RunResult
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.specs import ActiveSchedule


class FakeRun:
    """A RunTarget that records what it was asked to do; `fail_save` makes saves raise."""

    checkpoint_dir: str | None = "ckpts"
    checkpoint_root: Path | None = None
    multi_worker = False

    def __init__(self) -> None:
        self.saves: list[int] = []
        self.stops: list[int] = []
        self.fail_save = False

    def save_checkpoint(self, step: int) -> RunResult:
        if self.fail_save:
            raise OSError(28, "No space left on device")
        self.saves.append(step)
        return RunResult(checkpoint_path=f"ckpts/ckpt-{step}.weights.h5", checkpoint_step=step)

    def load_checkpoint(self, action: LoadCheckpoint, step: int) -> RunResult:
        raise AssertionError("not in these tests")

    def stop(self, step: int) -> None:
        self.stops.append(step)


def _controller() -> tuple[Controller, FakeRun]:
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))))
    controller.run_target = run = FakeRun()
    controller.set_phase(Phase.TRAINING)
    return controller, run


def test_run_actions_are_versions_applied_in_order_at_one_boundary() -> None:
    controller, run = _controller()
    pin = controller.submit(ChangeRequest(PinLearningRate(0.5)))
    save = controller.submit(ChangeRequest(SaveCheckpoint()))
    pause = controller.submit(ChangeRequest(PauseTraining(60)))
    finals = {c.id: c for c in controller.apply_due(7)}
    assert [finals[c.id].version for c in (pin, save, pause)] == [1, 2, 3]
    assert finals[save.id].checkpoint_path == "ckpts/ckpt-7.weights.h5" and run.saves == [7]
    assert finals[pause.id].learning_rate_after == pytest.approx(0.5)
    snap = controller.snapshot()
    assert snap.phase is Phase.PAUSED and snap.paused_until is not None and snap.version == 3
    resume = controller.submit(ChangeRequest(ResumeTraining()))
    assert controller.wait_paused(7)  # something is due at the paused step
    assert controller.apply_due(7)[0].id == resume.id
    assert controller.snapshot().phase is Phase.TRAINING and controller.snapshot().paused_until is None
    assert not controller.wait_paused(7)


def test_a_failed_save_fails_its_change_takes_no_version_and_training_goes_on() -> None:
    controller, run = _controller()
    run.fail_save = True
    save = controller.submit(ChangeRequest(SaveCheckpoint()))
    pin = controller.submit(ChangeRequest(PinLearningRate(0.5)))
    finals = {c.id: c for c in controller.apply_due(3)}
    assert finals[save.id].status is ChangeStatus.FAILED and "No space left" in str(finals[save.id].error)
    assert finals[pin.id].version == 1 and controller.snapshot().phase is Phase.TRAINING


def test_a_pause_times_out_and_a_shutdown_ends_it() -> None:
    controller, _ = _controller()
    controller.submit(ChangeRequest(PauseTraining(0.05)))
    controller.apply_due(2)
    assert controller.paused
    assert not controller.wait_paused(2)  # returns once the timeout passed
    assert controller.snapshot().phase is Phase.TRAINING
    controller.submit(ChangeRequest(PauseTraining(3600)))
    controller.apply_due(2)
    waiter = threading.Thread(target=controller.wait_paused, args=(2,))
    waiter.start()
    controller.shut_down()  # a signal handler's flag: seen within PAUSE_POLL
    waiter.join(60)
    assert not waiter.is_alive() and controller.snapshot().phase is Phase.TRAINING


def test_a_stop_cancels_pending_and_later_due_changes_with_its_reason() -> None:
    controller, run = _controller()
    stop = controller.submit(ChangeRequest(StopTraining(), reason="pruned", apply_at_step=5))
    same_step = controller.submit(ChangeRequest(PinLearningRate(0.3), apply_at_step=5))
    later = controller.submit(ChangeRequest(PinLearningRate(0.2), apply_at_step=50))
    finals = {c.id: c for c in controller.apply_due(5)}
    assert finals[stop.id].status is ChangeStatus.APPLIED and run.stops == [5]
    for change in (same_step, later):
        record = controller.get_change(change.id)
        assert record.status is ChangeStatus.CANCELLED and str(record.error) == "cancelled: pruned"
    assert controller.snapshot().phase is Phase.FINISHED and controller.stopped_step == 5
    with pytest.raises(FailedPreconditionError):
        controller.submit(ChangeRequest(ResumeTraining()))
    state = controller.export_state(5)
    assert state["stopped_step"] == 5
    restarted = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))))
    restarted.import_state(state)
    assert restarted.stopped_step == 5


def test_run_actions_round_trip_through_the_checkpoint_json() -> None:
    controller, _ = _controller()
    for action in (PauseTraining(90.5), ResumeTraining(), SaveCheckpoint(), StopTraining(),
                   LoadCheckpoint("member-2", load_hyperparameters=True)):
        request = ChangeRequest(action, request_id=f"r-{type(action).__name__}")
        assert persistence.action_from_json(persistence.action_to_json(action)) == action
        record = persistence.change_from_json(persistence.change_to_json(
            controller.submit(request, validate_only=True) if not isinstance(action, LoadCheckpoint)
            else _applied_load(request)))
        assert record.request == request
    loaded = persistence.change_from_json(persistence.change_to_json(_applied_load(
        ChangeRequest(LoadCheckpoint("m")))))
    assert (loaded.checkpoint_path, loaded.checkpoint_step, loaded.checkpoint_run_id) == ("m/ckpt-4.weights.h5", 4, "run-b")


def _applied_load(request: ChangeRequest):  # type: ignore[no-untyped-def]
    from lrctl.service.control.changes import Change

    return Change(id=9, request=request, status=ChangeStatus.APPLIED, requested_step=1,
                  requested_time=0.0, version=3, applied_step=2,
                  checkpoint_path="m/ckpt-4.weights.h5", checkpoint_step=4, checkpoint_run_id="run-b")


def test_pause_timeout_and_capabilities_are_checked_on_arrival() -> None:
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))))
    controller.set_phase(Phase.TRAINING)
    for timeout in (0.0, -1.0, 7 * 24 * 3600 + 1, float("nan")):
        with pytest.raises(InvalidArgumentError) as e:
            controller.submit(ChangeRequest(PauseTraining(timeout)))
        assert e.value.field == "timeout"
    with pytest.raises(FailedPreconditionError, match="--checkpoint-dir"):
        controller.submit(ChangeRequest(SaveCheckpoint()))
    with pytest.raises(InvalidArgumentError) as e:
        controller.submit(ChangeRequest(LoadCheckpoint("")))
    assert e.value.field == "path"


def test_a_multi_worker_job_refuses_pause_and_load_but_saves_and_stops() -> None:
    """The chief alone applies changes: a pause would leave the followers in the exchange's
    collective, a load would give the chief other weights. Refused on arrival, nothing queued."""
    controller, run = _controller()
    run.multi_worker = True
    run.checkpoint_root = Path("/")
    for action in (PauseTraining(60), LoadCheckpoint("a")):
        with pytest.raises(FailedPreconditionError, match="not supported in a multi-worker job"):
            controller.submit(ChangeRequest(action))
    assert controller.snapshot().pending_count == 0
    controller.submit(ChangeRequest(SaveCheckpoint()))
    controller.submit(ChangeRequest(StopTraining()))
    assert controller.snapshot().pending_count == 2
