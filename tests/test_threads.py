"""Changes submitted from other threads while `fit` runs: all applied, each exactly once, in
each thread's submission order, and only at step boundaries, where the weights show them."""

from __future__ import annotations

import threading

import keras
import pytest
from tiny import fit, make_model

from lrctl.service import TrainingControl
from lrctl.service.control.changes import ChangeRequest, ChangeStatus, PinLearningRate

THREADS = 4
PER_THREAD = 12
SPE = 4  # boundaries every 4 steps: a change must never land inside an execution
MAX_STEPS = 4000  # a cap only; training stops as soon as every change has been applied


def test_changes_from_four_threads_while_fit_runs():
    model = make_model(1 / 1024, steps_per_execution=SPE)
    control = TrainingControl(model.optimizer, history_size=4 * THREADS * PER_THREAD)
    controller = control.controller
    go = threading.Event()
    done = threading.Semaphore(0)
    errors: list[BaseException] = []
    submitted: dict[str, int] = {}  # request id -> change id

    def lr_of(thread: int, k: int) -> float:
        return (2 + thread * PER_THREAD + k) / 1024  # distinct, exact in float32

    def submitter(thread: int) -> None:
        try:
            go.wait()
            for k in range(PER_THREAD):
                change = controller.submit(
                    ChangeRequest(PinLearningRate(lr_of(thread, k)), request_id=f"t{thread}-{k}"))
                submitted[f"t{thread}-{k}"] = change.id
                # Even threads wait for each change; odd ones submit bursts of three, then wait.
                if thread % 2 == 0 or k % 3 == 2:
                    assert controller.wait(change, timeout=None).status is ChangeStatus.APPLIED
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
        finally:
            done.release()

    class Conductor(keras.callbacks.Callback):
        """Releases the submitters once training runs; stops it once they are all served."""

        finished = 0

        def on_train_batch_begin(self, batch, logs=None):
            go.set()

        def on_train_batch_end(self, batch, logs=None):
            while done.acquire(blocking=False):
                self.finished += 1
            if self.finished == THREADS and controller.snapshot().pending == ():
                self.model.stop_training = True

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    try:
        recorder = fit(model, control, MAX_STEPS, Conductor())
    finally:
        go.set()
        for t in threads:
            t.join()
    assert not errors, errors
    final_step = int(model.optimizer.iterations.numpy())
    assert final_step < MAX_STEPS, "training ended before every change was applied"

    history = controller.snapshot().recent
    total = THREADS * PER_THREAD
    # Every change once, all applied, versions 1..N with no gap or repeat.
    assert sorted(c.request.request_id for c in history) == sorted(submitted)
    assert len({c.id for c in history}) == total
    assert all(c.status is ChangeStatus.APPLIED for c in history)
    assert sorted(c.version for c in history) == list(range(1, total + 1))
    assert controller.snapshot().version == total
    # Each thread's changes in its submission order.
    by_id = {c.request.request_id: c for c in history}
    for thread in range(THREADS):
        versions = [by_id[f"t{thread}-{k}"].version for k in range(PER_THREAD)]
        assert versions == sorted(versions), f"thread {thread}: {versions}"
    # Only at boundaries between executions.
    assert all(c.applied_step % SPE == 0 for c in history)
    assert len({c.applied_step for c in history}) >= PER_THREAD  # spread over many boundaries
    assert all(c.learning_rate_after == pytest.approx(c.request.action.learning_rate) for c in history)

    # The LR the weights saw in each execution is the one in force at its first step: the last
    # change (highest version) applied at or before that boundary.
    in_force = sorted((c.applied_step, c.version, c.request.action.learning_rate) for c in history)

    def expected_lr(step: int) -> float:
        lr = 1 / 1024
        for applied_step, _, value in in_force:
            if applied_step <= step:
                lr = value
        return lr

    executions = recorder.executions()
    assert executions[-1][1] == final_step
    for s0, s1, lr_sum in executions:
        assert s1 - s0 == SPE
        assert lr_sum == pytest.approx(SPE * expected_lr(s0), rel=1e-6), f"steps {s0}..{s1 - 1}"
