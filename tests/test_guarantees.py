"""Promises at their edges: never late under steps_per_execution, a step no boundary reaches,
one run across a resume, shutdowns that keep what they accepted, records that tell the truth.

Real `model.fit` with the real server on 127.0.0.1:0 and the real client, except where a
promise is the controller's own (then its fake engine, tests/fakes.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from fakes import MemoryTarget

from lrctl.client import FailedPrecondition, InvalidArgument, TrainingControlClient, pb
from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    Boundaries,
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
    ScaleLearningRate,
)
from lrctl.service.control.controller import Controller
from lrctl.service.errors import InvalidArgumentError, UnavailableError
from lrctl.service.rpc.server import serve
from lrctl.service.schedules import specs

LIMIT = 120.0  # seconds: a safety limit for a hung call, never a timing check
_START = specs.ActiveSchedule(specs.Constant(0.1))


def _model(steps_per_execution: int = 1) -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=steps_per_execution)
    return model


def _data(batches: int) -> tf.data.Dataset:
    x = np.ones((batches, 2), "float32")
    return tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1))).batch(1)


class _AtStep(keras.callbacks.Callback):
    """Runs `act(step)` at the boundaries before the batches that start at `steps`: while that
    batch's steps are about to run, a client's request for one of them races the boundary. A
    callback on the training thread makes the race happen on every run, not by chance."""

    def __init__(self, steps: set[int], act: Any) -> None:
        super().__init__()
        self._steps, self._act, self.done = steps, act, set()

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if step in self._steps and step not in self.done:
            self.done.add(step)
            self._act(step)


def _field(error: object) -> str:
    violations = getattr(error, "field_violations", None) or [("", "")]
    return violations[0][0]


def test_apply_at_step_under_steps_per_execution_is_exact_or_refused() -> None:
    model = _model(steps_per_execution=4)
    control = TrainingControl(model.optimizer)
    outcomes: dict[tuple[int, int], object] = {}
    grids: dict[int, tuple[int, int]] = {}
    asks = {4: (4, 5, 6, 7, 8, 12, 14), 10: (14, 18)}

    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:

        def submit_during_the_batch(step: int) -> None:
            state = client.get_state()
            grids[step] = (state.boundary_spacing, state.boundary_origin_step)
            for at in asks[step]:
                try:
                    outcomes[step, at] = client.set_learning_rate(
                        0.001 * at, apply_at_step=at, request_id=f"{step}-at-{at}")
                except (InvalidArgument, FailedPrecondition) as e:
                    outcomes[step, at] = e

        # 10 batches an epoch in executions of 4: the last execution of each epoch runs out of
        # data after 2 steps, so the boundaries are 0, 4, 8 | 10, 14, 18 | 20, ...
        racer = _AtStep(set(asks), submit_during_the_batch)
        model.fit(_data(10), epochs=3, verbose=0, callbacks=[control.callback, racer])
        assert racer.done == set(asks)
        changes = {c.request_id: c for c in client.iter_changes()}

    assert grids == {4: (4, 0), 10: (4, 10)}
    # The boundary at 4 has begun: its step may already have run (refused as passed).
    assert isinstance(outcomes[4, 4], FailedPrecondition), outcomes[4, 4]
    # Steps inside an execution, which no boundary reaches: refused, with the nearest that are.
    for at, nearest in ((5, "4 and 8"), (6, "4 and 8"), (7, "4 and 8"), (14, "12 and 16")):
        error = outcomes[4, at]
        assert isinstance(error, InvalidArgument) and _field(error) == "apply_at_step", error
        assert f"the nearest are {nearest}" in str(error), error
    # Steps a boundary reaches land exactly there.
    for name, at in (("4-at-8", 8), ("10-at-14", 14), ("10-at-18", 18)):
        assert changes[name].status == pb.CHANGE_STATUS_APPLIED and changes[name].applied_step == at
    # 12 was a boundary when it was asked for; the epoch ended early at 10 and moved them:
    # the change fails at the boundary past it instead of landing late.
    assert changes["4-at-12"].status == pb.CHANGE_STATUS_FAILED, changes["4-at-12"]
    assert "not applied late" in changes["4-at-12"].error
    assert set(changes) == {"4-at-4", "4-at-8", "4-at-12", "10-at-14", "10-at-18"}  # refused: never queued


def test_a_custom_loop_boundary_that_skips_the_step_fails_the_change_rather_than_land_late() -> None:
    model = _model()
    control = TrainingControl(model.optimizer)
    batches = iter(_data(9).repeat())
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client, control.training():
        control.step_boundary()
        assert client.get_state().boundary_spacing == 0  # a custom loop's boundaries are its own
        exact = client.set_learning_rate(0.02, apply_at_step=3, request_id="exact")
        skipped = client.set_learning_rate(0.03, apply_at_step=4, request_id="skipped")
        for _ in range(3):  # the loop calls the boundary every 3 steps: 3, 6, 9
            for _ in range(3):
                model.train_on_batch(*next(batches))
            control.step_boundary()
        records = {c.request_id: c for c in client.iter_changes()}
    assert exact.status == skipped.status == pb.CHANGE_STATUS_PENDING
    assert records["exact"].status == pb.CHANGE_STATUS_APPLIED and records["exact"].applied_step == 3
    assert records["skipped"].status == pb.CHANGE_STATUS_FAILED
    assert "apply_at_step=4" in records["skipped"].error and "not applied late" in records["skipped"].error
    assert control.controller.snapshot().version == 1


def test_boundaries_that_move_fail_a_change_they_skip() -> None:
    controller = Controller(MemoryTarget(_START))
    controller.set_phase(Phase.TRAINING)
    controller.set_boundaries(Boundaries(0, 4))  # e.g. sync_every=4 in a multi-worker job
    with pytest.raises(InvalidArgumentError) as refused:
        controller.submit(ChangeRequest(PinLearningRate(0.2), apply_at_step=6))
    assert refused.value.field == "apply_at_step" and "nearest are 4 and 8" in str(refused.value)
    accepted = controller.submit(ChangeRequest(PinLearningRate(0.2), apply_at_step=12))
    # The epoch ended early, at 10: the boundaries now fall on 10, 14, ... and skip 12.
    controller.set_boundaries(Boundaries(10, 4))
    assert controller.apply_due(10) == []
    (failed,) = controller.apply_due(14)
    assert failed.id == accepted.id and failed.status is ChangeStatus.FAILED
    assert controller.snapshot().version == 0


def test_apply_after_steps_lands_on_a_boundary() -> None:
    controller = Controller(MemoryTarget(_START))
    controller.set_phase(Phase.TRAINING)
    controller.set_boundaries(Boundaries(0, 4))
    controller.submit(ChangeRequest(ScaleLearningRate(0.5), apply_after_steps=5))
    assert controller.apply_due(4) == []  # seen at 4: due at 9, whose boundary is 12
    (pending,) = controller.snapshot().pending
    assert pending.due_step == 12
    assert controller.apply_due(8) == []
    (applied,) = controller.apply_due(12)
    assert applied.status is ChangeStatus.APPLIED and applied.applied_step == 12


def test_a_stopped_run_keeps_pending_changes_and_tells_waiters_to_come_back() -> None:
    controller = Controller(MemoryTarget(_START))
    controller.set_phase(Phase.TRAINING)
    change = controller.submit(ChangeRequest(PinLearningRate(0.2), apply_at_step=1000, request_id="later"))
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            controller.wait(change, LIMIT)
        except BaseException as e:  # noqa: BLE001 -- what the waiter gets is the assertion
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    controller.shut_down()
    controller.set_phase(Phase.STOPPED)
    waiter.join(LIMIT)
    assert len(errors) == 1 and isinstance(errors[0], UnavailableError), errors
    assert [c.request.request_id for c in controller.snapshot().pending] == ["later"]
    assert [c["request"]["request_id"] for c in controller.export_state()["pending"]] == ["later"]
    # A completed run is another matter: what it did not reach is cancelled.
    done = Controller(MemoryTarget(_START))
    done.submit(ChangeRequest(PinLearningRate(0.2), apply_at_step=1000))
    done.set_phase(Phase.FINISHED)
    assert done.snapshot().pending_count == 0
    assert done.snapshot().recent[-1].status is ChangeStatus.CANCELLED


def test_an_aborted_change_says_why() -> None:
    controller = Controller(MemoryTarget(_START))
    controller.submit(ChangeRequest(PinLearningRate(0.2)))
    controller.submit(ChangeRequest(PinLearningRate(0.3), expected_version=0))
    _applied, aborted = controller.apply_due(5)
    assert aborted.status is ChangeStatus.ABORTED
    assert "expected_version=0" in str(aborted.error) and "version 1 at step 5" in str(aborted.error)


def test_records_tell_the_truth() -> None:
    model = _model()
    control = TrainingControl(model.optimizer, publish_interval=3600)  # readers' view lags the step
    epochs: list[tuple[int, int | None]] = []

    class CheckState(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            snap = control.controller.snapshot()
            epochs.append((snap.step, snap.epoch_metrics_step))

    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:
        # A learning rate reads back as the float32 the engine uses, written shortest.
        client.set_learning_rate(0.001, request_id="pin")
        # A validate-only request is counted as validated.
        client.set_learning_rate(0.002, validate_only=True)
        assert control.controller.ended_counts()[ChangeStatus.VALIDATED] == 1
        model.fit(_data(5), epochs=2, verbose=0, callbacks=[control.callback, CheckState()])
        state = client.get_state()
        assert state.learning_rate == 0.001 and state.recent_changes[-1].learning_rate_after == 0.001
        assert state.epoch_start_step == 5
    # Each epoch's logs are never from a step later than the state's.
    assert epochs == [(5, 5), (10, 10)], epochs


def test_a_swap_records_its_requested_scale() -> None:
    model = _model()
    control = TrainingControl(model.optimizer)
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:
        change = client.swap_schedule({"class_name": "ExponentialDecay", "config": {
            "initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5}}, scale=0.25)
        plain = client.swap_schedule({"class_name": "ExponentialDecay", "config": {
            "initial_learning_rate": 0.1, "decay_steps": 10, "decay_rate": 0.5}})
    assert change.HasField("swap_scale") and change.swap_scale == 0.25
    assert not plain.HasField("swap_scale")


def test_a_fresh_trainer_schedule_is_version_zero_with_no_phantom(
    subprocess_env: dict[str, str],
) -> None:
    from test_trainer import _Trainer

    run = _Trainer("--demo", "--learning-rate", "0.02", env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            state = client.get_state()
            assert state.version == 0 and state.learning_rate == 0.02
            assert list(client.iter_changes()) == []  # no version without its record
            change = client.set_learning_rate(0.03, expected_version=0, wait=True)
            assert change.version == 1
        assert "restored" not in run.stderr, run.stderr
    finally:
        run.process.terminate()
        assert run.wait() == 0, run.stderr


def test_fences_on_the_process_and_retries_before_fences() -> None:
    controller = Controller(MemoryTarget(_START), run_id="m0")
    controller.set_phase(Phase.TRAINING)
    snap = controller.snapshot()
    first = controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a", expected_run_id="m0",
                                            expected_incarnation=snap.incarnation))
    restarted = Controller(MemoryTarget(_START), run_id="m0")  # the same --run-id, a new process
    restarted.set_phase(Phase.TRAINING)
    assert restarted.snapshot().incarnation != snap.incarnation
    with pytest.raises(Exception) as fenced:
        restarted.submit(ChangeRequest(PinLearningRate(0.3), expected_run_id="m0", expected_version=0,
                                       expected_incarnation=snap.incarnation))
    assert getattr(fenced.value, "field", "") == "expected_incarnation"
    # A retry with other fences is still the same request: the ledger answers it.
    again = controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a", expected_run_id="other"))
    assert again.id == first.id


def test_a_checkpoint_records_its_own_step(tmp_path: Any) -> None:
    import json

    from lrctl.service.training.checkpoints import Checkpointer

    model = _model()
    control = TrainingControl(model.optimizer, publish_interval=3600)  # readers' view lags the step
    checkpoints = Checkpointer(control, model, tmp_path, every=4)
    model.fit(_data(6), epochs=1, verbose=0, callbacks=[control.callback, checkpoints.callback])
    pointer = json.loads((tmp_path / "latest.json").read_text())
    saved = json.loads((tmp_path / pointer["control"]).read_text())
    assert pointer["step"] == saved["step"] == 4
