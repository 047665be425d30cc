"""Correct under the setups users run and under careless or hostile clients: exact
`apply_at_step`, restores, float32 limits, a failing fit, idempotency, a failing engine, bursts,
bounds, cancel and list. Real `model.fit`, the real server on 127.0.0.1:0 and the real client.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import keras
import numpy as np
import pytest
from google.protobuf import duration_pb2
from live import LiveTrainer, wait_for_health

from lrctl.client import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TrainingControlClient,
    pb,
    schedules,
)
from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
    ScaleLearningRate,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.limits import DEDUP_WINDOW, MAX_PENDING
from lrctl.service.errors import ApplyError, ResourceExhaustedError
from lrctl.service.rpc.server import serve
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.specs import ActiveSchedule, Origin
from lrctl.service.training.attach import attach
from lrctl.service.training.engine_target import EngineTarget
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

SERVICE = "lrctl.v1.TrainingControlService"


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


@pytest.fixture
def client(trainer: LiveTrainer) -> Iterator[TrainingControlClient]:
    with TrainingControlClient(trainer.target, timeout=60) as c:
        yield c


@pytest.fixture
def idle() -> Iterator[tuple[TrainingControl, TrainingControlClient]]:
    """A real server over a control whose run has not started (no training needed)."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as c:
        yield control, c


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-9)


# -- apply_at_step: exact or refused, never late ----------------------------------------------
def test_apply_at_step_is_exact_or_refused_never_late(trainer: LiveTrainer,
                                                      client: TrainingControlClient) -> None:
    applied, refused = [], []
    for attempt in range(24):
        # A step that is (or is about to be) the current one: the race the stale snapshot lost.
        at = client.get_state().step + attempt % 3
        try:
            change = client.set_learning_rate(0.01 + attempt * 1e-4, apply_at_step=at, wait=True)
        except FailedPrecondition as e:
            assert "apply_at_step" in str(e)
            refused.append(at)
            continue
        assert change.applied_step == at  # steps_per_execution=1: exactly there, never later
        assert _close(trainer.lr_at(at), change.learning_rate_after)
        applied.append(at)
    far = client.get_state().step + 300
    change = client.set_learning_rate(0.02, apply_at_step=far, wait=True)
    assert change.applied_step == far and _close(trainer.lr_at(far), 0.02)
    # Clearly in the past: refused at once, and recorded as not applied with the reason.
    with pytest.raises(FailedPrecondition, match="may already have passed"):
        client.set_learning_rate(0.5, apply_at_step=far - 1, request_id="late-one")
    (record,) = [c for c in client.iter_changes() if c.request_id == "late-one"]
    assert record.status == pb.CHANGE_STATUS_FAILED and "apply_at_step" in record.error
    assert client.get_state().version == change.version  # nothing applied since


# -- a checkpoint restore is never overwritten ------------------------------------------------
def _tiny_model(lr: float) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False,
                                                                    kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=lambda y, p: keras.ops.mean(p))
    return model


def _fit(model: keras.Model, callbacks: list, epochs: int, initial_epoch: int = 0) -> None:
    x = np.ones((40, 1), "float32")
    model.fit(x, np.zeros_like(x), batch_size=4, epochs=epochs, shuffle=False, verbose=0,
              callbacks=callbacks, initial_epoch=initial_epoch)


@pytest.mark.parametrize("restore_first", [False, True], ids=["lrctl-first", "restore-first"])
def test_a_restored_schedule_is_built_on_and_the_version_never_goes_back(tmp_path, restore_first):
    backup = str(tmp_path / "backup")
    # Run 1: two changes, then an epoch-end backup (kept: the job "dies" after it).
    first = _tiny_model(0.1)
    control = TrainingControl(first.optimizer)
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        client.swap_schedule(schedules.ExponentialDecay(0.05, 5, 0.5))
        client.scale_learning_rate(0.5, apply_at_step=3)
        _fit(first, [control.callback,
                     keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)], epochs=1)
    saved = control.controller.snapshot()
    assert saved.version == 2 and saved.schedule.scale == 0.5 and saved.step == 10

    # Run 2, a fresh process's view: version 0 until BackupAndRestore restores, in either order.
    second = _tiny_model(0.1)
    control = TrainingControl(second.optimizer)
    restore = keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)
    callbacks = [restore, control.callback] if restore_first else [control.callback, restore]
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        change = client.scale_learning_rate(0.5, reason="after restart")
        _fit(second, callbacks, epochs=2)
        changes = client.list_changes().changes
        final = next(c for c in changes if c.request_id == change.request_id)
        # Every version the state reported has its record: the restore is one (version 2).
        (restore_record,) = [c for c in changes if c.version == 2]
        assert restore_record.WhichOneof("action") == "revert" and restore_record.reason.startswith("restored")
        assert restore_record.revert.scale == 0.5 and restore_record.applied_step == 10
    assert final.request_id == change.request_id and final.status == pb.CHANGE_STATUS_APPLIED
    assert final.version == 3  # builds on the restored version 2, never back to 1
    assert final.applied_step == 10
    assert final.scale_after == 0.25  # the restored scale 0.5, times 0.5
    assert final.schedule.WhichOneof("kind") == "exponential_decay"
    assert _close(final.learning_rate_after, 0.25 * 0.05 * 0.5 ** (10 / 5))
    state, version = control.schedule.read()
    assert version == 3 and state.scale == 0.25 and state.origin_step == 0


# -- values float32 cannot hold ----------------------------------------------------------------
def test_values_float32_cannot_hold_are_refused_and_change_nothing(idle) -> None:
    control, client = idle
    before = client.get_state()
    cases = [
        (lambda: client.set_learning_rate(1e39), "learning_rate"),
        (lambda: client.scale_learning_rate(1e39), "scale"),
        (lambda: client.swap_schedule(schedules.InverseTimeDecay(0.01, 1, 1e300)),
         "schedule.inverse_time_decay.decay_rate"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert [f for f, _ in info.value.field_violations] == [field]
        assert "float32" in str(info.value)
    # Each value fits, but the product would not: the cumulative scale, the resulting LR.
    client.scale_learning_rate(1e30)
    control.step_boundary()
    with pytest.raises(InvalidArgument, match="cumulative scale") as info:
        client.scale_learning_rate(1e30)
    assert [f for f, _ in info.value.field_violations] == ["scale"]
    client.set_learning_rate(3e38)
    control.step_boundary()
    with pytest.raises(InvalidArgument, match="learning rate inf") as info:
        client.scale_learning_rate(2.0)
    after = client.get_state()
    assert after.version == before.version + 2 and after.pending_count == 0
    assert after.learning_rate == pytest.approx(3e38, rel=1e-6)


# -- a fit that raises ends the run ------------------------------------------------------------
class _RaiseAt(keras.callbacks.Callback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self._step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self._step:
            raise RuntimeError("a bad batch")


def test_a_fit_that_raises_ends_the_run_and_tells_waiters() -> None:
    model = _tiny_model(0.1)
    control = TrainingControl(model.optimizer)
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=120) as client:
        outcome: list[BaseException] = []

        def wait_for_a_far_change() -> None:
            try:
                client.set_learning_rate(0.5, apply_at_step=10**6, wait=True)
            except FailedPrecondition as e:
                outcome.append(e)

        waiter = threading.Thread(target=wait_for_a_far_change)
        waiter.start()
        while client.get_state().pending_count == 0:
            time.sleep(0.01)  # until the waiting change is queued
        with pytest.raises(RuntimeError, match="a bad batch"):
            _fit(model, [control.callback, _RaiseAt(5)], epochs=3)
        waiter.join(timeout=60)
        assert outcome and "cancelled" in str(outcome[0])
        states = list(client.watch(min_interval=0.05, timeout=60))  # ends once the run failed
        assert states[-1].phase == pb.PHASE_FAILED
        wait_for_health(client, SERVICE, "NOT_SERVING")
        with pytest.raises(FailedPrecondition, match="failed"):
            client.set_learning_rate(0.1)


# -- idempotency -------------------------------------------------------------------------------
def test_a_request_id_reused_with_another_payload_is_refused(trainer, client) -> None:
    first = client.set_learning_rate(0.011, request_id="same-id", wait=True)
    assert client.set_learning_rate(0.011, request_id="same-id") == first  # a true retry
    with pytest.raises(InvalidArgument) as info:
        client.set_learning_rate(0.012, request_id="same-id")
    assert info.value.reason == "REQUEST_ID_REUSED"
    assert [f for f, _ in info.value.field_violations] == ["request_id"]
    assert client.get_state().version == first.version


def test_retries_in_the_dedup_window_never_apply_twice_and_pending_ids_are_kept() -> None:
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    controller = control.controller
    control.begin()
    keep = controller.submit(ChangeRequest(PinLearningRate(0.3), request_id="keep", apply_at_step=10**8))
    per_batch, batches = MAX_PENDING - 1, DEDUP_WINDOW // (MAX_PENDING - 1) + 1
    for batch in range(batches):  # more changes finish than the window holds, `keep` pending
        for i in range(per_batch):
            controller.submit(ChangeRequest(ScaleLearningRate(1.0), request_id=f"r{batch}-{i}"))
        control.step_boundary()
    total = per_batch * batches
    assert total > DEDUP_WINDOW and controller.snapshot().version == total
    retry = ChangeRequest(PinLearningRate(0.3), request_id="keep", apply_at_step=10**8)
    assert controller.submit(retry) == keep  # a pending change never loses its id
    oldest_kept = total - DEDUP_WINDOW  # the 10,000th newest finished change
    for index in (total - 1, oldest_kept):
        batch, i = divmod(index, per_batch)
        again = controller.submit(ChangeRequest(ScaleLearningRate(1.0), request_id=f"r{batch}-{i}"))
        assert again.status is ChangeStatus.APPLIED and again.version == index + 1
    assert control.step_boundary() == []
    assert controller.snapshot().version == total  # no retry applied anything


# -- a failing engine load loses nothing -------------------------------------------------------
class _FailingOnce:
    """The real engine, except that its next load raises (a device error, say)."""

    def __init__(self, target) -> None:
        self._target, self.fail = target, True

    def load(self, state, version):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        self._target.load(state, version)

    def read(self):
        return self._target.read()


def test_a_failing_engine_load_fails_the_change_and_keeps_the_schedule() -> None:
    engine = EngineTarget(attach(keras.optimizers.SGD(learning_rate=0.1)))
    controller = Controller(_FailingOnce(engine))
    controller.set_phase(Phase.TRAINING)
    engine_before = engine.read()
    with serve(controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                client.scale_learning_rate(0.5, wait=True)
            except Internal as e:
                outcome.append(e)

        waiter = threading.Thread(target=wait)
        waiter.start()
        while client.get_state().pending_count == 0:
            time.sleep(0.01)
        (failed,) = controller.apply_due(0)
        waiter.join(timeout=60)
        assert failed.status is ChangeStatus.FAILED and isinstance(failed.error, ApplyError)
        assert outcome and "device lost" in str(outcome[0])
        assert engine.read() == engine_before
        assert client.get_state().version == 0
        ok = client.scale_learning_rate(0.5, wait=False)
        (applied,) = controller.apply_due(0)
        assert applied.request.request_id == ok.request_id and applied.version == 1


def test_an_engine_load_is_all_or_nothing() -> None:
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    before = control.schedule.read()
    bad = ActiveSchedule(Constant(0.5), Origin.RESTART, 2**63, 1.0)  # origin beyond int64
    with pytest.raises((OverflowError, ValueError)):
        control.schedule.load(bad, 7)
    assert control.schedule.read() == before
    # The training thread's path: one compiled assignment of all the variables.
    with pytest.raises((OverflowError, ValueError)):
        control.engine.load(bad, 7)
    assert control.schedule.read() == control.engine.read() == before


# -- a burst at one boundary -------------------------------------------------------------------
class _CountingLoads:
    def __init__(self, target) -> None:
        self._target, self.loads = target, 0

    def load(self, state, version):
        self.loads += 1
        self._target.load(state, version)

    def read(self):
        return self._target.read()


def test_a_burst_due_at_one_boundary_costs_one_engine_load_and_no_lock() -> None:
    engine = EngineTarget(attach(keras.optimizers.SGD(learning_rate=0.1)))
    counting = _CountingLoads(engine)
    controller = Controller(counting)
    controller.set_phase(Phase.TRAINING)
    for i in range(MAX_PENDING):
        controller.submit(ChangeRequest(ScaleLearningRate(1.0 + 1e-4), apply_at_step=5,
                                                request_id=f"b{i}"))
    with pytest.raises(ResourceExhaustedError, match="pending already"):
        controller.submit(ChangeRequest(ScaleLearningRate(1.0)))
    finished = controller.apply_due(5)
    assert counting.loads == 1
    assert [c.version for c in finished] == list(range(1, MAX_PENDING + 1))
    assert all(c.applied_step == 5 for c in finished)
    state, version = engine.read()
    assert version == MAX_PENDING and state == finished[-1].schedule_after
    assert finished[-1].learning_rate_after == pytest.approx(
        float(engine.learning_rate(5)), rel=1e-6)


# -- bounds ------------------------------------------------------------------------------------
def test_sizes_and_horizons_are_bounded(idle) -> None:
    _, client = idle
    for call, field in [
        (lambda: client.set_learning_rate(0.1, reason="x" * 1025), "reason"),
        (lambda: client.set_learning_rate(0.1, request_id="x" * 129), "request_id"),
        (lambda: client.set_learning_rate(0.1, apply_at_step=10**9 + 1), "apply_at_step"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert [f for f, _ in info.value.field_violations] == [field]
    client.set_learning_rate(0.1, reason="é" * 512, request_id="x" * 128, apply_at_step=10**9)
    assert client.get_state().pending_count == 1


def test_the_largest_state_fits_the_default_message_limit(idle) -> None:
    _, client = idle
    knots = [(i * 1000, 0.001 * (i % 7)) for i in range(64)]
    for i in range(MAX_PENDING):
        client.swap_schedule(schedules.PiecewiseLinear(knots), reason="r" * 1024,
                             request_id=f"{i:0128d}", apply_at_step=10**6)
    with pytest.raises(ResourceExhausted, match="pending"):
        client.set_learning_rate(0.1)
    state = client.get_state()  # with gRPC's default 4 MB receive limit
    assert state.pending_count == MAX_PENDING and len(state.pending_changes) == 100
    assert state.ByteSize() < 4 * 2**20
    listed = client.list_changes(page_size=1000)
    assert len(listed.changes) == 100 and listed.ByteSize() < 4 * 2**20


@pytest.mark.parametrize(("seconds", "nanos"), [(-1, 0), (3601, 0), (10**12, 0), (0, -5)])
def test_watch_intervals_outside_zero_to_an_hour_are_refused(idle, seconds, nanos) -> None:
    _, client = idle
    request = pb.WatchStateRequest(min_interval=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    with pytest.raises(grpc.RpcError) as info:
        next(iter(pb_grpc.TrainingControlServiceStub(client.channel).WatchState(request, timeout=30)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_interval" in info.value.details()


# -- cancel and list ---------------------------------------------------------------------------
def test_cancel_and_list_changes(trainer, client) -> None:
    far = client.get_state().step + 10**6
    pending = client.set_learning_rate(0.9, apply_at_step=far, reason="maybe later")
    cancelled = client.cancel_change(request_id=pending.request_id, reason="changed my mind")
    assert cancelled.status == pb.CHANGE_STATUS_CANCELLED and cancelled.request_id == pending.request_id
    assert client.cancel_change(request_id=pending.request_id) == cancelled  # idempotent
    assert client.get_state().pending_count == 0
    applied = client.set_learning_rate(0.01, wait=True)
    with pytest.raises(FailedPrecondition, match="already applied"):
        client.cancel_change(request_id=applied.request_id)
    with pytest.raises(FailedPrecondition, match="already applied"):
        client.cancel_change(version=applied.version)
    with pytest.raises(NotFound):
        client.cancel_change(request_id="never-sent")

    first = client.list_changes(page_size=1)
    assert [c.request_id for c in first.changes] == [applied.request_id] and first.next_page_token
    second = client.list_changes(page_size=1, page_token=first.next_page_token)
    assert [c.request_id for c in second.changes] == [pending.request_id]
    every = list(client.iter_changes(page_size=7))
    assert every[:2] == [*first.changes, *second.changes]
    assert len({c.request_id for c in every}) == len(every)
    with pytest.raises(InvalidArgument) as info:
        client.list_changes(page_token="not-a-token")
    assert [f for f, _ in info.value.field_violations] == ["page_token"]


def test_a_long_reason_is_cut_in_the_log(trainer, client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lrctl"):
        client.set_learning_rate(0.01, reason="why " * 250, wait=True)
        deadline = time.monotonic() + 60  # the training thread logs just after it applies
        while not (lines := [r.getMessage() for r in caplog.records if "why why" in r.getMessage()]):
            assert time.monotonic() < deadline, "the change was never logged"
            time.sleep(0.01)
    assert len(lines) == 1 and len(lines[0]) < 300



def test_a_restore_of_another_run_at_the_same_version_is_noticed() -> None:
    """Restores are noticed by the stamp every load writes, not by the version: another run's
    checkpoint may hold the same version number with another schedule (PBT's exploit)."""
    mine, other = (TrainingControl(keras.optimizers.SGD(learning_rate=0.1)) for _ in range(2))
    for control, lr in ((mine, 0.5), (other, 0.02)):
        control.begin()
        control.controller.submit(ChangeRequest(PinLearningRate(lr)))
        control.step_boundary()
        assert control.controller.snapshot().version == 1
    for into, value in zip(mine.schedule.variables, other.schedule.variables, strict=True):
        into.assign(value.numpy())  # what a restore of the other run's checkpoint does
    mine.controller.submit(ChangeRequest(ScaleLearningRate(0.5)))
    (change,) = mine.step_boundary()
    assert change.learning_rate_after == pytest.approx(0.01)  # built on the restored 0.02
    assert change.version == 3  # the restore became version 2: versions never repeat
