"""WaitChange on the asyncio server, without TensorFlow: a real server and real clients over a
controller whose step boundaries the test drives (`apply_due`), so nothing depends on timing.
The timeout answers the pending record; a stopping trainer answers UNAVAILABLE and the resumed
one finds the change again; the waiter budget refuses the call beyond it, shared with
`wait_until_applied`, and comes back."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from fakes import MemoryTarget
from google.protobuf import duration_pb2

from lrctl.service.control.changes import Phase
from lrctl.service.control.controller import Controller
from lrctl.service.rpc.server import RunningServer, serve
from lrctl.service.schedules import specs
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

LIMIT = 60.0  # a safety limit, never a timing check


def _controller() -> Controller:
    controller = Controller(MemoryTarget(specs.ActiveSchedule(specs.Constant(0.1))))
    controller.set_phase(Phase.TRAINING)
    return controller


@pytest.fixture
def served() -> Iterator[tuple[Controller, RunningServer, pb_grpc.TrainingControlServiceStub]]:
    controller = _controller()
    with serve(controller, "127.0.0.1:0", max_waiters=3) as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield controller, server, pb_grpc.TrainingControlServiceStub(channel)


def _pin(stub: pb_grpc.TrainingControlServiceStub, lr: float, **options: Any) -> pb.Change:
    return stub.SetLearningRate(pb.SetLearningRateRequest(learning_rate=lr, **options), timeout=LIMIT).change


def _wait(stub: pb_grpc.TrainingControlServiceStub, name: str, seconds: float = LIMIT) -> Any:
    """A WaitChange in flight (a future: .result() raises its grpc.RpcError)."""
    request = pb.WaitChangeRequest(name=name, timeout=duration_pb2.Duration(seconds=int(seconds)))
    return stub.WaitChange.future(request, timeout=2 * LIMIT)


def _until(condition: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(int(LIMIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"{what} never happened")


def test_wait_change_at_its_timeout_answers_the_pending_record(served: Any) -> None:
    controller, _, stub = served
    change = _pin(stub, 0.05, apply_at_step=100)
    response = stub.WaitChange(pb.WaitChangeRequest(
        name=change.name, timeout=duration_pb2.Duration(nanos=200_000_000)), timeout=LIMIT)
    assert not response.done
    assert (response.change.name, response.change.status) == (change.name, pb.CHANGE_STATUS_PENDING)
    assert response.change.apply_at_step == 100
    for bad in (duration_pb2.Duration(seconds=-1), duration_pb2.Duration(seconds=601)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.WaitChange(pb.WaitChangeRequest(name=change.name, timeout=bad), timeout=LIMIT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith("timeout ")
    with pytest.raises(grpc.RpcError) as unknown:
        stub.WaitChange(pb.WaitChangeRequest(name="changes/999"), timeout=LIMIT)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    controller.apply_due(100)
    response = stub.WaitChange(pb.WaitChangeRequest(name=change.name), timeout=LIMIT)
    assert response.done and response.change.status == pb.CHANGE_STATUS_APPLIED


def test_waiters_beyond_the_budget_are_refused_and_the_budget_comes_back(served: Any) -> None:
    controller, server, stub = served
    change = _pin(stub, 0.05, apply_at_step=10)
    waits = [_wait(stub, change.name) for _ in range(3)]
    _until(lambda: server.waiting_calls == 3, "three waiters")
    with pytest.raises(grpc.RpcError) as refused:
        stub.WaitChange(pb.WaitChangeRequest(name=change.name), timeout=LIMIT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # One budget for both kinds of waiting call; a call that does not wait still goes through.
    with pytest.raises(grpc.RpcError) as refused:
        _pin(stub, 0.02, apply_at_step=20, wait_until_applied=True)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.GetChange(pb.GetChangeRequest(name=change.name), timeout=LIMIT).change.name == change.name
    assert not any(w.done() for w in waits)

    controller.apply_due(10)
    for wait in waits:
        response = wait.result(timeout=LIMIT)
        assert response.done and response.change.status == pb.CHANGE_STATUS_APPLIED
        assert response.change.applied_step == 10
    _until(lambda: server.waiting_calls == 0, "the budget given back")
    later = _pin(stub, 0.02, apply_at_step=20)
    waits = [_wait(stub, later.name) for _ in range(3)]
    controller.apply_due(20)
    assert all(w.result(timeout=LIMIT).done for w in waits)


def test_a_wait_across_a_restart_is_unavailable_while_stopped_and_finds_the_change_after() -> None:
    """The trainer stops (SIGTERM) with the change pending: the waiting call, and any new one,
    gets UNAVAILABLE (transient); the restarted trainer resumes from the checkpoint, and a
    WaitChange by the same name finds the change pending and returns once it applies."""
    first = _controller()
    with serve(first, "127.0.0.1:0") as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)
        change = _pin(stub, 0.05, apply_at_step=50)
        waiting = _wait(stub, change.name)
        _until(lambda: server.waiting_calls == 1, "the waiter")
        first.shut_down()
        first.set_phase(Phase.STOPPED)
        with pytest.raises(grpc.RpcError) as stopped:
            waiting.result(timeout=LIMIT)
        assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "stopped" in stopped.value.details()
        with pytest.raises(grpc.RpcError) as again:
            stub.WaitChange(pb.WaitChangeRequest(name=change.name), timeout=LIMIT)
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        checkpoint = first.export_state()

    second = Controller(MemoryTarget(specs.ActiveSchedule(specs.Constant(0.1))))
    second.import_state(checkpoint)
    second.set_phase(Phase.TRAINING)
    with serve(second, "127.0.0.1:0") as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)
        found = stub.GetChange(pb.GetChangeRequest(name=change.name), timeout=LIMIT).change
        assert (found.request_id, found.status) == (change.request_id, pb.CHANGE_STATUS_PENDING)
        waiting = _wait(stub, change.name)
        _until(lambda: server.waiting_calls == 1, "the waiter")
        second.apply_due(50)
        response = waiting.result(timeout=LIMIT)
        assert response.done and response.change.status == pb.CHANGE_STATUS_APPLIED
        assert (response.change.name, response.change.applied_step) == (change.name, 50)
