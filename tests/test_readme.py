"""Every ```python block of README.md runs as written, each in its own process.

A block that uses names a user brings (`model`, `x`, `dataset`, `train_step`) gets a tiny
preamble that defines them; the block itself is run unchanged. The client block talks to a
real `lrctl-trainer --demo` started here, found through $LRCTL_TARGET as the block reads it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrctl.client import TrainingControlClient, pb

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)

# What the user has before the block: small data and a model, keyed by a line of the block.
PREAMBLES = {
    "model.fit(x, y": """
        import keras, numpy as np
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        x, y = np.ones((32, 3), "float32"), np.ones((32, 1), "float32")
    """,
    "for x, y in dataset:": """
        import keras, numpy as np, tensorflow as tf
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        dataset = tf.data.Dataset.from_tensor_slices(
            (np.ones((32, 3), "float32"), np.ones((32, 1), "float32"))).batch(8)

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(x) - y) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))  # the block's
            return loss
    """,
}
NEEDS_TRAINER = "TrainingControlClient("
LIMIT = 300  # seconds: a safety limit for a hung process, not a timing check


def _preamble(block: str) -> str:
    found = [textwrap.dedent(code) for marker, code in PREAMBLES.items() if marker in block]
    assert len(found) <= 1, "a block matches several preambles"
    return found[0] if found else ""


def _run(block: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _preamble(block) + block], env=env,
                          capture_output=True, text=True, timeout=LIMIT, check=False)


@pytest.fixture
def trainer_target(subprocess_env: dict[str, str]) -> Iterator[str]:
    """A demo trainer in its own process, training, on a free port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lrctl.service.apps.trainer", "--demo", "--listen", "127.0.0.1:0",
         "--verbose", "0"],
        env=subprocess_env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        port = None
        for line in process.stderr:
            if match := re.search(r"control server on port (\d+)", line):
                port = int(match.group(1))
                break
        assert port is not None, f"trainer exited ({process.wait()}) before listening"
        # Keep reading so that the trainer never blocks on a full pipe.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        target = f"127.0.0.1:{port}"
        with TrainingControlClient(target, timeout=LIMIT) as client:
            deadline = time.monotonic() + LIMIT
            while client.get_state().phase != pb.PHASE_TRAINING:
                assert time.monotonic() < deadline, "the trainer never started training"
                time.sleep(0.05)
        yield target
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=LIMIT)
        finally:
            process.kill()


def test_readme_has_python_blocks_and_keeps_its_two_commands() -> None:
    assert len(BLOCKS) >= 3
    text = README.read_text()
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


@pytest.mark.parametrize("block", [b for b in BLOCKS if NEEDS_TRAINER not in b],
                         ids=lambda b: b.splitlines()[0][:40])
def test_block_runs(block: str, subprocess_env: dict[str, str]) -> None:
    result = _run(block, subprocess_env)
    assert result.returncode == 0, result.stderr[-4000:]
    if "serve(" in block:  # a block that serves on port 0 says which port it got
        port = re.search(r"lrctl --target 127\.0\.0\.1:(\d+) state", result.stdout)
        assert port is not None and int(port.group(1)) > 0, result.stdout


@pytest.mark.parametrize("block", [b for b in BLOCKS if NEEDS_TRAINER in b],
                         ids=lambda b: b.splitlines()[0][:40])
def test_client_block_runs_against_a_trainer(
    block: str, trainer_target: str, subprocess_env: dict[str, str]
) -> None:
    result = _run(block, {**subprocess_env, "LRCTL_TARGET": trainer_target})
    assert result.returncode == 0, result.stderr[-4000:]
    if "swap_schedule" in block:
        _, lr_after = result.stdout.split()  # the block prints the swap's step and learning rate
        assert float(lr_after) == pytest.approx(0.005, rel=1e-6)  # restarted: at its own step 0
    else:  # the read-modify-write block: each helper applied (it waits), x0.5 twice
        assert float(result.stdout) == pytest.approx(0.25)
    with TrainingControlClient(trainer_target, timeout=LIMIT) as client:
        assert client.get_state().version >= 1  # the block's changes reached the trainer
