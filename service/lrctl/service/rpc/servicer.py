"""The gRPC servicer: translates protobuf to the domain and back, and domain errors to codes.

It runs on gRPC's thread pool and only validates, enqueues and reads the controller's
snapshot. It never touches TensorFlow: the training thread applies every change.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lrctl.service.control.controller import (
    MAX_REASON_BYTES,
    Action,
    Change,
    ChangeRequest,
    ChangeStatus,
    Controller,
    Phase,
    PinLearningRate,
    RevertSchedule,
    ScaleLearningRate,
    Snapshot,
    SwapSchedule,
)
from lrctl.service.control.errors import (
    ApplyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RequestIdReusedError,
    ResourceExhaustedError,
    RunIdMismatchError,
    UnavailableError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.observability.logs import short
from lrctl.service.rpc.budgets import MAX_WAITERS
from lrctl.service.rpc.journal import Journal
from lrctl.service.schedules import specs
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

logger = logging.getLogger("lrctl")

# The Schedule oneof's field for each spec type, e.g. ExponentialDecay -> "exponential_decay".
_FIELD_BY_TYPE: dict[type, str] = {
    specs.Constant: "constant",
    specs.ExponentialDecay: "exponential_decay",
    specs.PiecewiseConstantDecay: "piecewise_constant_decay",
    specs.PolynomialDecay: "polynomial_decay",
    specs.InverseTimeDecay: "inverse_time_decay",
    specs.CosineDecay: "cosine_decay",
    specs.CosineDecayRestarts: "cosine_decay_restarts",
    specs.PiecewiseLinear: "piecewise_linear",
}
_TYPE_BY_FIELD = {name: t for t, name in _FIELD_BY_TYPE.items()}
_ORIGIN_FROM_PB = {
    pb.STEP_ORIGIN_UNSPECIFIED: specs.Origin.RESTART,
    pb.STEP_ORIGIN_RESTART: specs.Origin.RESTART,
    pb.STEP_ORIGIN_GLOBAL: specs.Origin.GLOBAL,
}
_ORIGIN_TO_PB = {specs.Origin.RESTART: pb.STEP_ORIGIN_RESTART, specs.Origin.GLOBAL: pb.STEP_ORIGIN_GLOBAL}
_PHASE_TO_PB = {phase: pb.Phase.Value(f"PHASE_{phase.name}") for phase in Phase}
_STATUS_TO_PB = {status: pb.ChangeStatus.Value(f"CHANGE_STATUS_{status.name}") for status in ChangeStatus}
DEFAULT_WATCH_INTERVAL = 1.0  # seconds, when WatchStateRequest.min_interval is unset or zero
MAX_WATCH_INTERVAL = 3600  # seconds
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 100  # ListChanges (AIP-158)
#: Seconds one call may wait for its change to apply; then DEADLINE_EXCEEDED (it stays pending).
MAX_WAIT = 600.0
_WAIT_MARGIN = 0.05  # answer DEADLINE_EXCEEDED ourselves, with a message, just before the deadline


# -- protobuf -> domain ------------------------------------------------------------------------
def spec_from_proto(schedule: pb.Schedule, path: str = "schedule") -> specs.ScheduleSpec:
    """Build a validated spec; errors name the field by its full request path."""
    kind = schedule.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError(path, f"must set one of {sorted(_TYPE_BY_FIELD)}", "nothing")
    message = getattr(schedule, kind)
    spec_type = _TYPE_BY_FIELD[kind]
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(spec_type):
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(message, f.name)
        if f.name == "knots":
            kwargs[f.name] = tuple((k.step, k.learning_rate) for k in value)
        elif descriptor.is_repeated:
            kwargs[f.name] = tuple(value)
        elif not descriptor.has_presence or message.HasField(f.name):
            kwargs[f.name] = value  # an unset `optional` field keeps Keras's default
    try:
        return spec_type(**kwargs)
    except InvalidArgumentError as e:
        raise e.with_prefix(f"{path}.{kind}.") from None


def _change_request(request: pb.SetLearningRateRequest | pb.SwapScheduleRequest,
                    action: Action) -> ChangeRequest:
    return ChangeRequest(
        action=action,
        request_id=request.request_id,
        expected_version=request.expected_version if request.HasField("expected_version") else None,
        apply_at_step=request.apply_at_step if request.HasField("apply_at_step") else None,
        reason=request.reason,
        force=request.force,
        expected_run_id=request.expected_run_id,
        expected_incarnation=request.expected_incarnation,
        apply_after_steps=request.apply_after_steps if request.HasField("apply_after_steps") else None,
    )


# -- domain -> protobuf ------------------------------------------------------------------------
def spec_to_proto(spec: specs.ScheduleSpec) -> pb.Schedule:
    schedule = pb.Schedule()
    message = getattr(schedule, _FIELD_BY_TYPE[type(spec)])
    message.SetInParent()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "knots":
            message.knots.extend(pb.Knot(step=s, learning_rate=lr) for s, lr in value)
        elif isinstance(value, tuple):
            getattr(message, f.name).extend(value)
        elif value is not None:
            setattr(message, f.name, value)
    return schedule


def reported_rate(value: float) -> float:
    """A learning rate as the engine holds it, float32, written as the shortest decimal that
    is that float32 (0.001, not 0.0010000000474974513): what a user typed reads back alike."""
    return float(str(np.float32(value))) if math.isfinite(value) else value


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def change_to_proto(change: Change) -> pb.Change:
    request, action = change.request, change.request.action
    message = pb.Change(
        version=change.version, status=_STATUS_TO_PB[change.status], request_id=request.request_id,
        reason=request.reason, requested_step=change.requested_step,
        apply_at_step=change.due_step if change.due_step is not None else request.apply_at_step,
        apply_after_steps=request.apply_after_steps, applied_step=change.applied_step,
        learning_rate_after=None if change.learning_rate_after is None
        else reported_rate(change.learning_rate_after),
        requested_time=_timestamp(change.requested_time),
        applied_time=_timestamp(change.applied_time) if change.status is ChangeStatus.APPLIED else None,
        description=change.description, error=str(change.error) if change.error else "",
    )
    if isinstance(action, PinLearningRate):
        message.set_learning_rate = action.learning_rate
    elif isinstance(action, ScaleLearningRate):
        message.scale = action.factor
    elif isinstance(action, RevertSchedule):
        message.revert.CopyFrom(pb.RestoredSchedule(
            schedule=spec_to_proto(action.state.spec), origin=_ORIGIN_TO_PB[action.state.origin],
            schedule_origin_step=action.state.origin_step, scale=action.state.scale))
    else:
        message.swap_schedule.CopyFrom(spec_to_proto(action.schedule))
        message.origin = _ORIGIN_TO_PB[action.origin]
        message.schedule_start_step = action.start_step
        if action.scale is not None:
            message.swap_scale = action.scale
    if change.schedule_after is not None:
        message.schedule.CopyFrom(spec_to_proto(change.schedule_after.spec))
        message.scale_after = change.schedule_after.scale
    message.preview.extend(pb.LearningRatePoint(step=s, learning_rate=reported_rate(lr))
                           for s, lr in change.preview)
    message.preview_current.extend(pb.LearningRatePoint(step=s, learning_rate=reported_rate(lr))
                                   for s, lr in change.preview_current)
    return message


def guardrails_to_proto(limits: Guardrails) -> pb.Guardrails:
    def bound(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return pb.Guardrails(
        min_learning_rate=limits.min_learning_rate, max_learning_rate=bound(limits.max_learning_rate),
        max_change_factor=bound(limits.max_change_factor),
        max_changes_per_minute=bound(limits.max_changes_per_minute),
        revert_on_nan_steps=limits.revert_on_nan_steps, horizon_steps=limits.horizon_steps,
    )


def state_to_proto(snap: Snapshot,
                   convert_change: Callable[[Change], pb.Change] = change_to_proto) -> pb.TrainingState:
    return pb.TrainingState(
        run_id=snap.run_id, phase=_PHASE_TO_PB[snap.phase], step=snap.step, epoch=snap.epoch,
        learning_rate=reported_rate(snap.learning_rate), schedule=spec_to_proto(snap.schedule.spec),
        schedule_origin_step=snap.schedule.origin_step, scale=snap.schedule.scale,
        version=snap.version, metrics=dict(snap.metrics), optimizer=snap.optimizer,
        pending_changes=[convert_change(c) for c in snap.pending],
        recent_changes=[convert_change(c) for c in snap.recent],
        updated_time=_timestamp(snap.updated_time), pending_count=snap.pending_count,
        guardrails=guardrails_to_proto(snap.guardrails),
        metrics_step=snap.metrics_step, metrics_time=_timestamp(snap.metrics_time),
        epoch_metrics=dict(snap.epoch_metrics), epoch_metrics_epoch=snap.epoch_metrics_epoch,
        epoch_metrics_step=snap.epoch_metrics_step,
        epoch_metrics_time=_timestamp(snap.epoch_metrics_time),
        steps_per_second=snap.steps_per_second,
        workers=[pb.WorkerState(index=w.index, applied_version=w.applied_version, step=w.step)
                 for w in snap.workers],
        incarnation=snap.incarnation,
        boundary_spacing=snap.boundaries.spacing if snap.boundaries else 0,
        boundary_origin_step=snap.boundaries.origin if snap.boundaries else 0,
        epoch_start_step=snap.epoch_start_step,
        lr_clamp_count=snap.lr_clamp_count,
        checkpoint_failures=snap.checkpoint_failures, checkpoint_error=snap.checkpoint_error,
        checkpoint_step=snap.checkpoint_step,
    )


# -- errors -> status codes (the one place) -----------------------------------------------------
def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _abort(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    context.abort_with_status(rpc_status.to_status(status_of(error)))
    raise AssertionError("abort_with_status returns only by raising")


def status_of(error: Exception) -> status_pb2.Status:
    """The google.rpc.Status for a domain error (re-raises anything else)."""
    detail = any_pb2.Any()
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgumentError):
        code = code_pb2.INVALID_ARGUMENT
        rule = f"{error.rule}. Received: {error.received}"
        message = f"{error.field} {rule}"
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=rule)]))
    elif isinstance(error, VersionConflictError):
        code, message = code_pb2.ABORTED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(
            reason="VERSION_CONFLICT", domain="lrctl",
            metadata={"expected_version": str(error.expected), "current_version": str(error.current)}))
    elif isinstance(error, RunIdMismatchError):  # before its base, FailedPreconditionError
        code, message = code_pb2.FAILED_PRECONDITION, str(error)
        name = error.field.removeprefix("expected_")
        detail.Pack(error_details_pb2.ErrorInfo(
            reason=error.reason, domain="lrctl",
            metadata={f"current_{name}": error.current, error.field: error.expected}))
        details.append(_any(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=error.kind, subject=error.field, description=message)])))
    elif isinstance(error, UnavailableError):  # before its base, FailedPreconditionError
        code, message = code_pb2.UNAVAILABLE, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="lrctl"))
    elif isinstance(error, FailedPreconditionError):
        code, message = code_pb2.FAILED_PRECONDITION, str(error)
        detail.Pack(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=error.kind, subject=error.field, description=message)]))
    elif isinstance(error, WaitTimeoutError):
        code, message = code_pb2.DEADLINE_EXCEEDED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="NOT_YET_APPLIED", domain="lrctl"))
    elif isinstance(error, RequestIdReusedError):
        code, message = code_pb2.INVALID_ARGUMENT, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="REQUEST_ID_REUSED", domain="lrctl",
                                                metadata={"request_id": error.request_id}))
        details.append(_any(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="request_id", description=message)])))
    elif isinstance(error, NotFoundError):
        code, message = code_pb2.NOT_FOUND, str(error)
        detail.Pack(error_details_pb2.ResourceInfo(resource_type="lrctl.v1.Change", description=message))
    elif isinstance(error, ResourceExhaustedError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="lrctl"))
    elif isinstance(error, ApplyError):
        code, message = code_pb2.INTERNAL, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="APPLY_FAILED", domain="lrctl"))
    else:
        raise error
    return status_pb2.Status(code=code, message=message, details=[detail, *details])


class ControllerSlot:
    """The controller a server answers for, bound once it exists. A trainer serves health and
    its state before TensorFlow loads (seconds) and builds the model: until `bind`, the state
    is STARTING with the run id and incarnation chosen up front, and every call that needs the
    controller gets UNAVAILABLE (reason STARTING): transient, retry."""

    def __init__(self, controller: Controller | None = None, *, run_id: str = "",
                 incarnation: str = "") -> None:
        self.run_id, self.incarnation = run_id, incarnation
        self._controller = controller
        self._since = time.time()
        # Guards binding and the bind callbacks; threads waiting for the binding sleep on it.
        self._cond = threading.Condition()
        self._on_bind: list[Callable[[Controller], None]] = []

    def get(self) -> Controller | None:
        """The controller, or None before `bind`. One attribute read: bound once, never unbound."""
        return self._controller

    def snapshot(self) -> Snapshot | None:
        controller = self._controller
        return controller.snapshot() if controller is not None else None

    def bind(self, controller: Controller) -> None:
        """From now on, answer for `controller` (its run id and incarnation should be this
        slot's). The `on_bind` callbacks run first, so no call sees it without them."""
        with self._cond:
            if self._controller is not None:
                raise RuntimeError("the controller is bound already")
            for callback in self._on_bind:
                callback(controller)
            self._controller = controller
            self._cond.notify_all()

    def on_bind(self, callback: Callable[[Controller], None]) -> None:
        """Call `callback(controller)` when it is bound (at once if it is)."""
        with self._cond:
            controller = self._controller
            if controller is None:
                self._on_bind.append(callback)
                return
        callback(controller)

    def wait(self, is_active: Callable[[], bool]) -> Controller | None:
        """Block until bound (the controller) or until `is_active()` is false (None); call
        `wake` when that may have changed."""
        with self._cond:
            self._cond.wait_for(lambda: self._controller is not None or not is_active())
            return self._controller

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def bound(self) -> Controller:
        """The controller, or UnavailableError (STARTING) while the trainer is starting."""
        controller = self._controller
        if controller is None:
            raise UnavailableError("the trainer is starting (loading TensorFlow, building the "
                                   "model, restoring its checkpoint); retry", reason="STARTING")
        return controller

    def starting_state(self) -> pb.TrainingState:
        """The state before `bind`: who is starting, and since when."""
        return pb.TrainingState(run_id=self.run_id, phase=pb.PHASE_STARTING,
                                incarnation=self.incarnation, updated_time=_timestamp(self._since))


_DOMAIN_ERRORS = (InvalidArgumentError, VersionConflictError, FailedPreconditionError, WaitTimeoutError,
                  RequestIdReusedError, NotFoundError, ResourceExhaustedError, ApplyError)


class TrainingControlServicer(pb_grpc.TrainingControlServiceServicer):
    """lrctl.v1.TrainingControlService backed by one Controller (or one still to come: a
    ControllerSlot)."""

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
            return self._submit(_change_request(request, action), request, context)

        return pb.SetLearningRateResponse(change=self._mutate("SetLearningRate", request, context, run))

    def SwapSchedule(self, request: pb.SwapScheduleRequest,
                     context: grpc.ServicerContext) -> pb.SwapScheduleResponse:
        def run() -> pb.Change:
            if not request.HasField("schedule"):
                raise InvalidArgumentError("schedule", "must be set", "nothing")
            if request.origin not in _ORIGIN_FROM_PB:
                raise InvalidArgumentError("origin", "must be a known StepOrigin", request.origin)
            action = SwapSchedule(spec_from_proto(request.schedule), _ORIGIN_FROM_PB[request.origin],
                                  start_step=request.schedule_start_step,
                                  scale=request.scale if request.HasField("scale") else None)
            return self._submit(_change_request(request, action), request, context)

        return pb.SwapScheduleResponse(change=self._mutate("SwapSchedule", request, context, run))

    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext) -> pb.GetStateResponse:
        controller = self._slot.get()
        if controller is None:
            return pb.GetStateResponse(state=self._slot.starting_state())
        return pb.GetStateResponse(state=self._state_proto(controller.snapshot()))

    def WatchState(self, request: pb.WatchStateRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.WatchStateResponse]:
        duration = request.min_interval
        interval = duration.seconds + duration.nanos / 1e9
        if not 0 <= interval <= MAX_WATCH_INTERVAL or not 0 <= duration.nanos < 1_000_000_000:
            _abort(context, InvalidArgumentError(
                "min_interval", f"must be in [0s, {MAX_WATCH_INTERVAL}s]",
                f"{duration.seconds}s {duration.nanos}ns"))
        if request.every_steps < 0:
            _abort(context, InvalidArgumentError("every_steps", "must be >= 0", request.every_steps))
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
            yield pb.WatchStateResponse(state=self._state_proto(snap))

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
        if len(request.reason.encode()) > MAX_REASON_BYTES:
            raise InvalidArgumentError("reason", f"must be at most {MAX_REASON_BYTES} "
                                       "bytes", f"{len(request.reason.encode())} bytes")
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
        except _DOMAIN_ERRORS as e:
            if self._journal is not None:
                status = status_of(e)
                self._record(method, request, context, code_pb2.Code.Name(status.code), status.message)
            _abort(context, e)
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
            before = _decode_page_token(request.page_token, run_id) if request.page_token else None
            page, next_before = controller.list_changes(
                min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), before)
        except _DOMAIN_ERRORS as e:
            _abort(context, e)
        return pb.ListChangesResponse(
            changes=[change_to_proto(c) for c in page],
            next_page_token="" if next_before is None else _encode_page_token(next_before, run_id))

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


def _encode_page_token(before_id: int, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{run_id}:{before_id}".encode()).decode()


def _decode_page_token(token: str, run_id: str) -> int:
    """The change id a page token continues before; INVALID_ARGUMENT for a foreign token."""
    try:
        token_run, _, before = base64.urlsafe_b64decode(token.encode()).decode().rpartition(":")
        if token_run == run_id and before.isdigit():
            return int(before)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise InvalidArgumentError("page_token", "must be a next_page_token of this run", token[:64])
