"""The asyncio server under its full budgets, on a real `model.fit`: 200 WatchState streams
(view BASIC) and a client pinning the learning rate while training runs, then 1,000 WaitChange
calls at once on changes due a few steps ahead. Every call is answered (nothing refused), each
wait ends with its change APPLIED at its exact step, every stream sees the last change, and
training advanced throughout.

No timing is asserted. Training is held at one step boundary (a callback) while the waiters
arrive, so that the changes cannot apply before all of them wait; before and after the hold it
runs freely. A step cap bounds the run if the test fails half-way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import keras
from google.protobuf import duration_pb2
from tiny import BATCH, data, make_model

from lrctl.service import TrainingControl
from lrctl.service.rpc.budgets import MAX_STREAMS, MAX_WAITERS
from lrctl.service.rpc.server import RunningServer, serve
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

LIMIT = 120.0  # seconds: a safety limit for anything that hangs, never a timing check
WAITS = MAX_WAITERS  # WaitChange calls open at once
CHANGES = 10  # changes they wait for, WAITS // CHANGES each
STREAMS = MAX_STREAMS
MAX_PINS = 50  # the pinning client's changes, at most
STEP_CAP = 50_000  # training ends here if the test never stops it


class _Gate(keras.callbacks.Callback):
    """Before a step (and before lrctl's callback applies what is due there): holds training
    while `hold` is set and `release` is not; stops it once `stop` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.held, self.release, self.stop = (threading.Event() for _ in range(4))
        self.held_at = -1

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.hold.is_set() and not self.release.is_set():
            self.held_at = int(self.model.optimizer.iterations.numpy())
            self.held.set()
            self.release.wait(LIMIT)
        if self.stop.is_set():
            self.model.stop_training = True


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.01)


class _Watcher:
    """One WatchState stream (view BASIC): the versions it saw."""

    def __init__(self, stub: pb_grpc.TrainingControlServiceStub) -> None:
        self.versions: list[int] = []
        self.task = asyncio.create_task(self._watch(stub))

    async def _watch(self, stub: pb_grpc.TrainingControlServiceStub) -> None:
        async for response in stub.WatchState(pb.WatchStateRequest(view=pb.STATE_VIEW_BASIC),
                                              timeout=10 * LIMIT):
            assert not response.state.pending_changes and not response.state.recent_changes
            self.versions.append(response.state.version)


async def _pin(stub: pb_grpc.TrainingControlServiceStub, stop: asyncio.Event) -> int:
    """Pin the learning rate again and again (without waiting) until `stop`; how many times."""
    pins = 0
    while not stop.is_set() and pins < MAX_PINS:
        await stub.SetLearningRate(pb.SetLearningRateRequest(learning_rate=0.01 + pins / 10_000),
                                   timeout=LIMIT)
        pins += 1
        await asyncio.sleep(0.02)
    return pins


async def _load(server: RunningServer, port: int, gate: _Gate) -> dict[str, Any]:
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)

        async def step() -> int:
            return (await stub.GetState(pb.GetStateRequest(view=pb.STATE_VIEW_BASIC), timeout=LIMIT)).state.step

        # Training runs under every stream and a pinning client.
        watchers = [_Watcher(stub) for _ in range(STREAMS)]
        await _until(lambda: all(w.versions for w in watchers), "every stream's first state")
        stop_pinning = asyncio.Event()
        pinner = asyncio.create_task(_pin(stub, stop_pinning))
        first_step = await step()
        await _until(lambda: all(len(w.versions) > 1 for w in watchers), "every stream's second update")

        # Training held at step `held`: changes due just after it, and every waiter in place.
        gate.hold.set()
        await _until(gate.held.is_set, "training held")
        held = gate.held_at
        assert held > first_step, "training did not advance under the streams"
        changes = [(await stub.SetLearningRate(pb.SetLearningRateRequest(
            learning_rate=0.02 + i / 1000, apply_at_step=held + 1 + i, request_id=f"load-{i}"),
            timeout=LIMIT)).change for i in range(CHANGES)]
        waits = [asyncio.ensure_future(stub.WaitChange(pb.WaitChangeRequest(
            name=changes[i % CHANGES].name, timeout=duration_pb2.Duration(seconds=int(LIMIT))),
            timeout=2 * LIMIT)) for i in range(WAITS)]
        await _until(lambda: server.waiting_calls == WAITS, f"{WAITS} waiting calls")
        assert not any(w.done() for w in waits)
        waited_at = time.monotonic()
        gate.release.set()

        answers = await asyncio.gather(*waits)
        last_version = max(answer.change.version for answer in answers)
        await _until(lambda: all(w.versions[-1] >= last_version for w in watchers),
                     "every stream seeing the last change")
        last_step = await step()
        stop_pinning.set()
        pins = await pinner
        assert not any(w.task.done() for w in watchers), [w.task for w in watchers if w.task.done()]
        for watcher in watchers:
            watcher.task.cancel()
        await asyncio.gather(*(w.task for w in watchers), return_exceptions=True)
    return {"changes": changes, "answers": answers, "held": held, "last_step": last_step,
            "pins": pins, "updates": sum(len(w.versions) for w in watchers),
            "seconds": time.monotonic() - started, "wait_seconds": time.monotonic() - waited_at}


def test_a_thousand_waiters_and_two_hundred_streams_while_training_runs() -> None:
    model = make_model(0.01)
    control = TrainingControl(model.optimizer, history_size=4 * (CHANGES + MAX_PINS))
    gate = _Gate()
    failure: list[BaseException] = []

    def train() -> None:
        x, y = data(STEP_CAP)
        try:
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                      callbacks=[gate, control.callback])
        except BaseException as e:  # noqa: BLE001 -- reported below
            failure.append(e)

    with serve(control.controller, "127.0.0.1:0") as (server, port):
        trainer = threading.Thread(target=train, name="trainer", daemon=True)
        trainer.start()
        try:
            deadline = time.monotonic() + LIMIT
            while control.controller.snapshot().step < 1:
                assert time.monotonic() < deadline and not failure, failure
                time.sleep(0.01)
            result = asyncio.run(_load(server, port, gate))
        finally:
            gate.release.set()
            gate.stop.set()
            trainer.join(LIMIT)
    assert not failure, failure

    held, changes, answers = result["held"], result["changes"], result["answers"]
    assert len(answers) == WAITS
    for i, answer in enumerate(answers):
        change = changes[i % CHANGES]
        assert answer.done and answer.change.status == pb.CHANGE_STATUS_APPLIED, answer
        assert (answer.change.name, answer.change.applied_step) == (change.name, held + 1 + i % CHANGES)
    assert result["last_step"] > held + CHANGES  # training went on past the changes
    assert result["pins"] >= 1
    print(f"\n{WAITS} WaitChange calls and {STREAMS} streams ({result['updates']} updates), "
          f"{result['pins']} pins, steps {held} -> {result['last_step']}: {result['seconds']:.1f} s "
          f"in all, {result['wait_seconds']:.1f} s from the release to the last stream update")
