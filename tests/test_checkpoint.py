"""Issue #8, items 1-3: checkpoint and resume, graceful shutdown, GPU hygiene.

The controller's state round trip is tested in process; the rest with real `lrctl-trainer`
processes (kill -9, SIGTERM), as users run it."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import MemoryTarget
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_trainer import GATED_TASK, LIMIT, _Trainer

from lrctl.client import FailedPrecondition, TrainingControlClient, Unavailable, pb
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.control.controller import Controller
from lrctl.service.errors import FailedPreconditionError, UnavailableError
from lrctl.service.rpc.journal import read
from lrctl.service.rpc.status import status_of
from lrctl.service.schedules import specs
from lrctl.service.training.checkpoint_files import LATEST, write_json
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

_START = specs.ActiveSchedule(specs.Constant(0.1))  # the engine's schedule in the controller-only tests


def _same(changes: Any) -> list[tuple[object, ...]]:
    """Records compared with their errors as (type, message): exceptions never compare equal."""
    return [(dataclasses.replace(c, error=None), type(c.error).__name__, str(c.error)) for c in changes]


def _busy_controller() -> Controller:
    controller = Controller(MemoryTarget(_START), history_size=3)
    decay = specs.ExponentialDecay(initial_learning_rate=0.05, decay_steps=10, decay_rate=0.5)
    for request in [ChangeRequest(PinLearningRate(0.2), request_id="pin", reason="warm"),
                    ChangeRequest(ScaleLearningRate(0.5), request_id="scale"),
                    ChangeRequest(SwapSchedule(decay, specs.Origin.RESTART), request_id="swap"),
                    ChangeRequest(PinLearningRate(0.3), expected_version=0, request_id="aborted")]:
        controller.submit(request)
    controller.apply_due(7)
    controller.submit(ChangeRequest(PinLearningRate(0.4), request_id="cancelled"))
    controller.cancel(request_id="cancelled")
    controller.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=3, request_id="missed"))
    controller.submit(ChangeRequest(ScaleLearningRate(2.0), apply_at_step=100, request_id="later"))
    controller.publish(step=9, learning_rate=0.05)
    return controller


def test_control_state_round_trips_through_json_and_retries_apply_nothing() -> None:
    before = _busy_controller()
    exported = json.loads(json.dumps(before.export_state()))
    after = Controller(MemoryTarget(_START), history_size=3)
    after.import_state(exported)

    old, new = before.snapshot(), after.snapshot()
    assert (new.version, new.schedule, new.step) == (old.version, old.schedule, 9) == (3, old.schedule, 9)
    assert _same(new.recent) == _same(old.recent) and len(new.recent) == 3
    assert _same(new.pending) == _same(old.pending) and [c.request.request_id for c in new.pending] == ["later"]
    assert _same(after.list_changes(100)[0]) == _same(before.list_changes(100)[0])
    # A retry of any remembered request id returns its record and applies nothing.
    for request_id, status in [("pin", ChangeStatus.APPLIED), ("aborted", ChangeStatus.ABORTED),
                               ("cancelled", ChangeStatus.CANCELLED), ("missed", ChangeStatus.FAILED),
                               ("later", ChangeStatus.PENDING)]:
        record = {c.request.request_id: c for c in before.list_changes(100)[0]}.get(request_id)
        assert record is not None
        assert _same([after.submit(record.request)]) == _same([record])
        assert record.status is status
    missed = after.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=3, request_id="missed"))
    assert isinstance(missed.error, FailedPreconditionError) and missed.error.field == "apply_at_step"
    assert after.snapshot().version == 3 and after.snapshot().pending_count == 1
    # The pending change still applies, once, when due; new ids continue after the old ones.
    (applied,) = after.apply_due(100)
    assert (applied.status, applied.version, applied.request.request_id) == (ChangeStatus.APPLIED, 4, "later")
    fresh = after.submit(ChangeRequest(PinLearningRate(0.1)))
    assert fresh.id > max(c.id for c in before.list_changes(100)[0])


def test_a_shutting_down_controller_answers_unavailable() -> None:
    controller = _busy_controller()
    controller.shut_down()
    with pytest.raises(UnavailableError) as info:
        controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="new"))
    assert status_of(info.value).code == 14  # google.rpc.Code.UNAVAILABLE
    # A retry of a known request is still answered with its record.
    assert controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="pin", reason="warm")).version == 1


def test_write_json_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / LATEST
    write_json(str(path), {"step": 1})
    write_json(str(path), {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == [LATEST]


# --- real trainer processes ---


def _pointer(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / LATEST).read_text())
    except FileNotFoundError:
        return None


def _wait_for_checkpoint(directory: Path, after_step: int, version: int) -> dict[str, Any]:
    deadline = time.monotonic() + LIMIT
    while True:
        pointer = _pointer(directory)
        if pointer is not None and pointer["step"] > after_step and pointer["version"] == version:
            return pointer
        assert time.monotonic() < deadline, f"no checkpoint after step {after_step}: {pointer}"
        time.sleep(0.05)


def test_kill_9_then_restart_resumes_lr_schedule_version_step_and_dedup(
    tmp_path: Path, subprocess_env: dict[str, str],
) -> None:
    ckpt = tmp_path / "ckpt"
    journal = ckpt / "lrctl-journal.jsonl"  # the default: beside the checkpoints
    args = ("--demo", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20")
    run = _Trainer(*args, env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            first = client.set_learning_rate(0.05, request_id="pin-1", wait=True, reason="warm")
            client.swap_schedule({"class_name": "ExponentialDecay", "config": {
                "initial_learning_rate": 0.04, "decay_steps": 1000, "decay_rate": 0.5}},
                request_id="swap-2", wait=True)
            client.scale_learning_rate(0.5, request_id="scale-3", wait=True)
            step = client.get_state().step
            later = client.set_learning_rate(0.001, apply_at_step=step + 10**8, request_id="later")
            assert later.status == pb.CHANGE_STATUS_PENDING
            before = client.get_state()
        _wait_for_checkpoint(ckpt, step, 3)
    finally:
        run.process.kill()  # SIGKILL: no handler, no final checkpoint
        run.process.wait(timeout=LIMIT)
    pointer = _pointer(ckpt)
    assert pointer is not None
    saved = json.loads((ckpt / pointer["control"]).read_text())
    assert saved["version"] == 3

    again = _Trainer(*args, env=subprocess_env)
    try:
        again.wait_until_training()  # it serves (STARTING) before it resumes
        assert f"resumed from the checkpoint at step {pointer['step']} " in again.stderr
        with TrainingControlClient(again.target, timeout=LIMIT) as client:
            state = client.get_state()
            # A resumed run is the same run; the process is a new incarnation.
            assert state.run_id == before.run_id and state.incarnation != before.incarnation != ""
            assert state.version == 3 and state.step >= pointer["step"]
            # The swapped schedule, its origin and the cumulative scale x0.5.
            assert (state.schedule, state.schedule_origin_step, state.scale) == (
                before.schedule, before.schedule_origin_step, before.scale) and state.scale == 0.5
            assert [c.request_id for c in state.pending_changes] == ["later"]
            assert [c.request_id for c in state.recent_changes] == ["pin-1", "swap-2", "scale-3"]
            # A retry from before the kill returns the old record and applies nothing, whatever
            # its fences say: the ledger answers before any fence.
            stub = pb_grpc.TrainingControlServiceStub(client.channel)
            retry = stub.SetLearningRate(pb.SetLearningRateRequest(
                learning_rate=0.05, request_id="pin-1", wait_until_applied=True, reason="warm",
                expected_run_id=before.run_id, expected_incarnation=before.incarnation), timeout=LIMIT).change
            assert (retry.version, retry.applied_step) == (first.version, first.applied_step) == (1, first.applied_step)
            # A new decision made against the killed process is fenced off.
            with pytest.raises(grpc.RpcError) as fenced:
                stub.SetLearningRate(pb.SetLearningRateRequest(
                    learning_rate=0.07, request_id="stale", expected_run_id=before.run_id,
                    expected_version=3, expected_incarnation=before.incarnation), timeout=LIMIT)
            assert fenced.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "expected_incarnation" in (fenced.value.details() or "")
            assert client.get_state().version == 3
            assert abs(client.get_state().learning_rate - state.learning_rate) < 0.5 * state.learning_rate
    finally:
        again.process.send_signal(signal.SIGTERM)
        assert again.wait() == 0, again.stderr
    resumed = [e for e in read(journal) if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == pointer["step"] and resumed[0]["version"] == 3
    assert resumed[0]["checkpoint_run_id"] == before.run_id


def test_sigterm_keeps_pending_changes_for_the_restart_and_exits_0(
    tmp_path: Path, subprocess_env: dict[str, str],
) -> None:
    ckpt = tmp_path / "ckpt"
    run = _Trainer("--demo", "--checkpoint-dir", str(ckpt), env=subprocess_env)
    readiness: list[str] = []
    outcome: list[object] = []
    try:
        run.wait_until_training()
        assert "lrctl.trainer: training on /device:" in run.stderr, run.stderr  # CPU in CI
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            step = client.get_state().step
            applied = client.set_learning_rate(0.02, wait=True)

            def wait_for_far_change() -> None:  # a scheduled cooldown, accepted before the signal
                try:
                    outcome.append(client.set_learning_rate(0.01, apply_at_step=step + 10**8, wait=True,
                                                            request_id="cooldown"))
                except (FailedPrecondition, Unavailable) as e:
                    outcome.append(e)

            def watch_readiness() -> None:  # the standard Health/Watch stream, as a probe sees it
                stub = health_pb2_grpc.HealthStub(client.channel)
                request = health_pb2.HealthCheckRequest(service="lrctl.v1.TrainingControlService")
                try:
                    for response in stub.Watch(request, timeout=LIMIT):
                        readiness.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
                except grpc.RpcError:
                    pass  # the server stopped

            threads = [threading.Thread(target=wait_for_far_change), threading.Thread(target=watch_readiness)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + LIMIT
            while client.get_state().pending_count == 0 or not readiness:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            run.process.send_signal(signal.SIGTERM)
            returncode = run.wait()
            for thread in threads:
                thread.join(LIMIT)
    finally:
        run.process.kill()
    assert returncode == 0, run.stderr
    assert readiness[0] == "SERVING" and "NOT_SERVING" in readiness, readiness
    # The waiter is told to come back after the restart, not that its change was cancelled.
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
    assert "run " in run.stderr and " stopped at step " in run.stderr, run.stderr
    pointer = _pointer(ckpt)
    assert pointer is not None and pointer["version"] == applied.version == 1
    saved = json.loads((ckpt / pointer["control"]).read_text())
    assert [c["request"]["request_id"] for c in saved["pending"]] == ["cooldown"]
    assert all(c["status"] != "cancelled" for c in saved["finished"])

    again = _Trainer("--demo", "--checkpoint-dir", str(ckpt), env=subprocess_env)
    try:
        again.wait_until_training()
        with TrainingControlClient(again.target, timeout=LIMIT) as client:
            state = client.get_state()
            assert [c.request_id for c in state.pending_changes] == ["cooldown"]
            assert state.pending_changes[0].status == pb.CHANGE_STATUS_PENDING
            assert state.pending_changes[0].apply_at_step == step + 10**8
    finally:
        again.process.send_signal(signal.SIGTERM)
        assert again.wait() == 0, again.stderr


def test_checkpointer_in_user_fit_code_resumes_step_schedule_and_history(tmp_path: Path) -> None:
    import keras
    import numpy as np

    from lrctl.service.training.checkpoints import Checkpointer
    from lrctl.service.training.integration import TrainingControl

    def build() -> tuple[keras.Model, TrainingControl, Checkpointer]:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        control = TrainingControl(model.optimizer)
        return model, control, Checkpointer(control, model, tmp_path, every=4)

    x = np.ones((32, 3), "float32")
    model, control, checkpoints = build()
    assert checkpoints.restore() is None  # an empty folder: a fresh start
    control.controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="half"))
    model.fit(x, x.sum(axis=1), batch_size=4, epochs=2, verbose=0,
              callbacks=[control.callback, checkpoints.callback])
    assert checkpoints.last_step == 12  # at boundaries 4, 8 and 12 of 16 steps
    checkpoints.save()
    weights = [w.numpy() for w in model.weights]

    model, control, checkpoints = build()
    restored = checkpoints.restore()
    assert restored is not None and control.step == 16
    snap = control.controller.snapshot()
    assert (snap.version, snap.schedule.scale, snap.step) == (1, 0.5, 16)
    assert [c.request.request_id for c in snap.recent] == ["half"]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(weights, model.weights, strict=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-12.control.json", "ckpt-12.weights.h5", "ckpt-16.control.json", "ckpt-16.weights.h5",
        LATEST, "lrctl-wal.jsonl"]


def test_apply_at_step_lands_exactly_at_its_step_with_checkpoints_every_few_steps(tmp_path: Path) -> None:
    """The checkpoint callback asks TrainingControl's one step clock when a checkpoint is due:
    its own step read used to pull that clock's bound one step low, so a change due right after
    a checkpoint boundary landed one step late."""
    import tiny

    from lrctl.service.training.checkpoints import Checkpointer
    from lrctl.service.training.integration import TrainingControl

    model = tiny.make_model(0.5)
    # No throttled publication reads the step in between: only the clock and the checkpoints do.
    control = TrainingControl(model.optimizer, publish_interval=3600.0)
    checkpoints = Checkpointer(control, model, tmp_path, every=3)
    steps = 24
    rates = {at: 0.001 * at for at in range(1, steps)}  # one change due at every step
    for at, lr in rates.items():
        control.controller.submit(ChangeRequest(PinLearningRate(lr), apply_at_step=at, request_id=f"at-{at}"))
    recorder = tiny.fit(model, control, steps, checkpoints.callback)

    changes = {c.request.request_id: c for c in control.controller.list_changes(100)[0]}
    landed = {at: changes[f"at-{at}"].applied_step for at in rates}
    assert landed == {at: at for at in rates}  # on checkpoint steps (3, 6, ...) and just after
    # And the weights say so: the step starting at `at` used the LR pinned for `at`.
    used = {s0: round(lr, 6) for s0, _, lr in recorder.executions()}
    assert {at: used[at] for at in rates} == {at: round(lr, 6) for at, lr in rates.items()}
    assert checkpoints.last_step == 21  # boundaries 3, 6, ..., 21 of 24 steps


# --- --steps and --epochs are the run's totals (issue 15) ---


def test_a_restart_whose_steps_are_done_exits_at_once_and_saves_nothing(
    tmp_path: Path, subprocess_env: dict[str, str],
) -> None:
    ckpt = tmp_path / "ckpt"
    args = ("--demo", "--checkpoint-dir", str(ckpt), "--steps", "30")
    assert _Trainer(*args, env=subprocess_env).wait() == 0
    pointer = _pointer(ckpt)
    assert pointer is not None and pointer["step"] == 30
    files = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir() if p.suffix != ".jsonl")

    again = _Trainer(*args, env=subprocess_env)
    assert again.wait() == 0, again.stderr
    assert "already at step 30, the --steps 30 asked for; nothing to train" in again.stderr
    assert _pointer(ckpt) == pointer  # no step trained, no checkpoint written
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir() if p.suffix != ".jsonl") == files


def test_epochs_count_the_whole_run_and_a_resume_continues_the_epoch(
    tmp_path: Path, subprocess_env: dict[str, str],
) -> None:
    (tmp_path / "gated_task.py").write_text(GATED_TASK)  # 64 rows, batches of 32: 2 steps an epoch
    (tmp_path / "go").touch()
    ckpt = tmp_path / "ckpt"
    args = ("--model", "gated_task:build", "--checkpoint-dir", str(ckpt))
    assert _Trainer(*args, "--epochs", "2", cwd=tmp_path, env=subprocess_env).wait() == 0
    pointer = _pointer(ckpt)
    assert pointer is not None and pointer["step"] == 4
    assert json.loads((ckpt / pointer["control"]).read_text())["epoch"] == 2  # epochs completed

    (tmp_path / "go").unlink()  # held in its start until the watch below is open
    again = _Trainer(*args, "--epochs", "3", cwd=tmp_path, env=subprocess_env)
    try:
        with TrainingControlClient(again.target, timeout=LIMIT) as client, \
                client.watch(0.001, timeout=LIMIT) as updates:
            states = iter(updates)
            assert next(states).phase == pb.PHASE_STARTING
            (tmp_path / "go").touch()
            seen = [(s.phase, s.epoch, s.step) for s in states]  # until the run ends
    finally:
        assert again.wait() == 0, again.stderr
    assert seen[-1] == (pb.PHASE_FINISHED, 2, 6), seen  # one more epoch: epoch 2, steps 4 to 6
    assert all(epoch == 2 for phase, epoch, _ in seen if phase != pb.PHASE_STARTING), seen
    pointer = _pointer(ckpt)
    assert pointer is not None and pointer["step"] == 6
    assert json.loads((ckpt / pointer["control"]).read_text())["epoch"] == 3

    done = _Trainer(*args, "--epochs", "3", cwd=tmp_path, env=subprocess_env)
    assert done.wait() == 0, done.stderr
    assert "already 3 epochs done, the --epochs 3 asked for; nothing to train" in done.stderr
    assert _pointer(ckpt) == pointer
