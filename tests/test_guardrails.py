"""Guardrails, previews and the audit journal, on a real `model.fit` behind the real server."""

from __future__ import annotations

import math
from collections.abc import Iterator

import keras
import pytest
from live import LiveTrainer

from lrctl.client import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TrainingControlClient,
    VersionConflict,
    pb,
    schedules,
)
from lrctl.service import TrainingControl
from lrctl.service.guardrails import Guardrails, RateLimiter
from lrctl.service.journal import Journal, read
from lrctl.service.server import serve

LIMITS = Guardrails(min_learning_rate=1e-4, max_learning_rate=0.1, max_change_factor=4.0)


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01, guardrails=LIMITS).running() as live:
        yield live


@pytest.fixture
def client(trainer: LiveTrainer) -> Iterator[TrainingControlClient]:
    with TrainingControlClient(trainer.target, timeout=60) as c:
        c.set_learning_rate(0.01, wait=True, force=True)  # each test starts from 0.01
        yield c


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-9)


def _rule(error: FailedPrecondition) -> str:
    from google.rpc import error_details_pb2

    assert error.status is not None
    for detail in error.status.details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            (violation,) = failure.violations
            assert violation.type == "GUARDRAIL"
            return violation.subject
    raise AssertionError("no PreconditionFailure detail")


def test_guardrails_are_reported_in_the_state(client: TrainingControlClient) -> None:
    limits = client.get_state().guardrails
    assert (limits.min_learning_rate, limits.max_learning_rate, limits.max_change_factor) == (1e-4, 0.1, 4.0)
    assert not limits.HasField("max_changes_per_minute") and limits.revert_on_nan_steps == 0


@pytest.mark.parametrize(("change", "rule"), [
    (lambda c: c.set_learning_rate(0.5, force=True), "max_learning_rate"),
    (lambda c: c.set_learning_rate(1e-5, force=True), "min_learning_rate"),
    (lambda c: c.set_learning_rate(0.05), "max_change_factor"),  # 5x the current 0.01
    (lambda c: c.scale_learning_rate(0.2), "max_change_factor"),
    # Fine where it starts, above the bound once its warmup ends: checked over a horizon.
    (lambda c: c.swap_schedule(schedules.CosineDecay(0.01, 1000, warmup_target=0.5,
                                                     warmup_steps=500)), "max_learning_rate"),
])
def test_a_change_that_breaks_a_guardrail_is_refused_naming_it(trainer, client, change, rule) -> None:
    before = client.get_state()
    with pytest.raises(FailedPrecondition) as info:
        change(client)
    assert _rule(info.value) == rule and f"guardrail {rule}" in info.value.message
    after = client.get_state()
    assert after.version == before.version and after.pending_count == 0


def test_force_passes_the_change_factor_but_never_the_bounds(trainer, client) -> None:
    change = client.set_learning_rate(0.05, force=True, wait=True)
    assert _close(trainer.lr_at(change.applied_step), 0.05)
    with pytest.raises(FailedPrecondition):
        client.scale_learning_rate(4.0, force=True)  # 0.2 > max_learning_rate


def test_a_preview_is_what_training_then_applies(trainer, client) -> None:
    schedule = schedules.CosineDecay(0.02, 64, alpha=0.1)
    at = client.get_state().step + 400
    preview = client.swap_schedule(schedule, apply_at_step=at, validate_only=True, preview_steps=96)
    assert preview.status == pb.CHANGE_STATUS_VALIDATED
    assert len(preview.preview) == len(preview.preview_current) == 33
    assert preview.preview[0].step == at and preview.preview[-1].step == at + 96
    assert all(_close(p.learning_rate, 0.01) for p in preview.preview_current)
    applied = client.swap_schedule(schedule, apply_at_step=at, wait=True)
    assert applied.applied_step == at
    for point in preview.preview:
        assert _close(trainer.lr_at(point.step), point.learning_rate), point


def test_a_preview_checks_the_guardrails_over_its_horizon(client) -> None:
    warmup = schedules.PiecewiseLinear([(0, 0.01), (50_000, 0.09), (60_000, 0.2)])
    client.swap_schedule(warmup, validate_only=True, preview_steps=40_000)  # stays below 0.1
    with pytest.raises(FailedPrecondition, match="max_learning_rate"):
        client.swap_schedule(warmup, validate_only=True, preview_steps=60_000)


def test_the_change_rate_is_limited() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])
    limiter.take()
    limiter.take()
    with pytest.raises(Exception, match="max_changes_per_minute") as info:
        limiter.take()
    assert info.value.reason == "RATE_LIMITED"
    now[0] += 30.0  # half a minute refills one of the two a minute
    limiter.take()
    with pytest.raises(Exception, match="max_changes_per_minute"):
        limiter.take()


def test_the_rate_limit_on_a_real_server() -> None:
    control = TrainingControl(keras.optimizers.SGD(0.01),
                              guardrails=Guardrails(max_changes_per_minute=2))
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        client.set_learning_rate(0.02)
        client.set_learning_rate(0.03)  # two accepted: a minute's worth (a refill takes 30 s)
        with pytest.raises(ResourceExhausted) as info:
            client.set_learning_rate(0.04)
        assert info.value.reason == "RATE_LIMITED"
        client.set_learning_rate(0.04, validate_only=True)  # checks are not rate limited
        assert client.get_state().pending_count == 2


def test_the_journal_has_one_line_per_mutation_attempt(tmp_path) -> None:
    path = tmp_path / "journal" / "lrctl.jsonl"
    control = TrainingControl(keras.optimizers.SGD(0.01))
    journal = Journal(path)
    with serve(control.controller, "127.0.0.1:0", journal=journal) as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        first = client.set_learning_rate(0.02, reason="PBT exploit", request_id="a")
        with pytest.raises(InvalidArgument):
            client.set_learning_rate(-1.0)
        control.apply_pending()
        with pytest.raises(VersionConflict):
            client.scale_learning_rate(0.5, expected_version=0)
        pending = client.swap_schedule(schedules.ExponentialDecay(0.01, 10, 0.5), apply_at_step=10**6)
        client.cancel_change(request_id=pending.request_id)
        client.get_state()  # reads are not journaled
        entries = read(path)  # flushed per line: readable while the trainer runs
    journal.close()
    assert [(e["method"], e["code"]) for e in entries] == [
        ("SetLearningRate", "OK"), ("SetLearningRate", "INVALID_ARGUMENT"),
        ("SetLearningRate", "ABORTED"), ("SwapSchedule", "OK"), ("CancelChange", "OK")]
    assert entries[0]["request"]["reason"] == "PBT exploit"
    assert entries[0]["request"]["request_id"] == first.request_id
    assert entries[0]["change_status"] == "CHANGE_STATUS_PENDING"
    assert entries[1]["error"].startswith("learning_rate must be finite")
    assert entries[2]["version"] == 1 and entries[4]["change_status"] == "CHANGE_STATUS_CANCELLED"
    for entry in entries:
        assert {"time", "peer", "role", "request", "code", "version", "step"} <= entry.keys()
        assert entry["peer"].startswith("ipv4:127.0.0.1:")
