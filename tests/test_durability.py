"""Issue 16: an acknowledged change survives a crash. One real `lrctl-trainer` is killed with
SIGKILL 0-50 ms after an answer, again and again, while checkpoints are written every two
steps (so some kills land inside a checkpoint write), and restarted from its folder. After
each restart every answer ever given must still hold: applied changes with their version,
step and learning rate (the resumed run repeats those steps and re-applies them there),
pending ones pending, retries answered with the original record, no version handed out twice.
No timing is asserted: the kill delays are random (seeded), and the assertions hold for any."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_trainer import LIMIT, _Trainer

from lrctl.client import FailedPrecondition, LrctlError, TrainingControlClient, pb

pytest.importorskip("tensorflow")

RESTARTS = 10
FAR = 10**6  # steps ahead: a change due there stays pending for the whole test
CALL = 10.0  # seconds: a call's limit, so one sent to a killed trainer fails instead of hanging


@dataclass
class _Sent:
    """A change as the client sent it, and the record it was answered with."""

    send: Callable[[TrainingControlClient], pb.Change]  # the same request again
    answer: pb.Change
    far: bool  # due FAR ahead: must stay pending


def _request(rng: random.Random, name: str, step: int) -> tuple[Callable[[TrainingControlClient], pb.Change], bool]:
    kind = rng.choice(["set", "set-wait", "scale", "scale-wait", "swap", "near", "far"])
    lr = round(rng.uniform(0.001, 0.05), 6)
    factor = round(rng.uniform(0.8, 1.25), 4)
    decay = {"class_name": "ExponentialDecay",
             "config": {"initial_learning_rate": lr, "decay_steps": rng.randint(5, 50), "decay_rate": 0.9}}
    at = step + (FAR if kind == "far" else rng.randint(3, 30))
    wait = rng.random() < 0.5
    sends: dict[str, Callable[[TrainingControlClient], pb.Change]] = {
        "set": lambda c: c.set_learning_rate(lr, request_id=name, timeout=CALL),
        "set-wait": lambda c: c.set_learning_rate(lr, request_id=name, wait=True, timeout=CALL),
        "scale": lambda c: c.scale_learning_rate(factor, request_id=name, timeout=CALL),
        "scale-wait": lambda c: c.scale_learning_rate(factor, request_id=name, wait=True, timeout=CALL),
        "swap": lambda c: c.swap_schedule(decay, request_id=name, wait=wait, timeout=CALL),
        "near": lambda c: c.set_learning_rate(lr, apply_at_step=at, request_id=name, timeout=CALL),
        "far": lambda c: c.set_learning_rate(lr, apply_at_step=at, request_id=name, timeout=CALL),
    }
    return sends[kind], kind == "far"


def _ledger(client: TrainingControlClient) -> dict[str, pb.Change]:
    return {c.request_id: c for c in client.iter_changes(page_size=500, timeout=CALL)}


def _final(change: pb.Change) -> tuple[object, ...]:
    """What an ended record says for ever: its status, version, step and learning rate."""
    return (change.status, change.version, change.applied_step if change.HasField("applied_step") else None,
            change.learning_rate_after if change.HasField("learning_rate_after") else None)


def test_acknowledged_changes_survive_sigkill_at_any_moment(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    rng = random.Random(16)
    ckpt = tmp_path / "ckpt"
    args = ("--demo", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2")
    sent: dict[str, _Sent] = {}
    ended: dict[str, tuple[object, ...]] = {}  # request id -> its final record, once seen ended
    owner: dict[int, str] = {}  # version -> the request id it was handed to
    torn_writes = 0
    for round_ in range(RESTARTS + 1):
        run = _Trainer(*args, env=subprocess_env)
        try:
            run.wait_until_training()
            with TrainingControlClient(run.target, timeout=LIMIT) as client:
                if round_:
                    _check(client, sent, ended, owner)
                # New changes; SIGKILL lands 0-50 ms after the k-th answer, while more are sent.
                killer: threading.Timer | None = None
                kill_after = rng.randint(2, 6)
                for i in range(40):
                    name = f"r{round_}-{i}"
                    try:
                        send, far = _request(rng, name, client.get_state(timeout=CALL).step)
                        answer = send(client)
                    except LrctlError as e:
                        if killer is not None:
                            break  # killed: this one was never answered
                        if isinstance(e, FailedPrecondition):
                            continue  # e.g. a step among those a restart is replaying: refused
                        raise
                    sent[name] = _Sent(send, answer, far)
                    if killer is None and i + 1 >= kill_after:
                        killer = threading.Timer(rng.uniform(0, 0.05), run.process.kill)
                        killer.start()
                assert killer is not None, "the trainer was never killed"
                killer.join()
        finally:
            run.process.kill()
            run.process.wait(timeout=LIMIT)
        torn_writes += any(p.name.startswith(".tmp-") for p in ckpt.iterdir())
    print(f"{len(sent)} changes answered over {RESTARTS} kills; {torn_writes} kill(s) interrupted a "
          "checkpoint write")

    run = _Trainer(*args, env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            _check(client, sent, ended, owner)
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr
    finally:
        run.process.kill()
    assert "Traceback" not in run.stderr, run.stderr


def _check(client: TrainingControlClient, sent: dict[str, _Sent], ended: dict[str, tuple[object, ...]],
           owner: dict[int, str]) -> None:
    """Every answer given before the kills still holds in the restarted trainer."""
    ledger = _ledger(client)
    for name, change in sent.items():
        record = ledger.get(name)
        assert record is not None, f"{name} was answered {_final(change.answer)} and is lost"
        if change.answer.status != pb.CHANGE_STATUS_PENDING:
            assert _final(record) == _final(change.answer), name  # applied: same version, step, LR
        elif change.far:
            assert record.status == pb.CHANGE_STATUS_PENDING, name
        else:  # pending when answered: pending still, or it ended since (and stays so)
            assert record.status != pb.CHANGE_STATUS_CANCELLED, name
        if record.status != pb.CHANGE_STATUS_PENDING:
            assert ended.setdefault(name, _final(record)) == _final(record), f"{name} changed its ending"
    for name, record in ledger.items():
        if record.version:  # a version belongs to one change, in every process of the run
            assert owner.setdefault(record.version, name) == name, f"v{record.version} handed out twice"
    # A retry (same request id and payload) returns the record, and applies nothing again.
    for name, change in sent.items():
        retry = change.send(client)
        if name in ended:
            assert _final(retry) == ended[name], name
        assert retry.request_id == name
    # The resumed run repeats the steps it lost and re-applies each change there with its
    # version: once it is past them, the version in force is the newest one handed out.
    deadline = time.monotonic() + LIMIT
    while True:
        state, ledger = client.get_state(timeout=CALL), _ledger(client)
        applied = [c for c in ledger.values() if c.status == pb.CHANGE_STATUS_APPLIED]
        waiting = [c for c in ledger.values() if c.status == pb.CHANGE_STATUS_PENDING
                   and not (c.HasField("apply_at_step") and c.apply_at_step > state.step + FAR // 2)]
        if not waiting and state.step > max((c.applied_step for c in applied), default=0):
            assert state.version == max((c.version for c in applied), default=0)
            return
        assert time.monotonic() < deadline, "the replayed changes never came back in force"
        time.sleep(0.05)
