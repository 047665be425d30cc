"""Changes as resources through the real server and the real clients: every accepted change
has a name, GetChange finds it, WaitChange waits for it (by name, across a trainer restart
too), ListChanges filters, and GetState/WatchState return the view asked for. The control
below is idle (its run has not started): nothing applies unless a test calls
`step_boundary()`, so no assertion depends on timing."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import grpc
import keras
import pytest
from google.protobuf import duration_pb2

from lrctl.client import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    TrainingControlClient,
    Unavailable,
    aio,
    calls,
    cli,
    errors,
    pb,
    schedules,
)
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

LIMIT = 60.0  # a safety limit, never a timing check
Idle = tuple[TrainingControl, TrainingControlClient]


@pytest.fixture
def idle() -> Iterator[tuple[TrainingControl, TrainingControlClient]]:
    """A real server over a control whose run has not started (SGD at 0.1, step 0)."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:
        yield control, client


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run `fn` on a thread; the returned function joins it and returns (or raises) its result."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 -- handed to the joiner
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(LIMIT)
        assert outcome, "the thread did not finish"
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return join


def violations(error: errors.LrctlError) -> list[str]:
    return [field for field, _ in error.field_violations]


def test_every_accepted_change_has_a_name_and_get_change_finds_it(idle: Idle) -> None:
    control, client = idle
    pinned = client.set_learning_rate(0.05)
    swapped = client.swap_schedule(schedules.ExponentialDecay(0.1, 100, 0.5))
    checked = client.scale_learning_rate(0.5, validate_only=True)
    assert pinned.name.startswith("changes/") and swapped.name.startswith("changes/")
    assert pinned.name != swapped.name
    assert checked.status == pb.CHANGE_STATUS_VALIDATED and checked.name == ""  # not kept
    assert [c.name for c in client.iter_changes()] == [swapped.name, pinned.name]
    assert client.get_change(pinned.name) == pinned
    control.step_boundary()
    applied = client.get_change(swapped.name)
    assert (applied.status, applied.version, applied.request_id) == \
        (pb.CHANGE_STATUS_APPLIED, 2, swapped.request_id)
    # By request id or version: one filtered ListChanges, the same record.
    assert client.get_change(request_id=swapped.request_id) == applied
    assert client.get_change(version=2) == applied
    with pytest.raises(ValueError, match="exactly one"):
        client.get_change(pinned.name, version=1)


def test_get_change_refuses_unknown_and_malformed_names(idle: Idle) -> None:
    _, client = idle
    client.set_learning_rate(0.05)
    with pytest.raises(NotFound, match="no change 999 is known"):
        client.get_change("changes/999")
    for bad in ("change/1", "changes/0", "changes/x", "1"):
        with pytest.raises(InvalidArgument, match='"changes/{id}"') as info:
            client.get_change(bad)
        assert violations(info.value) == ["name"]
    with pytest.raises(InvalidArgument, match="must be set") as info:
        client.get_change("")
    assert violations(info.value) == ["name"]
    with pytest.raises(NotFound):
        client.get_change(request_id="no-such-request")
    with pytest.raises(NotFound):
        client.get_change(version=0)


def test_wait_change_returns_the_terminal_change(idle: Idle) -> None:
    control, client = idle
    change = client.scale_learning_rate(0.5)
    by_name = in_thread(lambda: client.wait_change(change.name, timeout=LIMIT))
    by_request_id = in_thread(lambda: client.wait_change(request_id=change.request_id, timeout=LIMIT))
    (applied,) = control.step_boundary()
    assert applied.request.request_id == change.request_id
    for join in (by_name, by_request_id):
        done = join()
        assert (done.name, done.status, done.version) == (change.name, pb.CHANGE_STATUS_APPLIED, 1)
    # Terminal already: answered at once, by name, request id or version.
    assert client.wait_change(change.name, timeout=0).status == pb.CHANGE_STATUS_APPLIED
    assert client.wait_change(version=1, timeout=0).name == change.name


def test_wait_change_at_its_timeout_leaves_the_change_pending(idle: Idle) -> None:
    control, client = idle
    change = client.set_learning_rate(0.05)
    stub = pb_grpc.TrainingControlServiceStub(client.channel)
    response = stub.WaitChange(pb.WaitChangeRequest(
        name=change.name, timeout=duration_pb2.Duration(nanos=1_000_000)), timeout=LIMIT)
    assert not response.done and response.change.status == pb.CHANGE_STATUS_PENDING
    assert response.change.name == change.name
    with pytest.raises(DeadlineExceeded, match=f"change {change.name} .* still pending"):
        client.wait_change(change.name, timeout=0)
    with pytest.raises(DeadlineExceeded):
        client.wait_change(request_id=change.request_id, timeout=0)
    assert client.get_change(change.name).status == pb.CHANGE_STATUS_PENDING
    with pytest.raises(grpc.RpcError) as raw:
        stub.WaitChange(pb.WaitChangeRequest(name=change.name,
                                             timeout=duration_pb2.Duration(seconds=601)), timeout=LIMIT)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout" in raw.value.details()
    assert control.step_boundary()[0].request.request_id == change.request_id


def test_a_cancelled_change_ends_the_wait(idle: Idle) -> None:
    _, client = idle
    change = client.set_learning_rate(0.05)
    waiting = in_thread(lambda: client.wait_change(change.name, timeout=LIMIT))
    client.cancel_change(request_id=change.request_id, reason="superseded")
    done = waiting()
    assert done.status == pb.CHANGE_STATUS_CANCELLED and done.error == "cancelled: superseded"


def test_wait_change_by_name_survives_a_restart_of_the_trainer() -> None:
    """The trainer stops with the change pending, a new process resumes the run from the
    checkpoint: while it starts every call is UNAVAILABLE, and the waiter asks again, by the
    same name, until the change applies there."""
    first = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(first.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:
        client.set_learning_rate(0.01)
        change = client.scale_learning_rate(0.5)
    checkpoint = first.controller.export_state()

    second = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    slot = ControllerSlot()
    with serve(slot, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=LIMIT) as client:
        stub = pb_grpc.TrainingControlServiceStub(client.channel)
        unavailable: list[errors.LrctlError] = []
        applying: list[Callable[[], Any]] = []
        methods: list[str] = []

        def invoke(call: calls.Call) -> Any:
            methods.append(call.method)
            try:
                return getattr(stub, call.method)(call.request, timeout=call.timeout)
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                if isinstance(error, Unavailable) and not unavailable:
                    unavailable.append(error)  # the trainer is starting: now it has started
                    second.controller.import_state(checkpoint)
                    slot.bind(second.controller)
                    applying.append(in_thread(second.step_boundary))
                raise error from exc

        done = calls.drive(calls.wait_change(change.name, timeout=LIMIT), invoke)
        assert len(unavailable) == 1 and "starting" in unavailable[0].message
        assert set(methods) == {"WaitChange"}  # by name: no listing, no polling
        assert [c.request.request_id for c in applying[0]()][-1] == change.request_id
        assert (done.name, done.request_id, done.status) == \
            (change.name, change.request_id, pb.CHANGE_STATUS_APPLIED)


def test_list_changes_filters_pages_and_binds_its_tokens_to_the_filter(idle: Idle) -> None:
    control, client = idle
    applied = [client.set_learning_rate(0.01 * (i + 1), request_id=f"a{i}") for i in range(3)]
    control.step_boundary()  # versions 1, 2, 3
    cancelled = client.set_learning_rate(0.5, request_id="c")
    client.cancel_change(request_id="c")
    pending = [client.scale_learning_rate(0.5, request_id=f"p{i}") for i in range(2)]

    def listed(filter: str, page_size: int = 0) -> list[str]:
        return [c.request_id for c in client.iter_changes(filter=filter, page_size=page_size)]

    assert listed("status = PENDING") == ["p1", "p0"]
    assert listed("status = CHANGE_STATUS_CANCELLED") == [cancelled.request_id]
    assert listed("status = applied AND version >= 2") == ["a2", "a1"]
    assert listed("version >= 2", page_size=1) == ["a2", "a1"]  # across pages
    assert listed("status != APPLIED", page_size=1) == ["p1", "p0", "c"]
    assert listed('request_id = "a0"') == [applied[0].request_id]
    assert listed('request_id = "nobody"') == []
    assert listed("") == ["p1", "p0", "c", "a2", "a1", "a0"]
    assert [c.name for c in client.iter_changes(filter="status = PENDING")] == \
        [pending[1].name, pending[0].name]

    with pytest.raises(InvalidArgument, match="conditions joined by AND") as info:
        client.list_changes(filter="status = DONE")
    assert violations(info.value) == ["filter"]
    page = client.list_changes(filter="status = PENDING", page_size=1)
    assert page.next_page_token
    with pytest.raises(InvalidArgument, match="same filter") as info:
        client.list_changes(filter="status = APPLIED", page_size=1, page_token=page.next_page_token)
    assert violations(info.value) == ["page_token"]
    with pytest.raises(InvalidArgument, match="same filter"):
        client.list_changes(page_size=1, page_token=page.next_page_token)
    unfiltered = client.list_changes(page_size=1)
    assert client.list_changes(page_size=1, page_token=unfiltered.next_page_token).changes[0].request_id == "p0"


def test_views_basic_leaves_out_the_change_lists_full_is_the_default(idle: Idle) -> None:
    control, client = idle
    client.set_learning_rate(0.05)
    control.step_boundary()
    client.scale_learning_rate(0.5)
    full = client.get_state()
    assert len(full.pending_changes) == 1 and len(full.recent_changes) == 1
    assert client.get_state(view="full") == full
    basic = client.get_state(view="basic")
    assert not basic.pending_changes and not basic.recent_changes
    assert (basic.version, basic.learning_rate, basic.phase, basic.pending_count) == \
        (full.version, full.learning_rate, full.phase, full.pending_count)
    with client.watch(view="basic") as updates:
        first = next(updates)
        assert first.version == 1 and not first.pending_changes and not first.recent_changes
    with client.watch() as updates:
        assert len(next(updates).pending_changes) == 1
    with pytest.raises(ValueError, match="`view`"):
        client.get_state(view="everything")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_asyncio_client_gets_waits_filters_and_views(idle: Idle) -> None:
    control, sync = idle
    change = sync.set_learning_rate(0.05)
    async with aio.TrainingControlClient(sync.target, timeout=LIMIT) as client:
        assert (await client.get_change(change.name)).request_id == change.request_id
        with pytest.raises(DeadlineExceeded):
            await client.wait_change(change.name, timeout=0)
        assert [c.name async for c in client.iter_changes(filter="status = PENDING")] == [change.name]
        assert not (await client.get_state(view="basic")).pending_changes
        control.step_boundary()
        done = await client.wait_change(request_id=change.request_id, timeout=LIMIT)
        assert done.status == pb.CHANGE_STATUS_APPLIED


# -- the command line --------------------------------------------------------------------------
def lrctl(client: TrainingControlClient, *argv: str) -> tuple[int, str]:
    out = StringIO()
    code = cli.main(["--target", client.target, "--timeout", "60", *argv], out=out)
    return code, out.getvalue()


def test_lrctl_change_wait_and_history_filter(idle: Idle) -> None:
    control, client = idle
    change = client.scale_learning_rate(0.5, reason="plateau")
    other = client.set_learning_rate(0.2)
    code, out = lrctl(client, "change", change.name)
    assert code == 0 and out.startswith(f"{change.name}: pending (apply at the next step boundary): scale x0.5")
    code, out = lrctl(client, "--json", "change", change.request_id)
    assert code == 0 and json.loads(out)["name"] == change.name
    code, out = lrctl(client, "history", "--filter", f'request_id = "{other.request_id}"')
    assert code == 0 and out == f"pending (apply at the next step boundary): set lr=0.2  [{other.request_id}]\n"
    assert lrctl(client, "history", "--filter", "status = APPLIED") == (0, "")
    assert lrctl(client, "--timeout", "0.2", "wait", change.name)[0] == cli.EXIT_DEADLINE_EXCEEDED
    assert lrctl(client, "history", "--filter", "version >")[0] == cli.EXIT_INVALID_ARGUMENT
    assert lrctl(client, "change", "changes/999")[0] == cli.EXIT_NOT_FOUND
    control.step_boundary()
    code, out = lrctl(client, "wait", change.name)
    assert code == 0 and out.startswith(f"{change.name}: applied v1 at step 0: scale x0.5")
    assert lrctl(client, "wait", "--version", "2")[1].startswith(f"{other.name}: applied v2")
    cancelled = client.set_learning_rate(0.3)
    client.cancel_change(request_id=cancelled.request_id)
    assert lrctl(client, "wait", cancelled.name)[0] == cli.EXIT_FAILED_PRECONDITION
