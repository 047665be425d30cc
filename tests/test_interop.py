"""Third-party and command-line clients against the real server inside a real `model.fit`:
the `lrctl` CLI as a user runs it, and `buf curl` through server reflection (no .proto)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from live import LiveTrainer

REPO = Path(__file__).resolve().parents[1]
BUF = REPO / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


def lrctl(trainer: LiveTrainer, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lrctl.client.cli", "--target", trainer.target, "--timeout", "60", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def test_cli_swaps_the_seed_article_schedule(trainer: LiveTrainer) -> None:
    done = lrctl(trainer, "--json", "swap", "exponential-decay", "--initial-learning-rate", "0.005",
                 "--decay-steps", "5", "--decay-rate", "0.8", "--staircase", "--reason", "cli")
    assert done.returncode == 0, done.stderr
    change = json.loads(done.stdout)
    assert change["status"] == "CHANGE_STATUS_APPLIED" and change["reason"] == "cli"
    step = int(change["appliedStep"])
    assert round(trainer.lr_at(step), 6) == 0.005 and round(trainer.lr_at(step + 5), 6) == 0.004


@pytest.mark.parametrize(("args", "code", "message"), [
    (("set", "--", "-1"), 3, "learning_rate must be finite and >= 0"),
    (("swap", "exponential-decay", "--initial-learning-rate", "0.1", "--decay-steps", "0",
      "--decay-rate", "0.5"), 3, "schedule.exponential_decay.decay_steps must be > 0"),
    (("set", "0.1", "--expected-version", "999"), 4, "expected_version=999"),
    (("set", "0.1", "--at-step", "0"), 5, "apply_at_step=0 may already have passed"),
])
def test_cli_errors_have_distinct_exit_codes(trainer: LiveTrainer, args: tuple[str, ...], code: int,
                                             message: str) -> None:
    done = lrctl(trainer, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr


def test_cli_state_and_health(trainer: LiveTrainer) -> None:
    assert lrctl(trainer, "health").stdout.strip() == "SERVING"
    state = json.loads(lrctl(trainer, "--json", "state").stdout)
    assert state["phase"] == "PHASE_TRAINING" and state["optimizer"] == "SGD"


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed (run `npm ci`)")
def test_buf_curl_through_reflection(trainer: LiveTrainer) -> None:
    def curl(method: str, body: dict[str, object]) -> dict[str, object]:
        done = subprocess.run(
            [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(body),
             f"http://{trainer.target}/lrctl.v1.TrainingControlService/{method}"],
            check=False, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # Proto3 JSON leaves out zero values: version 0 (no change yet, e.g. when this test runs
    # first on the module's trainer) has no "version" key.
    version = int(curl("GetState", {})["state"].get("version", 0))  # type: ignore[attr-defined]
    change = curl("SetLearningRate", {"learningRate": 0.03, "waitUntilApplied": True, "reason": "buf"})
    assert change["change"]["version"] == str(version + 1)  # type: ignore[index]
    assert round(trainer.lr_at(int(change["change"]["appliedStep"])), 6) == 0.03  # type: ignore[index]
