"""The read-modify-write helpers (`update`, `update_learning_rate`) against a real server and
real TensorFlow: they keep the schedule, wait for the outcome they retry on, decide again on
the fresh state after a conflict, and are fenced by run id and version."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import keras
import pytest
from live import LiveTrainer

from lrctl.client import (
    FailedPrecondition,
    Scale,
    Swap,
    TrainingControlClient,
    VersionConflict,
    pb,
    schedules,
)
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve

LIMIT = 120.0  # seconds: a safety limit for a hung call, not a timing check


def _until(ok: Callable[[], bool]) -> None:
    deadline = time.monotonic() + LIMIT
    while not ok():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_update_learning_rate_keeps_a_cosine_decay_and_is_fenced() -> None:
    cosine = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=1_000_000)
    with LiveTrainer(cosine).running() as trainer, \
            TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        run_id = client.get_state().run_id
        change = client.update_learning_rate(lambda s: s.learning_rate * 0.5, reason="halve",
                                             expected_run_id=run_id)
        # Applied when it returns, as a scale of the schedule: still a CosineDecay, halved.
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert change.schedule.WhichOneof("kind") == "cosine_decay"
        assert change.scale_after == pytest.approx(0.5)
        assert trainer.lr_at(change.applied_step) == pytest.approx(change.learning_rate_after,
                                                                   rel=1e-4)
        assert change.learning_rate_after == pytest.approx(0.005, rel=1e-3)

        # Another run's id, or a version the caller did not decide on: refused, nothing changes.
        calls: list[pb.TrainingState] = []
        with pytest.raises(FailedPrecondition) as refused:
            client.update_learning_rate(lambda s: calls.append(s) or 0.001, expected_run_id="x")
        assert refused.value.reason == "RUN_ID_MISMATCH"
        with pytest.raises(VersionConflict) as conflict:
            client.update(lambda s: calls.append(s) or Scale(2.0), expected_version=0)
        assert conflict.value.current_version == change.version
        assert len(calls) == 1  # decided once, for the run-id check; a stale version: never
        assert client.get_state().version == change.version

        # A decision to do nothing sends nothing; a Swap decision swaps, with its scale.
        assert client.update(lambda s: None) is None
        swapped = client.update(lambda s: Swap(schedules.Constant(0.004), scale=0.5))
        assert swapped is not None and swapped.status == pb.CHANGE_STATUS_APPLIED
        assert swapped.version == change.version + 1
        assert trainer.lr_at(swapped.applied_step) == pytest.approx(0.002, rel=1e-4)


def test_a_conflict_at_the_boundary_is_decided_again_on_the_fresh_state() -> None:
    # A run that has not started: a change applies only when the test calls step_boundary().
    cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=1000)
    control = TrainingControl(keras.optimizers.SGD(learning_rate=cosine))
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client, \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as other:
        seen: list[tuple[int, float]] = []

        def halve_a_fifth(state: pb.TrainingState) -> float:
            seen.append((state.version, state.scale))
            if len(seen) == 1:  # someone else's change gets in first, at the same boundary
                other.scale_learning_rate(0.5, reason="someone else")
            return state.learning_rate * 0.8

        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["change"] = client.update_learning_rate(halve_a_fifth, reason="mine")
            except BaseException as e:  # noqa: BLE001 -- surfaced by the asserts below
                outcome["error"] = e

        helper = threading.Thread(target=run)
        helper.start()
        # Both are queued on version 0; at the boundary the other applies, so ours aborts.
        _until(lambda: len(control.controller.snapshot().pending) == 2)
        control.step_boundary()
        # The helper read the state again and decided again on version 1.
        _until(lambda: len(seen) == 2 and len(control.controller.snapshot().pending) == 1)
        control.step_boundary()
        helper.join(LIMIT)

        assert "error" not in outcome, outcome
        change = outcome["change"]
        assert seen == [(0, 1.0), (1, 0.5)]
        # Both decisions hold: the other's x0.5, then ours x0.8 of what it found.
        assert change.status == pb.CHANGE_STATUS_APPLIED and change.version == 2
        assert change.scale_after == pytest.approx(0.4)
        assert change.schedule.WhichOneof("kind") == "cosine_decay"
        statuses = [(c.reason, c.status) for c in client.iter_changes()]
        assert statuses == [("mine", pb.CHANGE_STATUS_APPLIED), ("mine", pb.CHANGE_STATUS_ABORTED),
                            ("someone else", pb.CHANGE_STATUS_APPLIED)]
