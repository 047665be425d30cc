"""The gRPC servicer: the RPC handlers of lrctl.v1.TrainingControlService, all async.

It runs on the server's event loop (rpc/server.py) and only validates, enqueues and reads the
controller's snapshot (convert.py translates, status.py maps errors): each controller call is
short and takes the controller's lock only inside it, and nothing here sleeps on a thread. The
mutations alone run on the loop's executor threads (`asyncio.to_thread`): a submit and its
journal line may each fsync (the write-ahead log, the journal), and a disk stall must hold up
only that call, never every reader on the loop. Waiting calls and WatchState streams are suspended coroutines, woken by the server's
`Wakeups` (rpc/wakeups.py). It never touches TensorFlow: the training thread applies every change.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2
from grpc import aio

from lrctl.service.control.changes import (
    Action,
    Change,
    ChangeRequest,
    ChangeStatus,
    LoadCheckpoint,
    PauseTraining,
    Phase,
    PinLearningRate,
    ResumeTraining,
    SaveCheckpoint,
    ScaleLearningRate,
    Snapshot,
    StopTraining,
    SwapSchedule,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.filters import parse_filter
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    VersionConflictError,
    WaitTimeoutError,
)
from lrctl.service.observability.logs import short
from lrctl.service.rpc.budgets import MAX_WAITERS, Budget
from lrctl.service.rpc.convert import (
    ORIGIN_FROM_PB,
    RunActionRequest,
    change_request,
    change_to_proto,
    decode_measurement_token,
    decode_page_token,
    encode_measurement_token,
    encode_page_token,
    measurement_to_proto,
    parameters_request,
    parse_change_name,
    pause_timeout,
    run_request,
    spec_from_proto,
    state_to_proto,
)
from lrctl.service.rpc.handlers import passing_bytes, rebuild, strict_requests
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.service.rpc.status import DOMAIN_ERRORS, abort, status_of
from lrctl.service.rpc.wakeups import Wakeups
from lrctl.service.rpc.watch import updates
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

logger = logging.getLogger("lrctl")

DEFAULT_WATCH_INTERVAL = 1.0  # seconds, when WatchStateRequest.min_interval is unset or zero
MAX_WATCH_INTERVAL = 3600  # seconds
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 100  # ListChanges (AIP-158)
MEASUREMENTS_PAGE_SIZE, MAX_MEASUREMENTS_PAGE_SIZE = 100, 1000  # ListMeasurements
#: Seconds one call may wait for its change to apply (SetLearningRate/SwapSchedule: then
#: DEADLINE_EXCEEDED; it stays pending), and the longest WaitChange timeout.
MAX_WAIT = 600.0
DEFAULT_WAIT = 60.0  # seconds, when WaitChangeRequest.timeout is unset or zero
_WAIT_MARGIN = 0.05  # answer DEADLINE_EXCEEDED ourselves, with a message, just before the deadline
#: Converted change records kept (immutable, so converted once); cleared beyond.
_CHANGE_CACHE = 4096


class TrainingControlServicer:
    """lrctl.v1.TrainingControlService backed by one Controller, or by a ControllerSlot that the
    trainer binds once it has built one. Create it on the server's loop, with its `Wakeups`."""

    def __init__(self, controller: Controller | ControllerSlot, wakeups: Wakeups, *,
                 max_waiters: int = MAX_WAITERS, journal: Journal | None = None,
                 role_of: Callable[[aio.ServicerContext], str] | None = None) -> None:
        self._slot = controller if isinstance(controller, ControllerSlot) else ControllerSlot(controller)
        self._wakeups = wakeups
        self._journal = journal
        self._role_of = role_of or (lambda context: "")
        self._waiting = Budget("max_waiters", max_waiters)
        # Snapshots and change records are immutable, so each is converted to protobuf once,
        # and each state response serialized once for every reader until the next publish: a
        # state holds up to a hundred changes, and watchers and pollers ask for it often.
        # Only the loop touches these: no lock.
        self._changes: dict[tuple[int, ChangeStatus, int | None], pb.Change] = {}
        self._responses: dict[tuple[type[Message], int], tuple[int, bytes]] = {}

    @property
    def waiting_calls(self) -> int:
        """Calls waiting for a change now (one int: any thread may read it)."""
        return self._waiting.taken

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's handlers by method name, as the generated code builds them, each
        response serializer letting bytes serialized already pass (see `_state_response`),
        and a request that does not parse answered INTERNAL."""
        captured: dict[str, grpc.RpcMethodHandler] = {}

        class Capture:
            def add_generic_rpc_handlers(self, handlers: Any) -> None:
                pass

            def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
                captured.update(handlers)

        pb_grpc.add_TrainingControlServiceServicer_to_server(self, Capture())  # type: ignore[arg-type]
        return {name: strict_requests(rebuild(
                    handler, response_serializer=passing_bytes(handler.response_serializer)))
                for name, handler in captured.items()}

    def _state_response(self, kind: type[pb.GetStateResponse | pb.WatchStateResponse],
                        snap: Snapshot, view: int) -> bytes:
        """`kind(state=...)` for `snap` in `view`, serialized once per publish for every reader."""
        cached = self._responses.get((kind, view))
        if cached is None or cached[0] != snap.seq:
            if len(self._changes) > _CHANGE_CACHE:
                self._changes.clear()
            state = state_to_proto(snap, self._change_proto, view)
            cached = (snap.seq, kind(state=state).SerializeToString())
            self._responses[(kind, view)] = cached
        return cached[1]

    def _change_proto(self, change: Change) -> pb.Change:
        key = (change.id, change.status, change.due_step)
        if key not in self._changes:
            self._changes[key] = change_to_proto(change)
        return self._changes[key]

    async def SetLearningRate(self, request: pb.SetLearningRateRequest,
                              context: aio.ServicerContext) -> pb.SetLearningRateResponse:
        async def run() -> pb.Change:
            which = request.WhichOneof("change")
            if which is None:
                raise InvalidArgumentError("learning_rate", "or `scale` must be set", "neither")
            action: Action = (PinLearningRate(request.learning_rate) if which == "learning_rate"
                              else ScaleLearningRate(request.scale))
            return await self._submit(change_request(request, action), request, context)

        return pb.SetLearningRateResponse(change=await self._mutate("SetLearningRate", request, context, run))

    async def SwapSchedule(self, request: pb.SwapScheduleRequest,
                           context: aio.ServicerContext) -> pb.SwapScheduleResponse:
        async def run() -> pb.Change:
            if not request.HasField("schedule"):
                raise InvalidArgumentError("schedule", "must be set", "nothing")
            if request.origin not in ORIGIN_FROM_PB:
                raise InvalidArgumentError("origin", "must be a known StepOrigin", request.origin)
            action = SwapSchedule(spec_from_proto(request.schedule), ORIGIN_FROM_PB[request.origin],
                                  start_step=request.schedule_start_step,
                                  scale=request.scale if request.HasField("scale") else None)
            return await self._submit(change_request(request, action), request, context)

        return pb.SwapScheduleResponse(change=await self._mutate("SwapSchedule", request, context, run))

    async def SetOptimizerParameters(self, request: pb.SetOptimizerParametersRequest,
                                     context: aio.ServicerContext) -> pb.SetOptimizerParametersResponse:
        async def run() -> pb.Change:  # an empty map is refused with the other stateless rules (policy)
            return await self._submit(parameters_request(request), request, context)

        return pb.SetOptimizerParametersResponse(
            change=await self._mutate("SetOptimizerParameters", request, context, run))

    async def GetState(self, request: pb.GetStateRequest,
                       context: aio.ServicerContext) -> pb.GetStateResponse | bytes:
        try:
            view = _view(request.view)
        except InvalidArgumentError as e:
            await abort(context, e)
        controller = self._slot.get()
        if controller is None:
            return pb.GetStateResponse(state=self._slot.starting_state())
        return self._state_response(pb.GetStateResponse, controller.snapshot(), view)

    async def WatchState(self, request: pb.WatchStateRequest,
                         context: aio.ServicerContext) -> AsyncIterator[pb.WatchStateResponse | bytes]:
        duration = request.min_interval
        interval = duration.seconds + duration.nanos / 1e9
        if not 0 <= interval <= MAX_WATCH_INTERVAL or not 0 <= duration.nanos < 1_000_000_000:
            await abort(context, InvalidArgumentError(
                "min_interval", f"must be in [0s, {MAX_WATCH_INTERVAL}s]",
                f"{duration.seconds}s {duration.nanos}ns"))
        if request.every_steps < 0:
            await abort(context, InvalidArgumentError("every_steps", "must be >= 0", request.every_steps))
        try:
            view = _view(request.view)
        except InvalidArgumentError as e:
            await abort(context, e)
        controller = self._slot.get()
        if controller is None:  # starting: say so at once, then follow the run once it exists
            yield pb.WatchStateResponse(state=self._slot.starting_state())
            while (controller := self._wakeups.controller) is None:
                if self._wakeups.closed:
                    return
                await self._wakeups.next_update()
        async for snap in updates(self._wakeups, controller.snapshot, interval or DEFAULT_WATCH_INTERVAL,
                                  every_steps=request.every_steps, on_epoch=request.on_epoch_end,
                                  changes_only=request.changes_only):
            yield self._state_response(pb.WatchStateResponse, snap, view)

    async def CancelChange(self, request: pb.CancelChangeRequest,
                           context: aio.ServicerContext) -> pb.CancelChangeResponse:
        async def run() -> pb.Change:
            return await asyncio.to_thread(self._cancel, request)

        return pb.CancelChangeResponse(change=await self._mutate("CancelChange", request, context, run))

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

    async def _mutate(self, method: str, request: Message, context: aio.ServicerContext,
                      run: Callable[[], Awaitable[pb.Change]]) -> pb.Change:
        """Run a mutation, journal the attempt and its outcome, and map domain errors."""
        try:
            change = await run()
        except DOMAIN_ERRORS as e:
            if self._journal is not None:
                status = status_of(e)
                await asyncio.to_thread(self._record, method, request, context,
                                        code_pb2.Code.Name(status.code), status.message)
            await abort(context, e)
        if self._journal is not None:
            await asyncio.to_thread(self._record, method, request, context, "OK", "", change)
        return change

    def _record(self, method: str, request: Message, context: aio.ServicerContext, code: str,
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

    async def GetChange(self, request: pb.GetChangeRequest,
                        context: aio.ServicerContext) -> pb.GetChangeResponse:
        try:
            change = self._slot.bound().get_change(parse_change_name(request.name))
        except DOMAIN_ERRORS as e:
            await abort(context, e)
        return pb.GetChangeResponse(change=self._change_proto(change))

    async def WaitChange(self, request: pb.WaitChangeRequest,
                         context: aio.ServicerContext) -> pb.WaitChangeResponse:
        """The change once it ends, or as it is at the timeout (`done` false), answered before
        the call's deadline; UNAVAILABLE while the run is STOPPED and the change pending."""
        taken = False
        try:
            change_id = parse_change_name(request.name)
            timeout = request.timeout.seconds + request.timeout.nanos / 1e9 or DEFAULT_WAIT
            if not 0 <= timeout <= MAX_WAIT or not 0 <= request.timeout.nanos < 1_000_000_000:
                raise InvalidArgumentError("timeout", f"must be in [0s, {MAX_WAIT:g}s]",
                                           f"{request.timeout.seconds}s {request.timeout.nanos}ns")
            controller = self._slot.bound()
            change = controller.get_change(change_id)
            if change.status is ChangeStatus.PENDING:
                if not self._waiting.take():
                    raise ResourceExhaustedError(
                        f"too many calls are waiting for changes ({self._waiting.cap}); retry later, "
                        "or follow the changes with WatchState")
                taken = True
                change = await self._wait(controller, change, context, timeout, give_up=False)
        except DOMAIN_ERRORS as e:
            await abort(context, e)
        finally:
            if taken:
                self._waiting.give_back()
        return pb.WaitChangeResponse(change=self._change_proto(change),
                                     done=change.status is not ChangeStatus.PENDING)

    async def ListChanges(self, request: pb.ListChangesRequest,
                          context: aio.ServicerContext) -> pb.ListChangesResponse:
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
            await abort(context, e)
        return pb.ListChangesResponse(
            changes=[change_to_proto(c) for c in page],
            next_page_token="" if next_before is None else encode_page_token(next_before, run_id, request.filter))

    # -- run control: each a versioned change like the two above (control/run_control.py) --
    async def PauseTraining(self, request: pb.PauseTrainingRequest,
                            context: aio.ServicerContext) -> pb.PauseTrainingResponse:
        async def run() -> pb.Change:
            action = PauseTraining(pause_timeout(request.timeout))
            return await self._submit(run_request(request, action), request, context)

        return pb.PauseTrainingResponse(change=await self._mutate("PauseTraining", request, context, run))

    async def ResumeTraining(self, request: pb.ResumeTrainingRequest,
                             context: aio.ServicerContext) -> pb.ResumeTrainingResponse:
        async def run() -> pb.Change:
            return await self._submit(run_request(request, ResumeTraining()), request, context)

        return pb.ResumeTrainingResponse(change=await self._mutate("ResumeTraining", request, context, run))

    async def SaveCheckpoint(self, request: pb.SaveCheckpointRequest,
                             context: aio.ServicerContext) -> pb.SaveCheckpointResponse:
        async def run() -> pb.Change:
            return await self._submit(run_request(request, SaveCheckpoint()), request, context)

        return pb.SaveCheckpointResponse(change=await self._mutate("SaveCheckpoint", request, context, run))

    async def StopTraining(self, request: pb.StopTrainingRequest,
                           context: aio.ServicerContext) -> pb.StopTrainingResponse:
        async def run() -> pb.Change:
            return await self._submit(run_request(request, StopTraining()), request, context)

        return pb.StopTrainingResponse(change=await self._mutate("StopTraining", request, context, run))

    async def LoadCheckpoint(self, request: pb.LoadCheckpointRequest,
                             context: aio.ServicerContext) -> pb.LoadCheckpointResponse:
        async def run() -> pb.Change:
            action = LoadCheckpoint(request.path, request.load_hyperparameters)
            return await self._submit(run_request(request, action), request, context)

        return pb.LoadCheckpointResponse(change=await self._mutate("LoadCheckpoint", request, context, run))

    async def ListMeasurements(self, request: pb.ListMeasurementsRequest,
                               context: aio.ServicerContext) -> pb.ListMeasurementsResponse:
        try:
            controller = self._slot.bound()
            snap = controller.snapshot()
            if request.page_size < 0:
                raise InvalidArgumentError("page_size", "must be >= 0", request.page_size)
            if request.start_step < 0:
                raise InvalidArgumentError("start_step", "must be >= 0", request.start_step)
            incarnation, after = decode_measurement_token(request.page_token, snap.run_id) \
                if request.page_token else (snap.incarnation, None)
            page = controller.list_measurements(
                after_sequence=after, same_process=incarnation == snap.incarnation,
                start_step=request.start_step,
                page_size=min(request.page_size or MEASUREMENTS_PAGE_SIZE, MAX_MEASUREMENTS_PAGE_SIZE))
        except DOMAIN_ERRORS as e:
            await abort(context, e)
        # Never empty: a reader keeps its place even when nothing is recorded yet.
        return pb.ListMeasurementsResponse(
            measurements=[measurement_to_proto(m) for m in page.items], truncated=page.truncated,
            next_page_token=encode_measurement_token(page.after_sequence, snap.run_id, snap.incarnation))

    async def _submit(self, change_request: ChangeRequest,
                      request: pb.SetLearningRateRequest | pb.SwapScheduleRequest | RunActionRequest,
                      context: aio.ServicerContext) -> pb.Change:
        waits = request.wait_until_applied and not request.validate_only
        # Bound the waiting calls before anything is queued.
        if waits and not self._waiting.take():
            raise ResourceExhaustedError(
                "too many calls are waiting for their change to apply; retry without "
                "wait_until_applied and follow the change with WatchState or WaitChange")
        try:
            controller = self._slot.bound()
            if (controller.wal is None or request.validate_only) \
                    and isinstance(change_request.action, _SUBMITTED_IN_MEMORY):
                # Nothing to write to disk: pure Python under locks held briefly, cheaper than
                # the hop to an executor thread and back (issue 20: docs/benchmarks.md).
                change = controller.submit(change_request, validate_only=request.validate_only,
                                           preview_steps=getattr(request, "preview_steps", 0))
            else:  # the write-ahead log's fsync: a disk stall must hold up this call only
                change = await asyncio.to_thread(controller.submit, change_request,
                                                 validate_only=request.validate_only,
                                                 preview_steps=getattr(request, "preview_steps", 0))
            if waits and change.status is ChangeStatus.PENDING:
                change = await self._wait(controller, change, context)
        finally:
            if waits:
                self._waiting.give_back()
        if change.status is ChangeStatus.ABORTED:
            raise VersionConflictError(change_request.expected_version or 0, change.current_version or 0)
        if change.status is ChangeStatus.CANCELLED:
            raise FailedPreconditionError("the change was cancelled (by a client, or because the run "
                                          "ended) before it was applied; nothing changed")
        if change.status is ChangeStatus.FAILED and change.error is not None:
            raise change.error
        return change_to_proto(change)

    async def _wait(self, controller: Controller, change: Change, context: aio.ServicerContext,
                    timeout: float = MAX_WAIT, *, give_up: bool = True) -> Change:
        """`change`'s final record; UnavailableError when the run stops first. At `timeout`
        seconds, or just before the call's deadline: WaitTimeoutError if `give_up`, else the
        change as it is then (pending)."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + min(timeout, math.inf if remaining is None else remaining - _WAIT_MARGIN)
        with self._wakeups.waiting(change.id) as waiter:
            # Read it again once the waiter is registered: it may have ended before (a submit
            # returns from an executor thread), and then no wakeup would ever come.
            current = controller.get_change(change.id)
            if current.status is not ChangeStatus.PENDING:
                return current
            while waiter.record is None:
                if controller.snapshot().phase is Phase.STOPPED:
                    raise UnavailableError(
                        f"the trainer stopped before change {change.description!r} was due; it "
                        "stays pending in the checkpoint and applies after the restart: wait "
                        "for it then (retry with the same request_id)")
                if self._wakeups.closed:
                    raise UnavailableError("the server is stopping; retry once it is back")
                left = deadline - loop.time()
                if left <= 0:
                    if give_up:
                        raise WaitTimeoutError(
                            f"change {change.description!r} was not applied in time; it stays pending")
                    return controller.get_change(change.id)
                await self._wakeups.sleep(waiter, left)
            return waiter.record



#: Actions whose submit reads and writes no file but the write-ahead log: without one (or for
#: validate_only) their submit runs on the loop. Any other action's may touch the disk (a
#: checkpoint path to check), so it runs on an executor thread whatever the log.
_SUBMITTED_IN_MEMORY = (PinLearningRate, ScaleLearningRate, SwapSchedule)


def _view(view: int) -> int:
    """A request's StateView, UNSPECIFIED as FULL; INVALID_ARGUMENT naming `view` for another value."""
    if view not in pb.StateView.values():
        raise InvalidArgumentError("view", f"must be one of {', '.join(pb.StateView.keys())}", view)
    return pb.STATE_VIEW_FULL if view == pb.STATE_VIEW_UNSPECIFIED else view
