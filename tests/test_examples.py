"""The orchestrator examples in examples/, run to completion against real trainers: demo
`lrctl-trainer`s in their own processes, and the custom loop as users start it."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from test_trainer import LIMIT, _Trainer

from lrctl.client import TrainingControlClient, pb
from lrctl.client.aio import TrainingControlClient as AsyncClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lrctl_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo(subprocess_env: dict[str, str]) -> Iterator[Callable[..., _Trainer]]:
    """Starts demo trainers (extra `lrctl-trainer` flags as arguments), training, killed after."""
    runs: list[_Trainer] = []

    def start(*args: str) -> _Trainer:
        run = _Trainer("--demo", *args, env=subprocess_env)
        runs.append(run)
        run.wait_until_training()
        return run

    yield start
    for run in runs:
        run.process.kill()
        run.process.wait(LIMIT)


def _changes(target: str) -> list[pb.Change]:
    with TrainingControlClient(target, timeout=LIMIT) as client:
        return list(client.iter_changes())[::-1]  # oldest first


def test_plateau_halves_the_lr_with_expected_version_and_its_reason(
    demo: Callable[..., _Trainer], capsys: pytest.CaptureFixture[str],
) -> None:
    plateau = _example("plateau")
    run = demo()
    with TrainingControlClient(run.target, timeout=LIMIT) as client:
        # A state made stale by another client's change is not acted on.
        stale = client.get_state()
        client.set_learning_rate(0.002, wait=True, reason="someone else")
        args = argparse.Namespace(factor=0.5, min_lr=1e-6, metric="loss", min_delta=0.1, patience=3)
        stale.metrics["loss"] = 1.0

        async def reduce_stale() -> bool:
            async with AsyncClient(run.target, timeout=LIMIT) as aclient:
                return bool(await plateau._reduce(aclient, stale, args))

        assert asyncio.run(reduce_stale()) is False
        assert client.get_state().learning_rate == pytest.approx(0.002)

    # min_delta so large that nothing after the first update counts as an improvement: a
    # plateau after exactly `patience` more updates, whatever the loss does.
    assert plateau.main(["--target", run.target, "--interval", "0.05", "--patience", "2",
                         "--min-delta", "1e6", "--max-changes", "1",
                         "--max-seconds", str(LIMIT)]) == 0
    out = capsys.readouterr().out
    assert "not scaling" in out and "done: 1 change(s)" in out, out

    *_, pin, scale = _changes(run.target)
    assert pin.set_learning_rate == 0.002
    assert scale.WhichOneof("action") == "scale" and scale.scale == 0.5
    assert scale.status == pb.CHANGE_STATUS_APPLIED and scale.version == pin.version + 1
    assert scale.reason.startswith("plateau: loss ") and "for 2 updates" in scale.reason
    assert scale.learning_rate_after == pytest.approx(0.001)


def test_plateau_stops_at_min_lr(demo: Callable[..., _Trainer],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = demo("--learning-rate", "0.0001")
    assert _example("plateau").main(["--target", run.target, "--interval", "0.05",
                                     "--min-lr", "0.00011", "--max-seconds", str(LIMIT)]) == 0
    assert "reached --min-lr" in capsys.readouterr().out
    assert _changes(run.target) == []


def test_wsd_cooldown_swaps_a_restart_origin_piecewise_linear_at_the_step_asked(
    demo: Callable[..., _Trainer], capsys: pytest.CaptureFixture[str],
) -> None:
    run = demo()
    with TrainingControlClient(run.target, timeout=LIMIT) as client:
        start = client.get_state().step + 500
    assert _example("wsd_cooldown").main([
        "--target", run.target, "--stable-lr", "0.01", "--cooldown-after-steps", str(start),
        "--decay-steps", "50", "--floor", "0.0001", "--follow", "--interval", "0.1",
        "--max-seconds", str(LIMIT)]) == 0
    assert "cooldown complete" in capsys.readouterr().out

    with TrainingControlClient(run.target, timeout=LIMIT) as client:
        state = client.get_state()
    knots = [(k.step, k.learning_rate) for k in state.schedule.piecewise_linear.knots]
    assert state.schedule.WhichOneof("kind") == "piecewise_linear"
    assert knots == [(0, pytest.approx(0.01)), (50, pytest.approx(0.0001))]
    assert state.schedule_origin_step == start  # restart origin, at exactly the step asked
    assert state.step >= start + 50 and state.learning_rate == pytest.approx(0.0001)
    *_, pin, swap = _changes(run.target)
    assert pin.set_learning_rate == 0.01 and pin.reason == "wsd: stable phase"
    assert swap.origin == pb.STEP_ORIGIN_RESTART and swap.applied_step == start


def test_pbt_lite_perturbs_the_worse_trainer_from_the_best_ones_lr(
    demo: Callable[..., _Trainer], capsys: pytest.CaptureFixture[str],
) -> None:
    good, bad = demo("--learning-rate", "0.02"), demo("--learning-rate", "0.00001")
    assert _example("pbt_lite").main([
        "--target", good.target, "--target", bad.target, "--ready-steps", "200", "--rounds", "1",
        "--seed", "0", "--max-seconds", str(LIMIT)]) == 0
    print(capsys.readouterr().out)

    assert _changes(good.target) == []
    (change,) = _changes(bad.target)
    assert change.status == pb.CHANGE_STATUS_APPLIED
    assert change.reason.startswith("pbt round 1: loss ") and good.target in change.reason
    assert any(math.isclose(change.set_learning_rate, 0.02 * f, rel_tol=1e-6) for f in (0.8, 1.25))


class _Loop:
    """examples/custom_loop.py in its own process; its output lines collected as they come."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "custom_loop.py"), "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._port = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(LIMIT) or self.port is None:
            self.process.kill()
            raise AssertionError(f"the loop exited ({self.process.wait()}):\n{self.output}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "control server on port" in line:
                self._port.set()
        self._port.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int | None:
        match = re.search(r"control server on port (\d+)", self.output)
        return int(match.group(1)) if match else None


def test_custom_loop_takes_a_remote_change_and_finishes(subprocess_env: dict[str, str]) -> None:
    loop = _Loop("--steps", "0", "--log-every", "0", env=subprocess_env)
    try:
        with TrainingControlClient(f"127.0.0.1:{loop.port}", timeout=LIMIT) as client:
            while client.get_state().phase != pb.PHASE_TRAINING:
                time.sleep(0.05)  # loops until the loop trains: the test's timeout is the limit
            change = client.set_learning_rate(0.01, wait=True, reason="from the test")
            assert change.status == pb.CHANGE_STATUS_APPLIED
            assert client.get_state().optimizer == "Adam"
        loop.process.send_signal(signal.SIGTERM)
        assert loop.process.wait(LIMIT) == 0, loop.output
    finally:
        loop.process.kill()
    assert f"step {change.applied_step}: set lr=0.01 -> lr 0.01 (from the test)" in loop.output
    assert re.search(r"finished at step \d+, lr 0\.01\n", loop.output), loop.output
