"""Run control against real training: PauseTraining, ResumeTraining, SaveCheckpoint and
StopTraining through the real server and client inside a real `fit` (tests/live.py), and in a
custom loop; the CLI's verbs with --json. No timing assertions: every wait is on a state."""

from __future__ import annotations

import json
import threading
from io import StringIO
from pathlib import Path

import keras
import numpy as np
import pytest
import tiny
from live import LiveTrainer, state_until, wait_for_health

from lrctl.client import TrainingControlClient, cli, errors, pb
from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PauseTraining,
    Phase,
    PinLearningRate,
    ResumeTraining,
    SaveCheckpoint,
    StopTraining,
)
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError
from lrctl.service.training.checkpoints import Checkpointer

SERVICE = "lrctl.v1.TrainingControlService"


def _lrctl(target: str, *argv: str) -> tuple[int, dict]:
    out = StringIO()
    code = cli.main(["--target", target, "--json", *argv], out=out)
    return code, json.loads(out.getvalue().splitlines()[-1])


def test_pause_holds_the_step_while_rpcs_answer_and_changes_apply_there(tmp_path: Path) -> None:
    trainer = LiveTrainer(learning_rate=0.01)
    Checkpointer(trainer.control, trainer.model, tmp_path)
    with trainer.running(), TrainingControlClient(trainer.target, timeout=60) as client:
        pause = client.pause_training(wait=True, reason="inspect")
        assert pause.status == pb.CHANGE_STATUS_APPLIED and pause.HasField("pause")
        paused_at = pause.applied_step
        state = client.get_state()
        assert state.phase == pb.PHASE_PAUSED and state.step == paused_at
        assert state.HasField("paused_until")
        wait_for_health(client, SERVICE, "NOT_SERVING")
        # Changes submitted while paused apply at the paused step: a pin, a checkpoint.
        pin = client.set_learning_rate(0.5, wait=True)
        assert pin.status == pb.CHANGE_STATUS_APPLIED and pin.applied_step == paused_at
        saved = client.save_checkpoint(wait=True)
        assert saved.status == pb.CHANGE_STATUS_APPLIED and saved.applied_step == paused_at
        assert saved.checkpoint_step == paused_at and Path(saved.checkpoint_path).is_file()
        assert saved.checkpoint_path.endswith(f"ckpt-{paused_at}.weights.h5")
        # Pausing a paused run restarts its timeout; the run has not moved meanwhile.
        again = client.pause_training(timeout=7200, wait=True)
        assert again.applied_step == paused_at
        later = client.get_state()
        assert later.paused_until.ToNanoseconds() > state.paused_until.ToNanoseconds()
        assert later.step == paused_at and later.version == again.version
        resume = client.resume_training(wait=True)
        assert resume.status == pb.CHANGE_STATUS_APPLIED and resume.applied_step == paused_at
        wait_for_health(client, SERVICE, "SERVING")
        state = state_until(client, lambda s: s.step > paused_at + 1)
        assert state.phase == pb.PHASE_TRAINING and not state.HasField("paused_until")
        # The step that ran at the paused boundary used the LR set while paused.
        assert trainer.lr_at(paused_at) == pytest.approx(0.5)
        # Every run action is a version of its own.
        assert [pause.version, pin.version, saved.version, again.version, resume.version] == \
            list(range(pause.version, pause.version + 5))
        # Resuming a run that is not paused: applied, nothing else.
        noop = client.resume_training(wait=True)
        assert noop.status == pb.CHANGE_STATUS_APPLIED
        assert client.get_state().phase == pb.PHASE_TRAINING


def test_a_pause_times_out_and_training_resumes_by_itself() -> None:
    with LiveTrainer().running() as trainer, \
            TrainingControlClient(trainer.target, timeout=60) as client:
        pause = client.pause_training(timeout=0.2, wait=True)
        assert pause.pause.timeout.ToNanoseconds() == 200_000_000
        state = state_until(client, lambda s: s.step > pause.applied_step)
        assert state.phase == pb.PHASE_TRAINING


def test_pause_timeout_and_save_without_a_checkpoint_folder_are_refused() -> None:
    with LiveTrainer().running() as trainer, \
            TrainingControlClient(trainer.target, timeout=60) as client:
        with pytest.raises(errors.FailedPrecondition, match="--checkpoint-dir"):
            client.save_checkpoint()
        with pytest.raises(errors.FailedPrecondition, match="--checkpoint-root"):
            client.load_checkpoint("elsewhere")
        for seconds in (-1, 8 * 24 * 3600):
            request = pb.PauseTrainingRequest()
            request.timeout.FromNanoseconds(int(seconds * 1e9))
            with pytest.raises(errors.InvalidArgument) as refused:
                client._run(  # the raw request: the client itself refuses a negative timeout
                    __import__("lrctl.client.calls", fromlist=["x"]).send_run_action(
                        "PauseTraining", request, None))
            assert refused.value.field_violations[0][0] == "timeout"
        assert client.get_state().phase == pb.PHASE_TRAINING


def test_stop_at_a_step_checkpoints_there_and_cancels_pending_with_its_reason(tmp_path: Path) -> None:
    trainer = LiveTrainer(learning_rate=0.01)
    checkpoints = Checkpointer(trainer.control, trainer.model, tmp_path)
    with trainer.running(), TrainingControlClient(trainer.target, timeout=60) as client:
        at = client.get_state().step + 30
        far = client.set_learning_rate(0.2, apply_at_step=at + 1000)
        stop = client.stop_training(apply_at_step=at, reason="ASHA: pruned at rung 1")
        stop = client.wait_change(name=stop.name, timeout=60)
        assert stop.status == pb.CHANGE_STATUS_APPLIED and stop.applied_step == at
        state = state_until(client, lambda s: s.phase == pb.PHASE_FINISHED)
        cancelled = client.get_change(name=far.name)
        assert cancelled.status == pb.CHANGE_STATUS_CANCELLED
        assert cancelled.error == "cancelled: ASHA: pruned at rung 1"
        with pytest.raises(errors.FailedPrecondition):
            client.set_learning_rate(0.3)
        wait_for_health(client, SERVICE, "NOT_SERVING")
    assert trainer.error is None and state.step >= at
    assert checkpoints.last_step == at and (tmp_path / f"ckpt-{at}.weights.h5").is_file()
    saved = json.loads((tmp_path / f"ckpt-{at}.control.json").read_text())
    assert saved["stopped_step"] == at


def test_a_custom_loop_pauses_saves_and_stops(tmp_path: Path) -> None:
    model = tiny.make_model(0.01)
    control = TrainingControl(model.optimizer, model=model)
    checkpoints = Checkpointer(control, model, tmp_path)
    controller = control.controller
    x, y = tiny.data(1)
    steps: list[int] = []

    def loop() -> None:
        with control.training():
            while not control.should_stop:
                control.step_boundary()
                steps.append(control.step)
                if control.should_stop:
                    break
                model.train_on_batch(x, y)

    pause = controller.submit(ChangeRequest(PauseTraining(3600), apply_at_step=3))
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    paused = controller.wait(pause, timeout=60)
    assert paused.status is ChangeStatus.APPLIED and paused.applied_step == 3
    save = controller.wait(controller.submit(ChangeRequest(SaveCheckpoint())), timeout=60)
    assert save.applied_step == 3 and save.checkpoint_step == 3
    assert controller.snapshot().phase is Phase.PAUSED and control.step == 3
    stop = controller.wait(controller.submit(ChangeRequest(StopTraining())), timeout=60)
    assert stop.status is ChangeStatus.APPLIED and stop.applied_step == 3
    thread.join(60)
    assert not thread.is_alive() and control.should_stop and steps[-1] == 3
    assert controller.snapshot().phase is Phase.FINISHED and controller.stopped_step == 3
    assert checkpoints.last_step == 3
    # A restart from that checkpoint has nothing left to do.
    model2 = tiny.make_model(0.01)
    control2 = TrainingControl(model2.optimizer, model=model2)
    Checkpointer(control2, model2, tmp_path).restore()
    assert control2.controller.stopped_step == 3
    with control2.training():
        assert control2.should_stop


def test_run_actions_are_checked_on_arrival() -> None:
    control = TrainingControl(keras.optimizers.SGD(0.1))
    submit = control.controller.submit
    with pytest.raises(InvalidArgumentError) as e:
        submit(ChangeRequest(PauseTraining(0)))
    assert e.value.field == "timeout"
    with pytest.raises(FailedPreconditionError, match="--checkpoint-dir"):
        submit(ChangeRequest(SaveCheckpoint()), validate_only=True)
    assert submit(ChangeRequest(ResumeTraining()), validate_only=True).status is ChangeStatus.VALIDATED
    assert submit(ChangeRequest(PinLearningRate(0.2)), validate_only=True).status is ChangeStatus.VALIDATED


def test_cli_run_verbs_answer_json(tmp_path: Path) -> None:
    trainer = LiveTrainer(learning_rate=0.01)
    Checkpointer(trainer.control, trainer.model, tmp_path)
    with trainer.running():
        code, pause = _lrctl(trainer.target, "pause", "--timeout", "30m", "--reason", "look")
        assert code == 0 and pause["status"] == "CHANGE_STATUS_APPLIED"
        assert pause["pause"]["timeout"] == "1800s" and pause["reason"] == "look"
        code, saved = _lrctl(trainer.target, "checkpoint")
        assert code == 0 and saved["checkpointStep"] == pause["appliedStep"]
        assert Path(saved["checkpointPath"]).is_file()
        code, resumed = _lrctl(trainer.target, "resume")
        assert code == 0 and resumed["status"] == "CHANGE_STATUS_APPLIED" and "resume" in resumed
        code, dry = _lrctl(trainer.target, "stop", "--dry-run")
        assert code == 0 and dry["status"] == "CHANGE_STATUS_VALIDATED"
        code, stopped = _lrctl(trainer.target, "stop", "--reason", "done")
        assert code == 0 and stopped["status"] == "CHANGE_STATUS_APPLIED" and "stop" in stopped
        out = StringIO()
        code = cli.main(["--target", trainer.target, "--json", "load", "x"], out=out)
        assert code != 0  # the run is finished: refused


def test_a_saved_checkpoint_holds_the_paused_state(tmp_path: Path) -> None:
    """What SaveCheckpoint wrote loads back to the weights and the step training had then."""
    trainer = LiveTrainer(learning_rate=0.01)
    Checkpointer(trainer.control, trainer.model, tmp_path)
    with trainer.running(), TrainingControlClient(trainer.target, timeout=60) as client:
        client.pause_training(wait=True)
        saved = client.save_checkpoint(wait=True)
        kernel = trainer.model.layers[0].kernel.numpy().copy()
        client.resume_training(wait=True)
        state_until(client, lambda s: s.step > saved.checkpoint_step + 2)
    trainer.model.layers[0].kernel.assign(np.zeros((1, 1), "float32"))
    trainer.model.load_weights(saved.checkpoint_path)
    np.testing.assert_array_equal(trainer.model.layers[0].kernel.numpy(), kernel)
    assert int(trainer.model.optimizer.iterations.numpy()) == saved.checkpoint_step


def test_lrctl_trainer_stops_for_good_and_a_restart_has_nothing_to_do(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    from test_trainer import _Trainer

    run = _Trainer("--demo", "--checkpoint-dir", str(tmp_path), env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=120) as client:
            stop = client.stop_training(wait=True, reason="early stopping")
        assert stop.status == pb.CHANGE_STATUS_APPLIED
        assert run.wait() == 0, run.stderr
    finally:
        run.process.kill()
    assert (tmp_path / f"ckpt-{stop.applied_step}.weights.h5").is_file(), run.stderr
    assert "finished at step" in run.stderr, run.stderr
    again = _Trainer("--demo", "--checkpoint-dir", str(tmp_path), env=subprocess_env)
    assert again.wait() == 0, again.stderr
    assert f"stopped for good by StopTraining at step {stop.applied_step}; nothing to train" \
        in again.stderr, again.stderr


def test_sigterm_while_paused_stops_the_run_and_exits_0(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    import signal

    from test_trainer import _Trainer

    run = _Trainer("--demo", "--checkpoint-dir", str(tmp_path), env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=120) as client:
            pause = client.pause_training(wait=True)
            assert client.get_state().phase == pb.PHASE_PAUSED
            run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr
    finally:
        run.process.kill()
    assert "stopped at step" in run.stderr, run.stderr  # STOPPED, not FINISHED
    assert pause.applied_step is not None
