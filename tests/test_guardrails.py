"""Guardrails, previews and the audit journal, on a real `model.fit` behind the real server."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf
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
from lrctl.service.control.guardrails import Guardrails, RateLimiter
from lrctl.service.rpc.journal import Journal, read
from lrctl.service.rpc.server import serve
from lrctl.service.schedules import forms, specs
from lrctl.service.schedules.specs import ActiveSchedule, Origin

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
    assert limits.horizon_steps == 10_000 and client.get_state().lr_clamp_count == 0


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


def test_the_guardrails_are_checked_over_the_trainers_horizon_not_the_preview(client) -> None:
    late = schedules.PiecewiseLinear([(0, 0.01), (50_000, 0.09), (60_000, 0.2)])
    client.swap_schedule(late, validate_only=True, preview_steps=60_000)  # past the horizon
    soon = schedules.PiecewiseLinear([(0, 0.01), (5_000, 0.09), (6_000, 0.2)])
    with pytest.raises(FailedPrecondition, match="max_learning_rate"):
        client.swap_schedule(soon, validate_only=True, preview_steps=10)


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
        control.step_boundary()
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


# -- exact bounds: what 33 samples over the horizon let through ------------------------------

LOOSE = Guardrails(max_learning_rate=0.5)


@pytest.fixture(scope="module")
def loose() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01, guardrails=LOOSE).running() as live:
        yield live


@pytest.fixture
def loose_client(loose: LiveTrainer) -> Iterator[TrainingControlClient]:
    with TrainingControlClient(loose.target, timeout=60) as c:
        c.set_learning_rate(0.01, wait=True)
        yield c
        for change in c.get_state().pending_changes:  # the next test meets none of them
            c.cancel_change(request_id=change.request_id)


@pytest.mark.parametrize("change", [
    # One step at 1000 between two of the 33 points the check used to sample.
    lambda c: c.swap_schedule(schedules.PiecewiseConstantDecay([100, 101], [0.01, 1000.0, 0.01])),
    # A warmup that peaks at 100 between samples (and has decayed to 0 at the next one).
    lambda c: c.swap_schedule(schedules.CosineDecay(0.01, 10, warmup_target=100.0, warmup_steps=100)),
    # A real change whose client asked for a one-step horizon: preview_steps only sizes a preview.
    lambda c: c.swap_schedule(schedules.PiecewiseConstantDecay([5], [0.01, 100.0]), preview_steps=1),
], ids=["spike", "warmup-peak", "preview-steps"])
def test_a_learning_rate_above_max_at_any_step_is_refused(loose_client, change) -> None:
    before = loose_client.get_state()
    with pytest.raises(FailedPrecondition) as info:
        change(loose_client)
    assert _rule(info.value) == "max_learning_rate"
    after = loose_client.get_state()
    assert after.version == before.version and after.pending_count == 0


def test_a_schedule_that_becomes_nan_is_refused_naming_the_field(loose_client) -> None:
    with pytest.raises(InvalidArgument) as info:  # t_mul < 1: NaN once its periods run out
        loose_client.swap_schedule(schedules.CosineDecayRestarts(0.01, 10, t_mul=0.5))
    assert [f for f, _ in info.value.field_violations] == ["schedule.cosine_decay_restarts.t_mul"]


def _rising(client: TrainingControlClient) -> int:
    """Swap in an LR rising from 0.05 to 0.2 over 2000 steps; return the step it applied at."""
    ramp = schedules.PiecewiseLinear([(0, 0.05), (2000, 0.2)])
    return client.swap_schedule(ramp, wait=True).applied_step


def test_a_change_is_checked_after_the_pending_changes_due_before_it(loose_client) -> None:
    at = _rising(loose_client) + 300
    loose_client.scale_learning_rate(2.0, apply_at_step=at)  # 0.4 at most within the horizon
    with pytest.raises(FailedPrecondition) as info:  # after the first: 0.8
        loose_client.scale_learning_rate(2.0, apply_at_step=at)
    assert _rule(info.value) == "max_learning_rate"
    assert loose_client.get_state().pending_count == 1


def test_a_change_is_checked_again_where_it_applies(loose, loose_client) -> None:
    start = _rising(loose_client)
    later = loose_client.scale_learning_rate(2.0, apply_at_step=start + 600)  # fine alone
    first = loose_client.scale_learning_rate(2.0, apply_at_step=start + 300, wait=True)
    assert first.status == pb.CHANGE_STATUS_APPLIED
    final = loose_client.wait_change(request_id=later.request_id, timeout=120)
    assert final.status == pb.CHANGE_STATUS_FAILED and "guardrail max_learning_rate" in final.error
    state = loose_client.get_state()
    assert state.version == first.version and state.scale == 2.0
    assert _close(loose.lr_at(start + 601), 2 * (0.05 + 0.15 * 601 / 2000))


def test_the_engine_clamps_what_validation_missed_and_counts_it() -> None:
    """A schedule above max reaches the engine without the controller (as a restore from a run
    with looser bounds would): the optimizer still gets max, and GetState counts the clamps."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=lambda y_true, y_pred: keras.ops.mean(y_pred))
    control = TrainingControl(model.optimizer, guardrails=LOOSE)
    control.schedule.load(ActiveSchedule(specs.Constant(2.0)), 7)  # behind the controller's back
    data = tf.data.Dataset.from_tensors((np.ones((1, 1), "float32"), np.zeros((1, 1), "float32")))
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        model.fit(data.repeat(), steps_per_epoch=3, epochs=1, verbose=0, callbacks=[control.callback])
        state = client.get_state()
    # The gradient of mean(w * 1) is 1: each step moved w by the LR it used.
    assert _close(1.0 - float(model.layers[0].kernel.numpy()[0, 0]), 3 * 0.5)
    assert state.lr_clamp_count == 3 and _close(state.learning_rate, 0.5)


@pytest.mark.parametrize("spec", [
    specs.Constant(0.1), specs.ExponentialDecay(0.1, 7, 0.5), specs.ExponentialDecay(0.1, 7, 1.5, True),
    specs.InverseTimeDecay(0.1, 5, 0.3, True), specs.PolynomialDecay(0.1, 13, 0.01, 2.0, True),
    specs.PolynomialDecay(0.01, 13, 0.1, 0.5, True), specs.PolynomialDecay(0.1, 13, 0.01, 2.0),
    specs.CosineDecay(0.1, 40, 0.1), specs.CosineDecay(0.01, 40, 0.1, warmup_target=100.0, warmup_steps=17),
    specs.CosineDecay(0.5, 40, 0.0, warmup_target=0.1, warmup_steps=17),
    specs.CosineDecayRestarts(0.1, 7, 1.0, 0.9, 0.1), specs.CosineDecayRestarts(0.1, 3, 1.3, 1.1, 0.0),
    specs.CosineDecayRestarts(0.1, 5, 2.0, 0.5, 0.2),
    specs.PiecewiseConstantDecay((10, 11, 50), (0.1, 1000.0, 0.1, 0.01)),
    specs.PiecewiseLinear(((3, 0.1), (20, 0.5), (21, 0.01), (90, 0.2))),
], ids=lambda spec: spec.keras_name)
def test_extremes_match_every_step(spec) -> None:
    rng = random.Random(spec.describe())
    for _ in range(40):
        origin, start = rng.randint(-30, 60), rng.randint(0, 120)
        end = start + rng.randint(0, 150)
        state = ActiveSchedule(spec, Origin.RESTART, origin, rng.choice([1.0, 0.5, 3.0]))
        got = forms.extremes(state, start, end)
        every = np.array([forms.learning_rate(state, step) for step in range(start, end + 1)])
        case = (origin, start, end, got)
        assert math.isclose(got.min_lr, every.min(), rel_tol=1e-6), case
        assert math.isclose(got.max_lr, every.max(), rel_tol=1e-6), case
        assert start <= got.min_step <= end and start <= got.max_step <= end, case
        assert forms.learning_rate(state, got.max_step) == got.max_lr, case
