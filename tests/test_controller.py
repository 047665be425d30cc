"""The controller's rules (validation, versions, idempotency, waiting, end of run), pure
Python on tests/fakes.py's MemoryTarget: no TensorFlow. The training thread's calls
(`apply_due`, `set_phase`, `publish`) are made directly, as a custom training loop makes them.
`attach` and the real engine are tested in tests/test_attach.py and tests/test_engine_parity.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fakes import MemoryTarget

from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.control.controller import Controller
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.schedules import forms
from lrctl.service.schedules.kinds import (
    Constant,
    ExponentialDecay,
    PiecewiseConstantDecay,
    PiecewiseLinear,
)
from lrctl.service.schedules.specs import ActiveSchedule, Origin, spec_from_config


class Run:
    """A run on a MemoryTarget, driven as a custom loop drives it: the step is set by hand."""

    def __init__(self, learning_rate: float, step: int) -> None:
        self.schedule = MemoryTarget(ActiveSchedule(Constant(learning_rate)))
        self.controller = Controller(self.schedule)
        self.step = step
        self.controller.set_phase(Phase.TRAINING)
        self.controller.publish(step=step, learning_rate=learning_rate)

    def apply_pending(self):
        """Apply the changes that are due now (at a step boundary)."""
        return self.controller.apply_due(self.step)

    def end(self) -> None:
        self.controller.set_phase(Phase.FINISHED)


@pytest.fixture
def control():
    """A run at step 10, training, with no change yet."""
    return Run(0.1, step=10)


def lr_now(control) -> float:
    return forms.learning_rate(control.schedule.read()[0], control.step)


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
    assert control.controller.snapshot().pending == ()
    assert control.apply_pending() == []
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
    assert after.recent == (missed,) and controller.snapshot().pending == ()
    assert (after.version, after.schedule) == (before.version, before.schedule)
    # The current version and the current step are fine.
    change = controller.submit(ChangeRequest(PinLearningRate(0.01), expected_version=0, apply_at_step=10))
    (applied,) = control.apply_pending()
    assert (applied.id, applied.status, applied.version, applied.applied_step) == \
        (change.id, ChangeStatus.APPLIED, 1, 10)
    with pytest.raises(VersionConflictError):
        controller.submit(ChangeRequest(PinLearningRate(0.02), expected_version=0))


def test_expected_version_is_checked_again_when_applied(control):
    controller = control.controller
    first = controller.submit(ChangeRequest(PinLearningRate(0.01), expected_version=0))
    second = controller.submit(ChangeRequest(PinLearningRate(0.02), expected_version=0))
    applied = control.apply_pending()
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
    assert controller.snapshot() is before and controller.snapshot().pending == ()
    assert control.apply_pending() == []
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
    assert [c.id for c in control.apply_pending()] == [first.id]
    after = controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="retry-me"))
    assert after.id == first.id and after.status is ChangeStatus.APPLIED and after.version == 1
    assert control.apply_pending() == []
    assert controller.snapshot().version == 1
    assert lr_now(control) == pytest.approx(0.05)  # scaled once, not twice


def test_wait_returns_the_applied_record_or_times_out(control):
    controller = control.controller
    change = controller.submit(ChangeRequest(PinLearningRate(0.02), apply_at_step=12))
    with pytest.raises(WaitTimeoutError):
        controller.wait(change, timeout=0)
    control.step = 11
    assert control.apply_pending() == []  # not due yet
    with pytest.raises(WaitTimeoutError):
        controller.wait(change, timeout=0)

    results = []
    waiter = threading.Thread(target=lambda: results.append(controller.wait(change, timeout=None)))
    waiter.start()
    control.step = 12
    (applied,) = control.apply_pending()
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
    assert controller.snapshot().pending == ()
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
    applied = control.apply_pending()
    assert [c.version for c in applied] == [1, 2, 3]
    state, version = control.schedule.read()
    assert version == 3 and state.scale == 0.25 and state.origin is Origin.GLOBAL
    assert state.origin_step == 0
    assert lr_now(control) == pytest.approx(0.25 * 0.2 * 0.5 ** (10 / 10))
    controller.submit(ChangeRequest(PinLearningRate(0.3)))
    control.apply_pending()
    assert control.schedule.read()[0] == ActiveSchedule(Constant(0.3), Origin.RESTART, 10, 1.0)
    assert controller.snapshot().schedule == control.schedule.read()[0]
    assert lr_now(control) == pytest.approx(0.3)



_PROBE = """
import importlib, json, pkgutil, sys
import lrctl.service.control as control
names = sorted(m.name for m in pkgutil.iter_modules(control.__path__))
for name in names:
    importlib.import_module(f"lrctl.service.control.{name}")
print(json.dumps({"modules": names, "file": control.__file__,
                  "heavy": sorted(m for m in ("tensorflow", "keras") if m in sys.modules)}))
"""


def test_the_control_package_imports_no_tensorflow(subprocess_env):
    # Every module of the package, found by listing it: a new module is covered too.
    out = subprocess.run([sys.executable, "-c", _PROBE], env=subprocess_env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["file"].startswith(str(Path(__file__).resolve().parent.parent / "service"))
    assert {"controller", "changes", "policy", "queue", "ledger"} <= set(result["modules"])
    assert result["heavy"] == []


def test_listeners_hear_every_publish_with_the_changes_that_ended_since_the_last(control, caplog):
    controller = control.controller
    heard: list[tuple[int, list[tuple[str, ChangeStatus]]]] = []

    def failing(snapshot, ended):
        raise RuntimeError("a listener's bug")

    stop_failing = controller.listen(failing)  # logged, and the publisher goes on
    unsubscribe = controller.listen(
        lambda snap, ended: heard.append((snap.seq, [(c.request.request_id, c.status) for c in ended])))
    controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    controller.submit(ChangeRequest(PinLearningRate(0.3), request_id="b"))
    assert [ended for _, ended in heard] == [[], []]  # accepted: published, nothing ended
    control.apply_pending()
    assert heard[-1][1] == [("a", ChangeStatus.APPLIED), ("b", ChangeStatus.APPLIED)]
    assert heard[-1][0] == controller.snapshot().seq and controller.snapshot().version == 2
    assert "a listener failed" in caplog.text
    stop_failing()
    controller.submit(ChangeRequest(PinLearningRate(0.4), request_id="c"))
    control.end()  # cancels "c"
    assert heard[-1][1] == [("c", ChangeStatus.CANCELLED)]
    unsubscribe()
    seen = len(heard)
    controller.publish(step=11, learning_rate=0.4)
    assert len(heard) == seen
