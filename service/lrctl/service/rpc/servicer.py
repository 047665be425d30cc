"""The gRPC servicer: the RPC handlers of lrctl.v1.TrainingControlService, all async.

It runs on the server's event loop (rpc/server.py) and only validates, enqueues and reads the
controller's snapshot (convert.py translates, status.py maps errors): each controller call is
short and takes the controller's lock only inside it, and nothing here sleeps on a thread. Every
mutation runs one way (mutations.py: convert, submit, wait, answer, journal), and waiting calls
(waiting.py) and WatchState streams are suspended coroutines, woken by the server's `Wakeups`
(rpc/wakeups.py). It never touches TensorFlow: the training thread applies every change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from lrctl.service.control.changes import Change, ChangeRequest, ChangeStatus, Snapshot
from lrctl.service.control.controller import Controller
from lrctl.service.control.filters import parse_filter
from lrctl.service.errors import InvalidArgumentError
from lrctl.service.rpc.budgets import MAX_WAITERS
from lrctl.service.rpc.convert import (
    change_to_proto,
    decode_measurement_token,
    decode_page_token,
    encode_measurement_token,
    encode_page_token,
    measurement_to_proto,
    parse_change_name,
    state_to_proto,
)
from lrctl.service.rpc.handlers import passing_bytes, rebuild, strict_requests
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.mutations import Mutations
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.service.rpc.status import DOMAIN_ERRORS, abort
from lrctl.service.rpc.waiting import MAX_WAIT, WaitingCalls
from lrctl.service.rpc.wakeups import Wakeups
from lrctl.service.rpc.watch import updates
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

DEFAULT_WATCH_INTERVAL = 1.0  # seconds, when WatchStateRequest.min_interval is unset or zero
MAX_WATCH_INTERVAL = 3600  # seconds
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 100  # ListChanges (AIP-158)
MEASUREMENTS_PAGE_SIZE, MAX_MEASUREMENTS_PAGE_SIZE = 100, 1000  # ListMeasurements
DEFAULT_WAIT = 60.0  # seconds, when WaitChangeRequest.timeout is unset or zero
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
        self._waiting = WaitingCalls(wakeups, max_waiters)
        self._mutations = Mutations(self._slot, self._waiting, journal, role_of or (lambda context: ""))
        # Snapshots and change records are immutable, so each is converted to protobuf once,
        # and each state response serialized once for every reader until the next publish: a
        # state holds up to a hundred changes, and watchers and pollers ask for it often.
        # Only the loop touches these: no lock.
        self._changes: dict[tuple[int, ChangeStatus, int | None], pb.Change] = {}
        self._responses: dict[tuple[type[Message], int], tuple[int, bytes]] = {}

    @property
    def waiting_calls(self) -> int:
        """Calls waiting for a change now (one int: any thread may read it)."""
        return self._waiting.count

    def record_local(self, request: ChangeRequest, outcome: Change | Exception) -> None:
        """Journal a local change (a float assigned to `optimizer.learning_rate` in the trainer's
        process) like a mutation RPC (`Mutations.record_local`). serve() registers it on the
        controller."""
        self._mutations.record_local(request, outcome)

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


    # -- mutations: each a versioned change, run one way (mutations.py, change_requests.py) --
    async def SetLearningRate(self, request: pb.SetLearningRateRequest,
                              context: aio.ServicerContext) -> pb.SetLearningRateResponse:
        return pb.SetLearningRateResponse(change=await self._mutations.change("SetLearningRate", request, context))

    async def SwapSchedule(self, request: pb.SwapScheduleRequest,
                           context: aio.ServicerContext) -> pb.SwapScheduleResponse:
        return pb.SwapScheduleResponse(change=await self._mutations.change("SwapSchedule", request, context))

    async def SetOptimizerParameters(self, request: pb.SetOptimizerParametersRequest,
                                     context: aio.ServicerContext) -> pb.SetOptimizerParametersResponse:
        return pb.SetOptimizerParametersResponse(
            change=await self._mutations.change("SetOptimizerParameters", request, context))

    async def PauseTraining(self, request: pb.PauseTrainingRequest,
                            context: aio.ServicerContext) -> pb.PauseTrainingResponse:
        return pb.PauseTrainingResponse(change=await self._mutations.change("PauseTraining", request, context))

    async def ResumeTraining(self, request: pb.ResumeTrainingRequest,
                             context: aio.ServicerContext) -> pb.ResumeTrainingResponse:
        return pb.ResumeTrainingResponse(change=await self._mutations.change("ResumeTraining", request, context))

    async def SaveCheckpoint(self, request: pb.SaveCheckpointRequest,
                             context: aio.ServicerContext) -> pb.SaveCheckpointResponse:
        return pb.SaveCheckpointResponse(change=await self._mutations.change("SaveCheckpoint", request, context))

    async def StopTraining(self, request: pb.StopTrainingRequest,
                           context: aio.ServicerContext) -> pb.StopTrainingResponse:
        return pb.StopTrainingResponse(change=await self._mutations.change("StopTraining", request, context))

    async def LoadCheckpoint(self, request: pb.LoadCheckpointRequest,
                             context: aio.ServicerContext) -> pb.LoadCheckpointResponse:
        return pb.LoadCheckpointResponse(change=await self._mutations.change("LoadCheckpoint", request, context))

    async def CancelChange(self, request: pb.CancelChangeRequest,
                           context: aio.ServicerContext) -> pb.CancelChangeResponse:
        return pb.CancelChangeResponse(change=await self._mutations.cancel(request, context))

    # -- reads -------------------------------------------------------------------------------
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
        try:
            change_id = parse_change_name(request.name)
            timeout = request.timeout.seconds + request.timeout.nanos / 1e9 or DEFAULT_WAIT
            if not 0 <= timeout <= MAX_WAIT or not 0 <= request.timeout.nanos < 1_000_000_000:
                raise InvalidArgumentError("timeout", f"must be in [0s, {MAX_WAIT:g}s]",
                                           f"{request.timeout.seconds}s {request.timeout.nanos}ns")
            controller = self._slot.bound()
            change = controller.get_change(change_id)
            if change.status is ChangeStatus.PENDING:
                with self._waiting.slot(f"too many calls are waiting for changes ({self._waiting.cap}); "
                                        "retry later, or follow the changes with WatchState"):
                    change = await self._waiting.wait(controller, change, context, timeout, give_up=False)
        except DOMAIN_ERRORS as e:
            await abort(context, e)
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


def _view(view: int) -> int:
    """A request's StateView, UNSPECIFIED as FULL; INVALID_ARGUMENT naming `view` for another value."""
    if view not in pb.StateView.values():
        raise InvalidArgumentError("view", f"must be one of {', '.join(pb.StateView.keys())}", view)
    return pb.STATE_VIEW_FULL if view == pb.STATE_VIEW_UNSPECIFIED else view

