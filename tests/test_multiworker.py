"""A MultiWorkerMirroredStrategy job: two worker processes on 127.0.0.1 with TF_CONFIG train
the demo model (python -m lrctl.service.multi_worker); a client changes the LR through the chief while
it runs. Every worker must use the same LR at every step, switch at the same step with the
same version, and end with the same weights; after a worker dies and the job restarts from
its checkpoints, every worker resumes alike and later changes again land everywhere at once.

Nothing here depends on speed: each worker logs the version and the LR its train step
actually used at every step, and the test compares the logs, whatever steps they cover.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
from live import state_until

from lrctl.client import TrainingControlClient, schedules
from lrctl.service import TrainingControl
from lrctl.v1 import training_control_pb2 as pb

START_LIMIT = 180.0  # seconds for two TensorFlow processes to start on a loaded 2-core machine


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Job:
    """Two workers of one MultiWorkerMirroredStrategy job; worker 0 is the chief."""

    def __init__(self, folder: Path, checkpoints: Path, tag: str, steps: int = 0) -> None:
        self.folder, self.tag = folder, tag
        ports = _free_ports(2)
        self.port_file = folder / f"{tag}.port"
        self.logs = [folder / f"{tag}-{i}.jsonl" for i in range(2)]
        self.weights = [folder / f"{tag}-{i}.npz" for i in range(2)]
        self.stderr = [folder / f"{tag}-{i}.err" for i in range(2)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for i in range(2):
            tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                         "task": {"type": "worker", "index": i}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": "",
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            with open(self.stderr[i], "wb") as err:
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "lrctl.service.multi_worker", "--listen", "127.0.0.1:0",
                     "--port-file", str(self.port_file), "--log", str(self.logs[i]),
                     "--weights-out", str(self.weights[i]), "--checkpoint-dir", str(checkpoints),
                     "--checkpoint-every", "20", "--steps", str(steps)],
                    env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=folder))

    def client(self) -> TrainingControlClient:
        deadline = time.monotonic() + START_LIMIT
        while not self.port_file.exists():
            self._check_alive()
            assert time.monotonic() < deadline, "the chief never served"
            time.sleep(0.1)
        client = TrainingControlClient(f"127.0.0.1:{self.port_file.read_text()}")
        client.wait_until_ready(timeout=START_LIMIT)
        return client

    def _check_alive(self) -> None:
        for i, p in enumerate(self.processes):
            if p.poll() is not None:
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{self.errors(i)}")

    def errors(self, i: int) -> str:
        return self.stderr[i].read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM to the chief: every worker stops after the same step and exits 0."""
        self.processes[0].send_signal(signal.SIGTERM)
        for i, p in enumerate(self.processes):
            assert p.wait(timeout=START_LIMIT) == 0, self.errors(i)

    def freeze_at_logged_checkpoint(self, pointer: Path) -> dict[str, Any]:
        """Stop every worker (SIGSTOP) at a moment when both have logged the step of the newest
        checkpoint, and return its pointer. A worker logs a step once that step has run, so a
        worker caught just after a checkpoint has not logged its step yet: then let the job
        run on and try again. Frozen, nothing can write a newer checkpoint before the kill."""
        deadline = time.monotonic() + START_LIMIT
        while True:
            for p in self.processes:
                p.send_signal(signal.SIGSTOP)
            saved: dict[str, Any] = json.loads(pointer.read_text())
            if all(saved["step"] in self.logged_steps(i) for i in range(2)):
                return saved
            for p in self.processes:
                p.send_signal(signal.SIGCONT)
            self._check_alive()
            assert time.monotonic() < deadline, "the workers never logged a checkpoint's step"
            time.sleep(0.05)

    def logged_steps(self, i: int) -> set[int]:
        """Steps in worker i's log; a last line caught half-written does not count."""
        text = self.logs[i].read_text() if self.logs[i].exists() else ""
        return {json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")}

    def finish(self) -> None:
        """Wait for a job given `steps` to end by itself: every worker exits 0."""
        for i, p in enumerate(self.processes):
            assert p.wait(timeout=START_LIMIT) == 0, self.errors(i)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The follower frozen (SIGSTOP): the chief still answers, but no step can end (each
        needs the follower's collectives), so the step read inside stays the step."""
        self.processes[1].send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.processes[1].send_signal(signal.SIGCONT)

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)

    def log(self, i: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs[i].read_text().splitlines()]


@pytest.fixture()
def jobs(tmp_path: Path) -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def _workers_agree(state: pb.TrainingState, version: int) -> bool:
    return len(state.workers) == 2 and all(w.applied_version == version for w in state.workers)


def _mixed_changes(client: TrainingControlClient, count: int) -> list[pb.Change]:
    """`count` changes of every kind, some at a given step; each waits until applied."""
    kinds = [
        lambda: client.set_learning_rate(0.002, wait=True, reason="set"),
        lambda: client.scale_learning_rate(0.5, wait=True, reason="scale"),
        lambda: client.swap_schedule(schedules.ExponentialDecay(0.005, 5, 0.8, staircase=True),
                                     wait=True, reason="seed article swap"),
        lambda: client.set_learning_rate(0.003, apply_at_step=client.get_state().step + 7,
                                         wait=True, reason="at a step"),
        lambda: client.swap_schedule(schedules.PiecewiseLinear([(0, 0.0), (30, 0.01), (60, 0.001)]),
                                     origin="global", wait=True, reason="warmup"),
        lambda: client.scale_learning_rate(1.5, apply_after_steps=3, wait=True, reason="later"),
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


def _assert_consistent(job: Job, changes: list[pb.Change]) -> list[dict[str, Any]]:
    """Both workers' logs are identical, and each change shows there at its version and step."""
    logs = [job.log(0), job.log(1)]
    assert logs[0] == logs[1]
    log = logs[0]
    steps = [entry["step"] for entry in log]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # one entry per step, no gap
    by_step = {entry["step"]: entry for entry in log}
    for change in changes:
        assert change.status == pb.CHANGE_STATUS_APPLIED, change
        entry = by_step[change.applied_step]
        assert entry["version"] == change.version
        assert entry["lr"] == pytest.approx(change.learning_rate_after, rel=1e-6)
        if change.applied_step - 1 in by_step:
            assert by_step[change.applied_step - 1]["version"] < change.version
        if change.HasField("apply_at_step"):  # every step is a boundary: exactly there
            assert change.applied_step == change.apply_at_step
    chief, follower = (np.load(path) for path in job.weights)
    assert chief.files == follower.files
    for name in chief.files:
        assert chief[name].tobytes() == follower[name].tobytes(), name
    return log


def test_every_worker_switches_at_the_same_step(tmp_path: Path, jobs: list[Job]) -> None:
    job = Job(tmp_path, tmp_path / "ckpts", "run")
    jobs.append(job)
    with job.client() as client:
        changes = _mixed_changes(client, 24)
        final = changes[-1].version
        state = state_until(client, lambda s: _workers_agree(s, final))
        assert state.version == final
        assert [w.index for w in state.workers] == [0, 1]
    job.stop()
    log = _assert_consistent(job, changes)
    assert log[-1]["version"] == final


def test_a_restarted_job_resumes_alike_on_every_worker(tmp_path: Path, jobs: list[Job]) -> None:
    checkpoints = tmp_path / "ckpts"
    first = Job(tmp_path, checkpoints, "first")
    jobs.append(first)
    with first.client() as client:
        changes = _mixed_changes(client, 6)
        before = client.get_state()
        # Wait for a checkpoint taken after the last change, then a worker dies.
        pointer = checkpoints / "latest.json"
        state_until(client, lambda s: pointer.exists()
               and json.loads(pointer.read_text())["step"] > changes[-1].applied_step)
    saved = first.freeze_at_logged_checkpoint(pointer)
    first.processes[1].kill()
    first.kill()  # the job restarts as a whole, as MultiWorkerMirroredStrategy requires
    assert saved["version"] == changes[-1].version
    # What the first job's workers logged at the checkpoint's step (the logs are line-buffered).
    resumed_at = {entry["step"]: entry for entry in first.log(0)}[saved["step"]]
    assert resumed_at == {entry["step"]: entry for entry in first.log(1)}[saved["step"]]

    second = Job(tmp_path, checkpoints, "second")
    jobs.append(second)
    with second.client() as client:
        state = state_until(client, lambda s: _workers_agree(s, saved["version"]))
        assert state.version == saved["version"]
        assert state.schedule == before.schedule and state.scale == before.scale
        later = _mixed_changes(client, 4)
        state_until(client, lambda s: _workers_agree(s, later[-1].version))
    second.stop()
    log = _assert_consistent(second, later)
    # Both workers resumed at the checkpoint's step with the version and the learning rate
    # the first job used at that step.
    assert log[0] == resumed_at and resumed_at["version"] == saved["version"]
    assert later[0].version == saved["version"] + 1  # versions go on from the checkpoint's


def test_the_pipelined_exchange_switches_at_the_step_asked_across_a_restart(
        tmp_path: Path, jobs: list[Job]) -> None:
    """The chief decides one exchange ahead and every worker loads at the next: an
    `apply_at_step` still switches both workers exactly there, and a change decided at a
    checkpoint's boundary but loaded only after it (the first job ends at `end`: its last
    boundary decides the change for `end + 1`) is loaded at `end + 1` on both workers of the
    restarted job, and one asked there lands exactly too. (A job that finishes cancels what is
    still pending: a change pending across a restart is `test_a_restarted_job...`'s case.)"""
    checkpoints, end = tmp_path / "ckpts", 300
    first = Job(tmp_path, checkpoints, "first", steps=end)
    jobs.append(first)
    with first.client() as client:
        with first.held():  # the steps named below are still ahead when they are decided
            at = client.get_state().step + 20
            assert at + 10 < end, f"the first job reached step {at - 20} before its client connected"
            exact = client.set_learning_rate(0.004, apply_at_step=at, reason="exact")
            decided = client.set_learning_rate(0.002, apply_at_step=end + 1, reason="decided at the end")
        exact = client.wait_change(exact.name, timeout=START_LIMIT)
        decided = client.wait_change(decided.name, timeout=START_LIMIT)  # at boundary `end`
        assert decided.status == pb.CHANGE_STATUS_APPLIED and decided.applied_step == end + 1
    first.finish()
    _assert_consistent(first, [exact])
    assert first.log(0)[-1]["step"] == end - 1 and first.log(0)[-1]["version"] == exact.version
    pointer = json.loads((checkpoints / "latest.json").read_text())
    assert pointer["step"] == end
    saved = json.loads((checkpoints / pointer["control"]).read_text())
    # The checkpoint holds what ran at its step, and the decided change as one to re-apply.
    assert saved["version"] == exact.version and len(saved["replay"]) == 1

    second = Job(tmp_path, checkpoints, "second", steps=end + 80)
    jobs.append(second)
    with second.client() as client:
        with second.held():
            at = client.get_state().step + 20
            assert at + 10 < end + 80, f"the second job reached step {at - 20} before its client connected"
            later = client.set_learning_rate(0.003, apply_at_step=at, reason="after the restart")
        later = client.wait_change(later.name, timeout=START_LIMIT)
        decided = client.get_change(decided.name)
    second.finish()
    log = _assert_consistent(second, [decided, later])
    assert log[0]["step"] == end and log[0]["version"] == exact.version
    assert log[1]["step"] == end + 1 and log[1]["version"] == decided.version
    assert later.applied_step == later.apply_at_step


def test_one_worker_needs_no_exchange_and_stops_at_once() -> None:
    control = TrainingControl(keras.optimizers.SGD(0.1), strategy=tf.distribute.get_strategy())
    assert control.workers is None and control.is_chief
    control.step_boundary()
    assert not control.should_stop
    control.request_stop()
    assert control.should_stop
    assert control.controller.snapshot().workers == ()
