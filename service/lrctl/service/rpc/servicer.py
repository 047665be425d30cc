"""The gRPC servicer: the RPC handlers of lrctl.v1.TrainingControlService.

It runs on gRPC's thread pool and only validates, enqueues and reads the controller's
snapshot (convert.py translates, status.py maps errors). It never touches TensorFlow: the
training thread applies every change.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from lrctl.service.control.changes import (
    Action,
    Change,
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    Snapshot,
    SwapSchedule,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.filters import parse_filter
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.observability.logs import short
from lrctl.service.rpc.budgets import MAX_WAITERS
from lrctl.service.rpc.convert import (
    ORIGIN_FROM_PB,
    change_request,
    change_to_proto,
    decode_page_token,
    encode_page_token,
    parse_change_name,
    spec_from_proto,
    state_to_proto,
)
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.service.rpc.status import DOMAIN_ERRORS, abort, status_of
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

logger = logging.getLogger("lrctl")

DEFAULT_WATCH_INTERVAL = 1.0  # seconds, when WatchStateRequest.min_interval is unset or zero
MAX_WATCH_INTERVAL = 3600  # seconds
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 100  # ListChanges (AIP-158)
#: Seconds one call may wait for its change to apply; then DEADLINE_EXCEEDED (it stays pending).
MAX_WAIT = 600.0
_WAIT_MARGIN = 0.05  # answer DEADLINE_EXCEEDED ourselves, with a message, just before the deadline


class TrainingControlServicer(pb_grpc.TrainingControlServiceServicer):
    """lrctl.v1.TrainingControlService backed by one Controller, or by a ControllerSlot that the
    trainer binds once it has built one."""

    def __init__(self, controller: Controller | ControllerSlot, *,
                 max_waiters: int = MAX_WAITERS, journal: Journal | None = None,
                 role_of: Callable[[grpc.ServicerContext], str] | None = None) -> None:
        self._slot = controller if isinstance(controller, ControllerSlot) else ControllerSlot(controller)
        self._journal = journal
        self._role_of = role_of or (lambda context: "")
        self._waiters = threading.BoundedSemaphore(max_waiters)
        # Snapshots and change records are immutable, so each is converted to protobuf once:
        # a state holds up to a hundred changes, and watchers and pollers ask for it often.
        self._lock = threading.Lock()
        self._changes: dict[tuple[int, ChangeStatus, int | None], pb.Change] = {}
        self._state: tuple[int, pb.TrainingState] | None = None

    def _state_proto(self, snap: Snapshot) -> pb.TrainingState:
        with self._lock:
            if self._state is None or self._state[0] != snap.seq:
                if len(self._changes) > 4096:
                    self._changes.clear()
                self._state = (snap.seq, state_to_proto(snap, self._change_proto))
            return self._state[1]

    def _change_proto(self, change: Change) -> pb.Change:
        key = (change.id, change.status, change.due_step)
        if key not in self._changes:
            self._changes[key] = change_to_proto(change)
        return self._changes[key]

    def SetLearningRate(self, request: pb.SetLearningRateRequest,
                        context: grpc.ServicerContext) -> pb.SetLearningRateResponse:
        def run() -> pb.Change:
            which = request.WhichOneof("change")
            if which is None:
                raise InvalidArgumentError("learning_rate", "or `scale` must be set", "neither")
            action: Action = (PinLearningRate(request.learning_rate) if which == "learning_rate"
                              else ScaleLearningRate(request.scale))
            return self._submit(change_request(request, action), request, context)

        return pb.SetLearningRateResponse(change=self._mutate("SetLearningRate", request, context, run))

    def SwapSchedule(self, request: pb.SwapScheduleRequest,
                     context: grpc.ServicerContext) -> pb.SwapScheduleResponse:
        def run() -> pb.Change:
            if not request.HasField("schedule"):
                raise InvalidArgumentError("schedule", "must be set", "nothing")
            if request.origin not in ORIGIN_FROM_PB:
                raise InvalidArgumentError("origin", "must be a known StepOrigin", request.origin)
            action = SwapSchedule(spec_from_proto(request.schedule), ORIGIN_FROM_PB[request.origin],
                                  start_step=request.schedule_start_step,
                                  scale=request.scale if request.HasField("scale") else None)
            return self._submit(change_request(request, action), request, context)

        return pb.SwapScheduleResponse(change=self._mutate("SwapSchedule", request, context, run))

    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        controller = self._slot.get()
        if controller is None:
            return pb.GetStateResponse(state=self._slot.starting_state())
        if request.view == pb.STATE_VIEW_BASIC:  # TEMP sync handler (helper AIO replaces it)
            return pb.GetStateResponse(state=state_to_proto(controller.snapshot(), view=request.view))
        return pb.GetStateResponse(state=self._state_proto(controller.snapshot()))

    def WatchState(self, request: pb.WatchStateRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.WatchStateResponse]:
        duration = request.min_interval
        interval = duration.seconds + duration.nanos / 1e9
        if not 0 <= interval <= MAX_WATCH_INTERVAL or not 0 <= duration.nanos < 1_000_000_000:
            abort(context, InvalidArgumentError(
                "min_interval", f"must be in [0s, {MAX_WATCH_INTERVAL}s]",
                f"{duration.seconds}s {duration.nanos}ns"))
        if request.every_steps < 0:
            abort(context, InvalidArgumentError("every_steps", "must be >= 0", request.every_steps))
        controller = self._slot.get()
        if controller is None:  # starting: say so at once, then follow the run once it exists
            yield pb.WatchStateResponse(state=self._slot.starting_state())
            context.add_callback(self._slot.wake)  # a caller who leaves frees this thread
            controller = self._slot.wait(context.is_active)
            if controller is None:
                return
        for snap in controller.updates(interval or DEFAULT_WATCH_INTERVAL, context.is_active,
                                             every_steps=request.every_steps,
                                             on_epoch=request.on_epoch_end,
                                             changes_only=request.changes_only):
            yield pb.WatchStateResponse(state=state_to_proto(snap, view=request.view)
                                        if request.view == pb.STATE_VIEW_BASIC else self._state_proto(snap))

    def CancelChange(self, request: pb.CancelChangeRequest,
                     context: grpc.ServicerContext) -> pb.CancelChangeResponse:
        return pb.CancelChangeResponse(change=self._mutate(
            "CancelChange", request, context, lambda: self._cancel(request)))

    def _cancel(self, request: pb.CancelChangeRequest) -> pb.Change:
        which = request.WhichOneof("change")
        if which is None:
            raise InvalidArgumentError("request_id", "or `version` must be set", "neither")
        if which == "request_id" and not request.request_id:
            raise InvalidArgumentError("request_id", "must not be empty", "''")
        change = self._slot.bound().cancel(
            request_id=request.request_id,
            version=request.version if which == "version" else None,
            expected_run_id=request.expected_run_id, reason=request.reason,
            expected_incarnation=request.expected_incarnation,
        )
        logger.info("cancelled: %s%s", short(change.description),
                    f" ({short(request.reason)})" if request.reason else "")
        return change_to_proto(change)

    def _mutate(self, method: str, request: Message, context: grpc.ServicerContext,
                run: Callable[[], pb.Change]) -> pb.Change:
        """Run a mutation, journal the attempt and its outcome, and map domain errors."""
        try:
            change = run()
        except DOMAIN_ERRORS as e:
            if self._journal is not None:
                status = status_of(e)
                self._record(method, request, context, code_pb2.Code.Name(status.code), status.message)
            abort(context, e)
        if self._journal is not None:
            self._record(method, request, context, "OK", "", change)
        return change

    def _record(self, method: str, request: Message, context: grpc.ServicerContext, code: str,
                message: str, change: pb.Change | None = None) -> None:
        assert self._journal is not None
        self._journal.record_call(method=method, peer=context.peer(), role=self._role_of(context),
                                  request=request, code=code, error=message,
                                  snapshot=self._slot.snapshot(), change=change)

    def record_local(self, request: ChangeRequest, outcome: Change | Exception) -> None:
        """Journal a local change (a float assigned to `optimizer.learning_rate` in the trainer's
        process) like a mutation RPC: method, peer and role "local", the request as the
        SetLearningRate it amounts to, and its outcome. serve() registers it on the controller."""
        assert self._journal is not None and isinstance(request.action, PinLearningRate)
        message = pb.SetLearningRateRequest(learning_rate=request.action.learning_rate, reason=request.reason)
        if isinstance(outcome, Exception):
            status = status_of(outcome)
            code, error, change = code_pb2.Code.Name(status.code), status.message, None
        else:
            code, error, change = "OK", "", change_to_proto(outcome)
        self._journal.record_call(method="local", peer="local", role="local", request=message, code=code,
                                  error=error, snapshot=self._slot.snapshot(), change=change)

    def ListChanges(self, request: pb.ListChangesRequest,
                    context: grpc.ServicerContext) -> pb.ListChangesResponse:
        try:
            controller = self._slot.bound()
            run_id = controller.snapshot().run_id
            if request.page_size < 0:
                raise InvalidArgumentError("page_size", "must be >= 0", request.page_size)
            where = parse_filter(request.filter)
            before = decode_page_token(request.page_token, run_id, request.filter) if request.page_token else None
            page, next_before = controller.list_changes(
                min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), before, where=where)
        except DOMAIN_ERRORS as e:
            abort(context, e)
        return pb.ListChangesResponse(
            changes=[change_to_proto(c) for c in page],
            next_page_token="" if next_before is None else encode_page_token(next_before, run_id, request.filter))

    # TEMP sync handlers, for the client tests until helper AIO's async ones land.
    def GetChange(self, request: pb.GetChangeRequest, context: grpc.ServicerContext) -> pb.GetChangeResponse:
        try:
            change = self._slot.bound().get_change(parse_change_name(request.name))
        except DOMAIN_ERRORS as e:
            abort(context, e)
        return pb.GetChangeResponse(change=change_to_proto(change))

    def WaitChange(self, request: pb.WaitChangeRequest, context: grpc.ServicerContext) -> pb.WaitChangeResponse:
        try:
            controller = self._slot.bound()
            change = controller.get_change(parse_change_name(request.name))
            timeout = request.timeout.ToNanoseconds() / 1e9 or 60.0
            if not 0 <= timeout <= MAX_WAIT:
                raise InvalidArgumentError("timeout", f"must be in [0, {MAX_WAIT:g} s]", f"{timeout}s")
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = max(min(timeout, remaining - _WAIT_MARGIN), 0.0)
            try:
                change = controller.wait(change, timeout)
            except WaitTimeoutError:
                change = controller.get_change(change.id)
        except DOMAIN_ERRORS as e:
            abort(context, e)
        return pb.WaitChangeResponse(change=change_to_proto(change),
                                     done=change.status is not ChangeStatus.PENDING)

    def _submit(self, change_request: ChangeRequest,
                request: pb.SetLearningRateRequest | pb.SwapScheduleRequest,
                context: grpc.ServicerContext) -> pb.Change:
        waits = request.wait_until_applied and not request.validate_only
        # Each waiting call holds a server thread: bound them before anything is queued.
        if waits and not self._waiters.acquire(blocking=False):
            raise ResourceExhaustedError(
                "too many calls are waiting for their change to apply; retry without "
                "wait_until_applied and follow the change with WatchState or ListChanges")
        try:
            change = self._slot.bound().submit(change_request, validate_only=request.validate_only,
                                               preview_steps=request.preview_steps)
            if waits and change.status is ChangeStatus.PENDING:
                change = self._wait(change, context)
        finally:
            if waits:
                self._waiters.release()
        if change.status is ChangeStatus.ABORTED:
            raise VersionConflictError(change_request.expected_version or 0, change.current_version or 0)
        if change.status is ChangeStatus.CANCELLED:
            raise FailedPreconditionError("the change was cancelled (by a client, or because the run "
                                          "ended) before it was applied; nothing changed")
        if change.status is ChangeStatus.FAILED and change.error is not None:
            raise change.error
        return change_to_proto(change)

    def _wait(self, change: Change, context: grpc.ServicerContext) -> Change:
        # Wait in slices so that a caller who hangs up frees this thread, and never longer
        # than MAX_WAIT, whatever deadline (or none) the caller set: a thread is a slot.
        give_up = time.monotonic() + MAX_WAIT
        while True:
            remaining = context.time_remaining()
            remaining = min(give_up - time.monotonic(), remaining if remaining is not None else math.inf)
            budget = min(1.0, remaining - _WAIT_MARGIN)
            try:
                return self._slot.bound().wait(change, max(budget, 0.0))
            except WaitTimeoutError:
                if not context.is_active() or remaining - budget <= _WAIT_MARGIN:
                    raise
