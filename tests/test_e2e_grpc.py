"""End to end: the real client talks to the real server inside a real `model.fit`.

Each change is checked against the learning rate the optimizer actually applied to the
weights at the reported `applied_step` (see tests/live.py).
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator

import grpc
import keras
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from live import LiveTrainer, wait_for_health

from lrctl.client import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    TrainingControlClient,
    VersionConflict,
    pb,
    schedules,
)


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


@pytest.fixture
def client(trainer: LiveTrainer) -> Iterator[TrainingControlClient]:
    with TrainingControlClient(trainer.target, timeout=60) as c:
        yield c


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)


def test_set_takes_effect_at_the_reported_step(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    # A constant first: a schedule an earlier test left active would change between reads.
    before = client.set_learning_rate(0.01, wait=True).learning_rate_after
    change = client.set_learning_rate(0.02, wait=True, reason="e2e")
    assert change.status == pb.CHANGE_STATUS_APPLIED
    assert _close(change.learning_rate_after, 0.02)
    assert _close(trainer.lr_at(change.applied_step), 0.02)
    assert _close(trainer.lr_at(change.applied_step - 1), before)
    assert change.reason == "e2e" and change.schedule.WhichOneof("kind") == "constant"


def test_scale_multiplies_the_active_schedule(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    client.set_learning_rate(0.04, wait=True)
    change = client.scale_learning_rate(0.5, wait=True)
    assert _close(change.scale_after, 0.5)
    assert _close(trainer.lr_at(change.applied_step), 0.02)
    change = client.scale_learning_rate(0.5, wait=True)
    assert _close(change.scale_after, 0.25)
    assert _close(trainer.lr_at(change.applied_step), 0.01)


def test_swap_restarts_the_seed_article_schedule(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    # The seed article's third snippet, done remotely: ExponentialDecay(0.005, 5, 0.8, staircase).
    change = client.swap_schedule(schedules.ExponentialDecay(0.005, decay_steps=5, decay_rate=0.8,
                                                             staircase=True), wait=True)
    step = change.applied_step
    assert _close(change.learning_rate_after, 0.005)
    assert [round(trainer.lr_at(step + i), 6) for i in (0, 4, 5, 10)] == [0.005, 0.005, 0.004, 0.0032]
    state = client.get_state()
    assert state.schedule_origin_step == step and state.schedule.HasField("exponential_decay")


def test_swap_with_global_origin_evaluates_at_the_global_step(
    trainer: LiveTrainer, client: TrainingControlClient
) -> None:
    # A cycling PolynomialDecay stays between 0.08 and 0.04 at any step, so its LR stays
    # measurable on the weight wherever the swap lands; a decay to ~0 (say ExponentialDecay
    # at the global step) would drop below the weight's float32 resolution on a fast machine.
    change = client.swap_schedule(schedules.PolynomialDecay(0.08, 10, end_learning_rate=0.04, cycle=True),
                                  origin="global", wait=True)
    keras_schedule = keras.optimizers.schedules.PolynomialDecay(0.08, 10, end_learning_rate=0.04, cycle=True)
    expected = float(keras_schedule(change.applied_step))
    assert _close(trainer.lr_at(change.applied_step), expected)
    assert expected < 0.08  # Keras's behaviour: the "new" schedule does not start at its step 0


def test_swap_accepts_a_keras_serialized_dict(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    config = {"module": "keras.optimizers.schedules", "class_name": "PiecewiseConstantDecay",
              "config": {"boundaries": [3], "values": [0.03, 0.003], "name": "PiecewiseConstant"},
              "registered_name": None}
    change = client.swap_schedule(config, wait=True)
    assert _close(trainer.lr_at(change.applied_step + 3), 0.03)
    assert _close(trainer.lr_at(change.applied_step + 4), 0.003)


def test_apply_at_step_lands_exactly_there(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    client.set_learning_rate(0.01, wait=True)
    margin = 40
    while True:  # a fast machine may pass a near step before the request lands: never late
        target = client.get_state().step + margin
        try:
            pending = client.set_learning_rate(0.05, apply_at_step=target)
            break
        except FailedPrecondition:
            margin *= 4
    assert pending.status == pb.CHANGE_STATUS_PENDING
    assert any(c.request_id == pending.request_id for c in client.get_state().pending_changes)
    applied = client.set_learning_rate(0.05, apply_at_step=target, request_id=pending.request_id, wait=True)
    assert applied.applied_step == target
    assert _close(trainer.lr_at(target - 1), 0.01)
    assert _close(trainer.lr_at(target), 0.05)


def test_validate_only_changes_nothing(client: TrainingControlClient) -> None:
    before = client.get_state()
    change = client.swap_schedule(schedules.CosineDecay(0.1, 1000), validate_only=True)
    assert change.status == pb.CHANGE_STATUS_VALIDATED and change.version == 0
    after = client.get_state()
    assert after.version == before.version and after.schedule == before.schedule
    # The trainer is shared by the module: compare with before, not with "none pending".
    assert list(after.pending_changes) == list(before.pending_changes)


def test_a_duplicate_request_id_applies_once(client: TrainingControlClient) -> None:
    request_id = uuid.uuid4().hex
    first = client.scale_learning_rate(0.9, request_id=request_id, wait=True)
    again = client.scale_learning_rate(0.9, request_id=request_id, wait=True)
    assert again.version == first.version and again.applied_step == first.applied_step
    state = client.get_state()
    assert state.version == first.version
    assert sum(c.request_id == request_id for c in state.recent_changes) == 1


def test_a_stale_expected_version_is_aborted(client: TrainingControlClient) -> None:
    version = client.get_state().version
    client.scale_learning_rate(1.0, expected_version=version, wait=True)
    with pytest.raises(VersionConflict) as info:
        client.scale_learning_rate(2.0, expected_version=version)
    assert info.value.code == grpc.StatusCode.ABORTED
    assert str(version + 1) in info.value.message
    assert client.get_state().version == version + 1


def test_waiting_past_the_deadline_leaves_the_change_pending(
    trainer: LiveTrainer, client: TrainingControlClient
) -> None:
    far = client.get_state().step + 10_000_000
    with pytest.raises(DeadlineExceeded):
        client.set_learning_rate(0.5, apply_at_step=far, wait=True, timeout=0.5)
    assert any(c.apply_at_step == far for c in client.get_state().pending_changes)


def test_apply_at_step_in_the_past_is_a_failed_precondition(client: TrainingControlClient) -> None:
    with pytest.raises(FailedPrecondition) as info:
        client.set_learning_rate(0.1, apply_at_step=0)
    assert "apply_at_step" in info.value.message


def test_watch_sees_every_change(trainer: LiveTrainer, client: TrainingControlClient) -> None:
    seen: list[pb.TrainingState] = []
    started = threading.Event()

    def watch() -> None:
        with TrainingControlClient(trainer.target) as watcher:
            for state in watcher.watch(min_interval=0.05):
                seen.append(state)
                started.set()
                if len(seen) > 1 and seen[-1].version >= target_version[0] > 0:
                    return

    target_version = [0]
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(60)
    versions = [client.scale_learning_rate(1.0, wait=True).version for _ in range(3)]
    target_version[0] = versions[-1]
    thread.join(60)
    assert not thread.is_alive()
    assert seen[-1].version == versions[-1]
    reported = {c.version for s in seen for c in s.recent_changes} | {s.version for s in seen}
    assert set(versions) <= reported


BAD_INPUT = [
    ("set_learning_rate", (-1.0,), {}, "learning_rate"),
    ("set_learning_rate", (math.nan,), {}, "learning_rate"),
    ("set_learning_rate", (math.inf,), {}, "learning_rate"),
    ("scale_learning_rate", (0.0,), {}, "scale"),
    ("scale_learning_rate", (-2.0,), {}, "scale"),
    ("set_learning_rate", (0.1,), {"apply_at_step": -1}, "apply_at_step"),
    ("swap_schedule", (schedules.ExponentialDecay(0.005, 0, 0.8),), {},
     "schedule.exponential_decay.decay_steps"),
    ("swap_schedule", (schedules.ExponentialDecay(-0.1, 5, 0.8),), {},
     "schedule.exponential_decay.initial_learning_rate"),
    ("swap_schedule", (schedules.PiecewiseConstantDecay([20, 10], [0.1, 0.01, 0.001]),), {},
     "schedule.piecewise_constant_decay.boundaries"),
    ("swap_schedule", (schedules.PiecewiseConstantDecay([10, 20], [0.1, 0.01]),), {},
     "schedule.piecewise_constant_decay.values"),
    ("swap_schedule", (schedules.PiecewiseLinear([(i, 0.1) for i in range(65)]),), {},
     "schedule.piecewise_linear.knots"),
    ("swap_schedule", (schedules.CosineDecay(0.1, 100, alpha=2.0),), {}, "schedule.cosine_decay.alpha"),
    ("swap_schedule", (schedules.PolynomialDecay(0.1, 100, power=math.nan),), {},
     "schedule.polynomial_decay.power"),
    ("swap_schedule", (schedules.CosineDecayRestarts(0.1, -3),), {},
     "schedule.cosine_decay_restarts.first_decay_steps"),
    ("swap_schedule", (pb.Schedule(),), {}, "schedule"),
]


@pytest.mark.parametrize(("method", "args", "kwargs", "field"), BAD_INPUT,
                         ids=[f"{m}-{f}" for m, _, _, f in BAD_INPUT])
def test_bad_input_is_invalid_argument_naming_the_field(
    trainer: LiveTrainer, client: TrainingControlClient, method: str, args: tuple, kwargs: dict, field: str
) -> None:
    before = client.get_state()
    with pytest.raises(InvalidArgument) as info:
        getattr(client, method)(*args, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(field)
    assert [f for f, _ in info.value.field_violations] == [field]
    trainer.wait_for_step(before.step + 5)  # training goes on...
    after = client.get_state()
    assert after.version == before.version and after.schedule == before.schedule  # ...unchanged
    assert len(after.pending_changes) == len(before.pending_changes)


def test_health_serves_and_reflection_lists_the_service(client: TrainingControlClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("lrctl.v1.TrainingControlService") == "SERVING"
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert "lrctl.v1.TrainingControlService" in services
    assert "grpc.health.v1.Health" in services


def test_a_finished_run_refuses_changes_and_stops_serving() -> None:
    live = LiveTrainer()
    with live.running(), TrainingControlClient(live.target) as client:
        pending = client.set_learning_rate(0.5, apply_at_step=10_000_000)
        live.stop.set()
        states = list(client.watch(min_interval=0.05))  # the stream ends with the run
        assert states[-1].phase == pb.PHASE_FINISHED
        wait_for_health(client, "lrctl.v1.TrainingControlService", "NOT_SERVING")  # readiness
        assert client.health() == "SERVING"  # liveness: the server still serves
        with pytest.raises(FailedPrecondition):
            client.set_learning_rate(0.1)
        cancelled = [c for c in client.get_state().recent_changes if c.request_id == pending.request_id]
        assert [c.status for c in cancelled] == [pb.CHANGE_STATUS_CANCELLED]


def test_watch_rejects_a_negative_interval(client: TrainingControlClient) -> None:
    with pytest.raises(InvalidArgument) as info:
        next(client.watch(min_interval=-1.0))
    assert [f for f, _ in info.value.field_violations] == ["min_interval"]
