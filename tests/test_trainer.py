"""The main job as users run it: `lrctl-trainer` in its own process, driven by the client."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from lrctl.client import TrainingControlClient, pb

TRAINER = [sys.executable, "-c", "from lrctl.service.trainer import main; raise SystemExit(main())"]


def _start(*args: str, cwd: Path | None = None) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([*TRAINER, "--listen", "127.0.0.1:0", "--verbose", "0", *args],
                               stderr=subprocess.PIPE, text=True, cwd=cwd)
    assert process.stderr is not None
    for line in process.stderr:  # the trainer logs the port it got
        if match := re.search(r"control server on port (\d+)", line):
            return process, int(match.group(1))
    raise AssertionError(f"trainer exited ({process.wait()}) before listening")


def test_demo_trainer_takes_a_change_and_stops_cleanly_on_sigterm() -> None:
    process, port = _start("--demo")
    try:
        with TrainingControlClient(f"127.0.0.1:{port}", timeout=120) as client:
            while client.get_state().phase != pb.PHASE_TRAINING:
                pass
            assert client.health() == "SERVING"
            change = client.set_learning_rate(0.05, wait=True, reason="from the test")
            assert change.status == pb.CHANGE_STATUS_APPLIED
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert f"v1 step {change.applied_step}: lr 0.001 -> 0.05  set lr=0.05 (from the test)" in stderr
    assert "finished at step" in stderr


def test_trainer_runs_a_user_model_for_exactly_steps(tmp_path: Path) -> None:
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        import keras, numpy as np

        def build():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            x = np.ones((64, 3), "float32")
            return model, (x, x.sum(axis=1, keepdims=True))
    """))
    process, _ = _start("--model", "my_task:build", "--steps", "30", "--schedule",
                        '{"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, '
                        '"decay_steps": 10, "decay_rate": 0.5}}', cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert re.search(r"finished at step 30, lr 0\.0125\b", stderr), stderr
