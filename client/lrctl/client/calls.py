"""The plans the sync and the asyncio clients share: one per client method, each a generator
that yields `Call`s (one RPC each) or `Sleep`s and returns the method's result.

`drive` runs a plan over a blocking transport; `lrctl.client.aio` runs the same plans over
`grpc.aio`. Only the transport call differs. Errors from a call are thrown into the plan as
`LrctlError`s, so a plan can retry. The requests are built and checked in `messages` (and
`run_actions`); the channel's setup is `channels`'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from lrctl.client import errors
from lrctl.client.changes import ChangeOptions, Decision, Parameters, Pin, Scale, Swap, View
from lrctl.client.channels import SERVICE_NAME
from lrctl.client.messages import (
    change_request,
    check_one_of,
    duration,
    filter_naming,
    rpc_of,
    view_value,
)
from lrctl.client.run_actions import RUN_ACTIONS, run_action_request
from lrctl.v1 import training_control_pb2 as pb

#: How often `wait_until_ready` polls.
POLL_INTERVAL = 0.05

#: `wait_change`: the longest one WaitChange call waits (the server's default); a longer wait
#: is several calls. Each call's deadline is its wait plus WAIT_MARGIN: the server answers at
#: the wait's end, so the margin only covers the network.
WAIT_SLICE, WAIT_MARGIN = 60.0, 5.0
#: `wait_change` while the trainer is unavailable (restarting): the first pause before it asks
#: again, doubled up to the second.
UNAVAILABLE_BACKOFF = (0.2, 2.0)

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One unary RPC: `method` on the training service (or on Health when `health`)."""

    method: str
    request: Message
    timeout: float | None  # None: the client's default
    health: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Call | Sleep
Plan = Generator[Step, Any, T]


def drive(plan: Plan[T], invoke: Callable[[Call], Any]) -> T:
    """Run `plan` over a blocking `invoke` (which raises `LrctlError`)."""
    try:
        step = next(plan)
        while True:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                step = plan.send(None)
                continue
            try:
                result = invoke(step)
            except errors.LrctlError as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# --- plans: one per client method ---


def get_state(timeout: float | None, view: View = "full") -> Plan[pb.TrainingState]:
    response = yield Call("GetState", pb.GetStateRequest(view=view_value(view)), timeout)
    return response.state  # type: ignore[no-any-return]


def send_change(change: Pin | Scale | Swap | Parameters, options: ChangeOptions,
                timeout: float | None) -> Plan[pb.Change]:
    """One change: SetLearningRate for a pin or a scale, SwapSchedule for a swap,
    SetOptimizerParameters for parameters."""
    request = change_request(change, options)
    response = yield Call(rpc_of(request), request, timeout)
    return response.change  # type: ignore[no-any-return]


def send_run_action(rpc: str, request: Message, timeout: float | None) -> Plan[pb.Change]:
    """One run-control change (PauseTraining ... LoadCheckpoint) with its request as it is."""
    response = yield Call(rpc, request, timeout)
    return response.change  # type: ignore[no-any-return]


def run_action(method: str, deadline: float | None, options: Mapping[str, Any], /,
               **arguments: Any) -> Plan[pb.Change]:
    """The run-control client method `method` (`run_actions.RUN_ACTIONS`) with its own
    `arguments` (a pause's `timeout` among them), the change `options`, and the RPC's
    `deadline`."""
    action = RUN_ACTIONS[method]
    request = run_action_request(action, options, **arguments)
    return (yield from send_run_action(action.rpc, request, deadline))


def cancel_change(
    *, request_id: str | None, version: int | None, reason: str, timeout: float | None,
    expected_run_id: str = "", expected_incarnation: str = "",
) -> Plan[pb.Change]:
    check_one_of(request_id, version)
    request = pb.CancelChangeRequest(reason=reason, expected_run_id=expected_run_id,
                                     expected_incarnation=expected_incarnation)
    if request_id is not None:
        request.request_id = request_id
    else:
        request.version = version or 0
    response = yield Call("CancelChange", request, timeout)
    return response.change  # type: ignore[no-any-return]


def list_changes(page_size: int, page_token: str, timeout: float | None, filter: str = ""
                 ) -> Plan[pb.ListChangesResponse]:
    request = pb.ListChangesRequest(page_size=page_size, page_token=page_token, filter=filter)
    response = yield Call("ListChanges", request, timeout)
    return response  # type: ignore[no-any-return]


def list_measurements(start_step: int, page_size: int, page_token: str, timeout: float | None
                      ) -> Plan[pb.ListMeasurementsResponse]:
    request = pb.ListMeasurementsRequest(start_step=start_step, page_size=page_size, page_token=page_token)
    response = yield Call("ListMeasurements", request, timeout)
    return response  # type: ignore[no-any-return]


#: `iter_measurements(follow=True)`: the pause before asking again when nothing is new.
FOLLOW_INTERVAL = 1.0


def health(service: str, timeout: float | None) -> Plan[str]:
    request = health_pb2.HealthCheckRequest(service=service)
    response = yield Call("Check", request, timeout, health=True)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def find_change(*, request_id: str | None, version: int | None, timeout: float | None
                ) -> Plan[pb.Change]:
    """The change sent with `request_id` (or applied as `version`): ListChanges with a filter
    that names it, which the server answers from an index in one page (the pages are followed
    if not, and each change is checked here too). NotFound if the server does not have it."""
    check_one_of(request_id, version)
    what = f"request_id={request_id!r}" if request_id is not None else f"version={version}"
    if version is not None and version <= 0:  # no change produces version 0
        raise errors.NotFound(grpc.StatusCode.NOT_FOUND, f"no change with {what}")
    token, filter = "", filter_naming(request_id, version)
    while True:
        page = yield from list_changes(100, token, timeout, filter)
        for change in page.changes:
            if (change.request_id == request_id) if request_id is not None else change.version == version:
                return change
        token = page.next_page_token
        if not token:
            raise errors.NotFound(grpc.StatusCode.NOT_FOUND, f"no change with {what}")


def get_change(name: str | None = None, *, request_id: str | None = None, version: int | None = None,
               timeout: float | None) -> Plan[pb.Change]:
    """The change named `name` ("changes/{id}", GetChange), or sent with `request_id`, or
    applied as `version` (`find_change`)."""
    if name is None:
        return (yield from find_change(request_id=request_id, version=version, timeout=timeout))
    if request_id is not None or version is not None:
        raise ValueError("Give exactly one of `name`, `request_id` and `version`.")
    response = yield Call("GetChange", pb.GetChangeRequest(name=name), timeout)
    return response.change  # type: ignore[no-any-return]


def wait_change(
    name: str | None = None, *, request_id: str | None = None, version: int | None = None,
    timeout: float | None,
) -> Plan[pb.Change]:
    """WaitChange until the change is terminal, and return it; DeadlineExceeded after
    `timeout` seconds (None: wait for ever), the change still pending. A change given by
    `request_id` or `version` is looked up once (`find_change`), then waited for by name.
    While the trainer is unavailable (restarting) it asks again, backing off, until the
    timeout: a change keeps its name across a restart of the same run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if name is None:
        change = yield from find_change(request_id=request_id, version=version, timeout=None)
        if change.status != pb.CHANGE_STATUS_PENDING:
            return change
        name = change.name
    elif request_id is not None or version is not None:
        raise ValueError("Give exactly one of `name`, `request_id` and `version`.")
    pause, longest = UNAVAILABLE_BACKOFF
    while True:
        # At least a millisecond: a zero timeout is the server's default (60 s), not "now".
        wait = WAIT_SLICE if deadline is None else min(max(deadline - time.monotonic(), 1e-3), WAIT_SLICE)
        try:
            response = yield Call("WaitChange", pb.WaitChangeRequest(name=name, timeout=duration(wait)),
                                  wait + WAIT_MARGIN)
        except (errors.Unavailable, errors.DeadlineExceeded):
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise
            yield Sleep(pause)
            pause = min(2 * pause, longest)
            continue
        pause = UNAVAILABLE_BACKOFF[0]
        if response.done:
            return response.change  # type: ignore[no-any-return]
        if deadline is not None and time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"change {name} ({response.change.request_id or 'no request id'}) still pending "
                f"after {timeout}s")


def wait_until_ready(timeout: float | None, poll_interval: float) -> Plan[None]:
    """Poll health until the training service is SERVING (the run is training);
    DeadlineExceeded after `timeout` seconds (None: wait for ever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status = yield from health(SERVICE_NAME, poll_interval * 20)
        except (errors.Unavailable, errors.DeadlineExceeded) as exc:
            last = exc.code.name
        else:
            if status == "SERVING":
                return
            last = status
        if deadline is not None and time.monotonic() >= deadline:
            raise errors.DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the trainer was not ready after {timeout}s (last: {last})",
            )
        yield Sleep(poll_interval)


def update(
    decide: Callable[[pb.TrainingState], Decision], *, retries: int, options: ChangeOptions,
    timeout: float | None,
) -> Plan[pb.Change | None]:
    """Read-modify-write: read the state, `decide(state)`, send the decision fenced by
    `expected_version=state.version` and wait for its outcome. If another change got in first
    (`VersionConflict` on arrival, or ABORTED at the step boundary), read the fresh state and
    decide again, up to `retries` more times, then raise the conflict. With
    `options.expected_version`, the caller decided already on that version: any other version
    raises at once. The fences (`expected_run_id`, `expected_incarnation`) go with every send,
    so with `expected_incarnation` a decision is applied only by the process whose state it
    read: not by another one, nor by its successor if the trainer restarts before it lands."""
    if retries < 0:
        raise ValueError(f"Argument `retries` must be >= 0. Received: retries={retries}")
    attempt = 0
    while True:
        state = yield from get_state(timeout)
        expected = options.expected_version
        if expected is not None and state.version != expected:
            conflict = errors.VersionConflict(
                grpc.StatusCode.ABORTED,
                f"expected version {expected}, the state is at version {state.version}")
            conflict.metadata["current_version"] = str(state.version)
            raise conflict
        decision = decide(state)
        if decision is None:
            return None
        if not isinstance(decision, (Scale, Pin, Swap)):
            raise TypeError(f"`update`'s function must return Scale, Pin, Swap or None. "
                            f"Received: {decision!r}")
        fenced = dataclasses.replace(options, expected_version=state.version, wait=True)
        try:
            return (yield from send_change(decision, fenced, timeout))
        except errors.VersionConflict:
            attempt += 1
            if expected is not None or attempt > retries:
                raise


def relative_scale(fn: Callable[[pb.TrainingState], float]) -> Callable[[pb.TrainingState], Scale]:
    """`update_learning_rate`'s decision: the LR `fn(state)` wants now, as a scale of the
    active schedule by `fn(state) / state.learning_rate`, so the schedule keeps its kind."""
    def decide(state: pb.TrainingState) -> Scale:
        target = float(fn(state))
        if state.learning_rate == 0:
            raise ValueError(
                f"the schedule gives learning rate 0 at step {state.step}: no scale of it reaches "
                f"{target}; use `update` with Pin or Swap")
        return Scale(target / state.learning_rate)

    return decide


def update_learning_rate(
    fn: Callable[[pb.TrainingState], float], *, retries: int, options: ChangeOptions,
    timeout: float | None,
) -> Plan[pb.Change]:
    """`update` deciding `relative_scale(fn)`, which always decides."""
    change = yield from update(relative_scale(fn), retries=retries, options=options, timeout=timeout)
    assert change is not None
    return change


def learning_rate_at(step: int, timeout: float | None, expected_run_id: str = "") -> Plan[float]:
    """The learning rate the current state gives at a future `step`: the trainer evaluates it
    with the code that applies changes, for a validate_only no-op (`scale 1`) due at `step`
    (nothing is queued; a step that has passed is FAILED_PRECONDITION)."""
    request = pb.SetLearningRateRequest(scale=1.0, apply_at_step=step, validate_only=True,
                                        preview_steps=1, expected_run_id=expected_run_id)
    response = yield Call("SetLearningRate", request, timeout)
    return response.change.preview_current[0].learning_rate  # type: ignore[no-any-return]
