"""Keras's own learning-rate callbacks beside lrctl: ReduceLROnPlateau and LearningRateScheduler
assign a float to `optimizer.learning_rate`, which Keras refuses (TypeError) for an optimizer
whose learning rate is a schedule, as lrctl's is. With lrctl attached, such an assignment is a
local change: pinned at that step boundary, versioned, checked by the guardrails, recorded
with its source, journaled. The LR each step used is read off the weight (tests/tiny.py).
"""

from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest
from tiny import BATCH, WeightRecorder, data, fit, make_model, prediction_loss

from lrctl.client import TrainingControlClient, pb
from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.rpc import journal
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.server import serve
from lrctl.service.schedules.kinds import ExponentialDecay

STEPS_PER_EPOCH = 4


def _fit_epochs(model, control, epochs: int, *callbacks) -> list[float]:
    """fit `epochs` epochs of STEPS_PER_EPOCH steps, `control.callback` first; the LR each step used."""
    recorder = WeightRecorder()
    x, y = data(STEPS_PER_EPOCH)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[control.callback, *callbacks, recorder])
    return [lr for _, _, lr in recorder.executions()]


def _halve(epoch: int, lr: float) -> float:
    return lr * 0.5


class _RemoteSet(keras.callbacks.Callback):
    """At the end of epoch 0, a client sets the LR through the real server (without waiting:
    the change applies on this very thread, at the next boundary)."""

    def __init__(self, client: TrainingControlClient, value: float) -> None:
        super().__init__()
        self._client, self._value = client, value
        self.change: pb.Change | None = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.change = self._client.set_learning_rate(self._value, reason="operator")


def test_learning_rate_scheduler_beside_a_remote_set(tmp_path):
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    path = tmp_path / "journal.jsonl"
    with serve(control.controller, "127.0.0.1:0", journal=Journal(path)) as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        remote = _RemoteSet(client, 0.5)
        per_step = _fit_epochs(model, control, 3, keras.callbacks.LearningRateScheduler(_halve), remote)

        # Epoch 0: 0.125 halved. Between epochs a client sets 0.5; it applies at epoch 1's start,
        # before the scheduler (listed after control.callback) reads and halves it.
        assert per_step == [0.0625] * 4 + [0.25] * 4 + [0.125] * 4
        assert remote.change is not None and remote.change.status == pb.CHANGE_STATUS_PENDING
        state = client.get_state()
        listed = list(client.iter_changes())
    assert state.phase == pb.PHASE_FINISHED  # fit completed
    assert state.version == 4 and np.float32(state.learning_rate) == np.float32(0.125)

    ours = [c for c in state.recent_changes if "LearningRateScheduler" in c.reason]
    assert [(c.version, c.applied_step, c.status) for c in ours] == [
        (1, 0, pb.CHANGE_STATUS_APPLIED), (3, 4, pb.CHANGE_STATUS_APPLIED), (4, 8, pb.CHANGE_STATUS_APPLIED)]
    assert [c.learning_rate_after for c in ours] == [0.0625, 0.25, 0.125]
    assert [c.schedule.WhichOneof("kind") for c in ours] == ["constant"] * 3
    assert [(c.version, c.applied_step) for c in state.recent_changes if c.reason == "operator"] == [(2, 4)]
    # ListChanges (newest first) holds the same four records.
    assert [(c.version, "LearningRateScheduler" in c.reason) for c in listed] == [
        (4, True), (3, True), (2, False), (1, True)]

    entries = journal.read(path)
    local = [e for e in entries if e["method"] == "local"]
    assert [(e["code"], e["change_status"], e["change_version"]) for e in local] == [
        ("OK", "CHANGE_STATUS_APPLIED", 1), ("OK", "CHANGE_STATUS_APPLIED", 3), ("OK", "CHANGE_STATUS_APPLIED", 4)]
    assert all("LearningRateScheduler" in e["request"]["reason"] for e in local)
    assert [e["request"]["learning_rate"] for e in local] == [0.0625, 0.25, 0.125]
    assert [e["method"] for e in entries if e["method"] != "local"] == ["SetLearningRate"]


def test_reduce_lr_on_plateau_fires_each_epoch():
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    # The first epoch always improves on +inf; after it, a min_delta this large never does,
    # so with patience=0 every later epoch end halves the LR.
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    per_step = _fit_epochs(model, control, 4, plateau)

    assert per_step == [0.125] * 8 + [0.0625] * 4 + [0.03125] * 4
    records = [c for c in control.controller.snapshot().recent if "ReduceLROnPlateau" in c.request.reason]
    assert [(c.version, c.applied_step, c.status, c.learning_rate_after) for c in records] == [
        (1, 8, ChangeStatus.APPLIED, 0.0625), (2, 12, ChangeStatus.APPLIED, 0.03125),
        (3, 16, ChangeStatus.APPLIED, 0.015625)]  # the last epoch's end too; no step used it
    assert control.controller.snapshot().learning_rate == 0.015625


def test_a_guardrail_refusal_is_a_warning_and_fit_goes_on(caplog):
    model = make_model(0.125)
    control = TrainingControl(model.optimizer, guardrails=Guardrails(max_change_factor=2))
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.25, patience=0, min_delta=1e9)
    with caplog.at_level(logging.WARNING, logger="lrctl"):
        per_step = _fit_epochs(model, control, 3, plateau)

    assert per_step == [0.125] * 12  # unchanged
    snap = control.controller.snapshot()
    assert snap.version == 0 and snap.recent == () and snap.phase.value == "finished"
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2  # at the ends of epochs 1 and 2
    assert all("ReduceLROnPlateau" in m and "max_change_factor" in m for m in refusals)


@pytest.mark.parametrize("wrapping", ["loss_scale", "mirrored"])
def test_the_scheduler_works_under_loss_scaling_and_tf_distribute(wrapping, request):
    if wrapping == "loss_scale":
        # What compile() makes under mixed precision: callbacks set the wrapper's
        # learning_rate, which forwards it to the inner optimizer, which holds the schedule.
        model = make_model(0.125)
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.125)),
                      loss=prediction_loss)
    else:
        strategy = request.getfixturevalue("mirrored")
        with strategy.scope():
            model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    per_step = _fit_epochs(model, control, 2, keras.callbacks.LearningRateScheduler(_halve))

    assert per_step == [0.0625] * 4 + [0.03125] * 4
    assert control.controller.snapshot().version == 2
    assert type(model.optimizer).__name__ in ("LossScaleOptimizer", "SGD")  # the type is Keras's own


def test_a_scheduler_that_keeps_the_lr_records_nothing():
    model = make_model(0.125)
    control = TrainingControl(model.optimizer)
    # The Keras docstring's scheduler: the LR it reads, unchanged, for the first epochs.
    keep = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch < 10 else lr * 0.1)
    assert _fit_epochs(model, control, 2, keep) == [0.125] * 8
    assert control.controller.snapshot().version == 0


def test_optimizers_lrctl_does_not_control_keep_keras_behaviour():
    TrainingControl(make_model(0.125).optimizer)  # wraps Keras's setter for the whole process
    plain = keras.optimizers.SGD(0.1)
    plain.learning_rate = 0.25
    assert float(plain.learning_rate.numpy()) == 0.25
    scheduled = keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match="not settable"):
        scheduled.learning_rate = 0.25


def test_the_log_reports_the_lr_at_the_applied_step(caplog):
    model = make_model(0.125)
    # Publishing never again after the start: the last published LR is the one at step 0.
    control = TrainingControl(model.optimizer, publish_interval=3600)
    control.controller.submit(ChangeRequest(SwapSchedule(ExponentialDecay(0.1, 1, 0.93))))
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_at_step=11))
    with caplog.at_level(logging.INFO, logger="lrctl"):
        fit(model, control, 16)

    lines = [r.getMessage() for r in caplog.records if "scale x0.5" in r.getMessage()]
    assert len(lines) == 1, lines
    before, after = map(float, re.search(r"lr (\S+) -> (\S+)", lines[0]).groups())
    assert before == pytest.approx(0.1 * 0.93**11, rel=1e-6)  # the decayed LR at step 11
    assert after / before == pytest.approx(0.5, rel=2**-23)  # float32 precision
