"""Server side: fencing by run id, relative changes (apply_after_steps), and atomic
swaps (schedule_start_step and scale in one version), down to the weights (tests/live.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from fakes import MemoryTarget
from live import LiveTrainer

from lrctl.client import FailedPrecondition, InvalidArgument, TrainingControlClient, pb, schedules
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.control.controller import Controller
from lrctl.service.errors import InvalidArgumentError, RunIdMismatchError
from lrctl.service.rpc.server import serve
from lrctl.service.schedules.kinds import Constant, ExponentialDecay
from lrctl.service.schedules.specs import ActiveSchedule, Origin

_START = ActiveSchedule(Constant(0.01), Origin.RESTART, 0, 1.0)  # the engine's schedule in the controller-only tests


# -- controller (pure Python) -------------------------------------------------------------------
def test_apply_after_steps_counts_from_the_first_boundary_that_sees_the_change() -> None:
    controller = Controller(MemoryTarget(_START))
    change = controller.submit(ChangeRequest(PinLearningRate(0.5), apply_after_steps=3))
    assert change.status is ChangeStatus.PENDING and controller.snapshot().pending[0].due_key == 0
    assert controller.at_boundary(10)
    assert controller.apply_due(10) == []  # first seen at step 10: due at 13
    assert controller.snapshot().pending[0].due_key == 13
    assert controller.apply_due(12) == []
    [applied] = controller.apply_due(13)
    assert applied.status is ChangeStatus.APPLIED and applied.applied_step == 13
    assert applied.due_step == 13 and controller.engine_state[1] == 1


def test_apply_after_zero_steps_applies_at_the_first_boundary() -> None:
    controller = Controller(MemoryTarget(_START))
    controller.submit(ChangeRequest(ScaleLearningRate(2.0), apply_after_steps=0))
    [applied] = controller.apply_due(7)
    assert applied.applied_step == 7


@pytest.mark.parametrize(("request_", "field"), [
    (ChangeRequest(PinLearningRate(0.1), apply_at_step=5, apply_after_steps=1), "apply_after_steps"),
    (ChangeRequest(PinLearningRate(0.1), apply_after_steps=-1), "apply_after_steps"),
    (ChangeRequest(SwapSchedule(Constant(0.1), Origin.GLOBAL, start_step=3)), "schedule_start_step"),
    (ChangeRequest(SwapSchedule(Constant(0.1), start_step=-1)), "schedule_start_step"),
    (ChangeRequest(SwapSchedule(Constant(0.1), scale=0.0)), "scale"),
    (ChangeRequest(SwapSchedule(Constant(0.1), scale=math.inf)), "scale"),
    (ChangeRequest(PinLearningRate(0.1), expected_run_id="x" * 129), "expected_run_id"),
])
def test_bad_relative_or_atomic_requests_are_invalid(request_: ChangeRequest, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        Controller(MemoryTarget(_START)).submit(request_)
    assert info.value.field == field


def test_swap_with_start_step_and_scale_is_one_version() -> None:
    controller = Controller(MemoryTarget(_START))
    spec = ExponentialDecay(0.1, 10, 0.5)
    controller.submit(ChangeRequest(SwapSchedule(spec, start_step=40, scale=0.25)))
    [applied] = controller.apply_due(100)
    assert applied.version == 1
    assert applied.schedule_after == ActiveSchedule(spec, Origin.RESTART, 60, 0.25)
    assert math.isclose(applied.learning_rate_after or 0, 0.25 * 0.1 * 0.5 ** 4, rel_tol=1e-6)


def test_a_mismatched_run_id_is_refused_in_process() -> None:
    controller = Controller(MemoryTarget(_START), run_id="current")
    with pytest.raises(RunIdMismatchError):
        controller.submit(ChangeRequest(PinLearningRate(0.1), expected_run_id="old"))
    change = controller.submit(ChangeRequest(PinLearningRate(0.1), request_id="a", expected_run_id="current"))
    assert change.status is ChangeStatus.PENDING
    with pytest.raises(RunIdMismatchError):
        controller.cancel(request_id="a", expected_run_id="old")
    assert controller.cancel(request_id="a", expected_run_id="current").status is ChangeStatus.CANCELLED


# -- gRPC: fencing across a restart ------------------------------------------------------------
def _assert_fenced(error: FailedPrecondition, current: str) -> None:
    assert error.reason == "RUN_ID_MISMATCH"
    assert error.metadata["current_run_id"] == current


def test_a_controller_fenced_to_the_old_run_is_refused_after_a_restart() -> None:
    old = LiveTrainer(run_id="run-old")
    with serve(old.control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=30) as client:
        state = client.get_state()
        assert state.run_id == "run-old"
        fenced: dict = {"expected_run_id": state.run_id, "expected_version": state.version}
        assert client.set_learning_rate(0.02, **fenced).status == pb.CHANGE_STATUS_PENDING

    # The trainer restarts as a new run: the version starts again at 0, so the stale
    # controller's expected_version matches; only the run id tells the runs apart.
    new = LiveTrainer(run_id="run-new")
    with serve(new.control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=30) as client:
        assert client.get_state().version == state.version
        calls = [
            lambda: client.set_learning_rate(0.02, **fenced),
            lambda: client.set_learning_rate(0.02, validate_only=True, **fenced),
            lambda: client.scale_learning_rate(0.5, **fenced),
            lambda: client.swap_schedule(schedules.Constant(0.03), **fenced),
            lambda: client.cancel_change(request_id="any", expected_run_id=state.run_id),
        ]
        for call in calls:
            with pytest.raises(FailedPrecondition) as info:
                call()
            _assert_fenced(info.value, "run-new")
        assert client.get_state().pending_count == 0
        # Fenced to the new run, the same request goes through.
        change = client.set_learning_rate(0.02, expected_run_id="run-new", expected_version=0)
        assert change.status == pb.CHANGE_STATUS_PENDING


# -- live: relative changes and copying a schedule between trainers ------------------------------
@pytest.fixture(scope="module")
def trainer_a() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


@pytest.fixture(scope="module")
def trainer_b() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


def _close(a: float, b: float) -> bool:  # float32 resolution at the weights' scale (w ~ 1)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=2e-7)


def test_apply_after_steps_lands_where_the_change_says(trainer_a: LiveTrainer) -> None:
    with TrainingControlClient(trainer_a.target, timeout=60) as client:
        client.set_learning_rate(0.01, wait=True)
        change = client.set_learning_rate(0.03, apply_after_steps=5, wait=True)
        assert change.status == pb.CHANGE_STATUS_APPLIED and change.apply_after_steps == 5
        assert change.applied_step == change.apply_at_step >= change.requested_step + 5
        assert _close(trainer_a.lr_at(change.applied_step), 0.03)
        assert _close(trainer_a.lr_at(change.applied_step - 1), 0.01)
        with pytest.raises(InvalidArgument):
            client.set_learning_rate(0.03, apply_after_steps=5, apply_at_step=10**6)


KINDS = {
    "Constant": schedules.Constant(0.02),
    "ExponentialDecay": schedules.ExponentialDecay(0.05, 20, 0.7),
    "PiecewiseConstantDecay": schedules.PiecewiseConstantDecay(
        [5, 20, 60, 150, 400, 1000], [0.05, 0.04, 0.03, 0.02, 0.01, 0.005, 0.001]),
    "PolynomialDecay": schedules.PolynomialDecay(0.05, 3000, 0.001, power=2.0),
    "InverseTimeDecay": schedules.InverseTimeDecay(0.05, 30, 0.5),
    "CosineDecay": schedules.CosineDecay(0.05, 3000, alpha=0.1),
    "CosineDecayRestarts": schedules.CosineDecayRestarts(0.05, 40, t_mul=1.5, m_mul=0.9),
    "PiecewiseLinear": schedules.PiecewiseLinear([(0, 0.0), (50, 0.05), (3000, 0.001)]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_copying_trainer_b_to_a_is_one_request(trainer_a: LiveTrainer, trainer_b: LiveTrainer,
                                               kind: str) -> None:
    with TrainingControlClient(trainer_a.target, timeout=60) as a, \
            TrainingControlClient(trainer_b.target, timeout=60) as b:
        b.swap_schedule(KINDS[kind], wait=True)
        b.scale_learning_rate(0.5, wait=True)
        trainer_b.wait_for_step(b.get_state().step + 25)  # B's local step moves on
        source = b.get_state()
        local = source.step - source.schedule_origin_step
        assert local > 0 and source.scale == 0.5
        change = a.swap_schedule(source.schedule, schedule_start_step=local, scale=source.scale,
                                 wait=True)
        assert change.status == pb.CHANGE_STATUS_APPLIED and change.schedule_start_step == local
        assert change.scale_after == source.scale
        for k in (0, 1, 7, 30):
            assert _close(trainer_a.lr_at(change.applied_step + k), trainer_b.lr_at(source.step + k)), k


# -- watch triggers (item 4) ---------------------------------------------------------------------
def test_watch_triggers_send_on_steps_and_epochs_and_skip_time_updates() -> None:
    controller = Controller(MemoryTarget(_START))
    with serve(controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=30) as client, \
            client.watch(3600.0, timeout=60, every_steps=10, on_epoch_end=True,
                         changes_only=True) as stream:
        updates = iter(stream)
        assert next(updates).step == 0
        controller.publish(step=5, learning_rate=0.01)
        controller.publish(step=12, learning_rate=0.01)
        assert next(updates).step == 12  # 12 steps past the last update sent
        controller.publish(step=14, learning_rate=0.01, epoch=1)
        assert next(updates).epoch == 1
        controller.publish(step=15, learning_rate=0.01)
        controller.submit(ChangeRequest(PinLearningRate(0.5)))
        controller.apply_due(16)
        snap = next(updates)
        assert (snap.step, snap.version) == (16, 1)


def test_watch_rejects_a_negative_every_steps() -> None:
    with serve(Controller(MemoryTarget(_START)), "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=30) as client:
        with pytest.raises(InvalidArgument), client.watch(every_steps=-1) as updates:
            next(iter(updates))
        with client.watch(0.01, changes_only=True) as updates:
            assert next(iter(updates)).version == 0
