"""LoadCheckpoint end to end: through the real server and client into a real `fit`, and in a
custom loop; refusals at the edge of --checkpoint-root, another model's checkpoint, and what
`load_hyperparameters` brings or leaves. No timing assertions: every wait is on a state."""

from __future__ import annotations

import threading
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from live import LiveTrainer

from lrctl.client import TrainingControlClient, errors, pb
from lrctl.service import TrainingControl
from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    LoadCheckpoint,
    PinLearningRate,
    SetParameters,
)
from lrctl.service.training.checkpoints import Checkpointer


def _source(directory: Path, *, units: int = 1, steps: int = 5, learning_rate: float = 0.05) -> None:
    """Run "run-a": LiveTrainer's model (w = 1, loss mean(y_pred), so each SGD step takes
    `learning_rate` off w), trained `steps` steps and checkpointed by lrctl into `directory`."""
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(units, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss=lambda t, p: ops.mean(p))
    control = TrainingControl(model.optimizer, run_id="run-a")
    checkpoints = Checkpointer(control, model, directory)
    x = np.ones((steps, 1), np.float32)
    model.fit(x, np.zeros_like(x), batch_size=1, epochs=1, shuffle=False, verbose=0,
              callbacks=[control.callback])
    assert checkpoints.save() == steps
    checkpoints.close()


def test_a_load_in_fit_takes_the_other_runs_weights_and_keeps_this_runs_step_and_lr(tmp_path: Path) -> None:
    _source(tmp_path / "a")  # w = 1 - 5 * 0.05 = 0.75 at its step 5
    trainer = LiveTrainer(0.01, checkpoint_root=tmp_path, run_id="run-b")
    with trainer.running(), TrainingControlClient(trainer.target, timeout=60) as client:
        change = client.load_checkpoint("a", wait=True, reason="exploit")
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert change.checkpoint_run_id == "run-a" and change.checkpoint_step == 5
        assert change.checkpoint_path == str((tmp_path / "a" / "ckpt-5.weights.h5").resolve())
        assert change.load_checkpoint.path == "a" and not change.load_checkpoint.load_hyperparameters
        step = change.applied_step
        # The step that ran at the load started from A's weights, at B's own learning rate, and
        # B's step went on from where it was (A's 5 is not B's step).
        trainer.wait_for_step(step + 1)
        assert trainer.weights[step + 1] == pytest.approx(0.75 - 0.01, abs=1e-6)
        assert trainer.lr_at(step + 1) == pytest.approx(0.01)
        state = client.get_state()
        assert state.version == change.version and state.learning_rate == pytest.approx(0.01)
        history = client.list_changes(filter=f"version = {change.version}").changes
        assert [c.checkpoint_run_id for c in history] == ["run-a"]


def test_paths_outside_the_root_missing_ones_and_another_models_checkpoint_change_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    _source(root / "a")
    _source(root / "wide", units=2)  # another shape: Dense(2)
    _source(tmp_path / "outside")
    (root / "link").symlink_to(tmp_path / "outside")
    trainer = LiveTrainer(0.01, checkpoint_root=root)
    with trainer.running(), TrainingControlClient(trainer.target, timeout=60) as client:
        before = client.get_state()
        for path in ("../outside", str(tmp_path / "outside"), "link"):
            with pytest.raises(errors.PermissionDenied):
                client.load_checkpoint(path, wait=True)
        with pytest.raises(errors.NotFound):
            client.load_checkpoint("missing", wait=True)
        with pytest.raises(errors.InvalidArgument) as invalid:
            client.load_checkpoint("", wait=True)
        assert invalid.value.field_violations[0][0] == "path"
        with pytest.raises(errors.FailedPrecondition) as mismatch:
            client.load_checkpoint("wide", wait=True)
        assert "kernel" in mismatch.value.message and "(1, 2)" in mismatch.value.message
        failed = client.list_changes(filter="status = FAILED").changes
        assert len(failed) == 1 and failed[0].load_checkpoint.path == "wide"
        # Nothing changed, and training went on: each step still takes 0.01 off w = 1.
        after = client.get_state()
        assert after.version == before.version and after.step > before.step
        assert trainer.lr_at(after.step) == pytest.approx(0.01)
        assert client.load_checkpoint("a", wait=True).status == pb.CHANGE_STATUS_APPLIED


def _momentum_model(learning_rate: float, momentum: float) -> keras.Model:
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                  loss=lambda t, p: ops.mean(p))
    return model


@pytest.mark.parametrize("with_hyperparameters", [False, True])
def test_a_custom_loop_loads_keeping_or_taking_the_schedule_and_hyperparameters(
    tmp_path: Path, with_hyperparameters: bool,
) -> None:
    # Source: momentum 0.9 and LR 0.2 set live, then checkpointed at step 3.
    a = _momentum_model(0.05, 0.5)
    control_a = TrainingControl(a.optimizer, run_id="run-a")
    checkpoints = Checkpointer(control_a, a, tmp_path / "a")
    control_a.controller.submit(ChangeRequest(SetParameters((("momentum", 0.9),))))
    control_a.controller.submit(ChangeRequest(PinLearningRate(0.2)))
    x = np.ones((1, 1), np.float32)
    with control_a.training():
        for _ in range(3):
            control_a.step_boundary()
            a.train_on_batch(x, np.zeros_like(x))
        control_a.step_boundary()
    assert checkpoints.save() == 3
    checkpoints.close()

    b = _momentum_model(0.01, 0.5)
    control = TrainingControl(b.optimizer, model=b, checkpoint_root=tmp_path)
    controller = control.controller
    done = threading.Event()

    def loop() -> None:
        with control.training():
            while not done.is_set():
                control.step_boundary()
                b.train_on_batch(x, np.zeros_like(x))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        load = controller.wait(controller.submit(
            ChangeRequest(LoadCheckpoint("a", with_hyperparameters))), timeout=60)
    finally:
        done.set()
        thread.join(60)
    assert load.status is ChangeStatus.APPLIED and load.checkpoint_step == 3
    state = controller.snapshot()
    momentum = {h.name: h.value for h in state.hyperparameters}["momentum"]
    if with_hyperparameters:
        assert load.learning_rate_after == pytest.approx(0.2) and momentum == pytest.approx(0.9)
    else:
        assert load.learning_rate_after == pytest.approx(0.01) and momentum == pytest.approx(0.5)
    assert int(b.optimizer.iterations.numpy()) == control.step  # B's own step, not A's 3
