"""How every mutation RPC runs, once for all: the request converted to its change
(change_requests.py), submitted, waited for when `wait_until_applied` asks, its outcome
answered as the change or as the domain error it ended with, and the attempt journaled.

A submit and its journal line may each fsync (the write-ahead log, the journal), and a disk
stall must hold up only that call, never every reader on the loop: they run on the loop's
executor threads (`asyncio.to_thread`), but for a submit with nothing to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from google.protobuf.message import Message
from google.rpc import code_pb2
from grpc import aio

from lrctl.service.control.changes import (
    Change,
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
    SwapSchedule,
)
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError, VersionConflictError
from lrctl.service.observability.logs import short
from lrctl.service.rpc import change_requests
from lrctl.service.rpc.change_requests import MutationRequest
from lrctl.service.rpc.convert import change_to_proto
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.service.rpc.status import DOMAIN_ERRORS, abort, status_of
from lrctl.service.rpc.waiting import WaitingCalls
from lrctl.v1 import training_control_pb2 as pb

logger = logging.getLogger("lrctl")

#: Actions whose submit reads and writes no file but the write-ahead log: without one (or for
#: validate_only) their submit runs on the loop. Any other action's may touch the disk (a
#: checkpoint path to check), so it runs on an executor thread whatever the log.
_SUBMITTED_IN_MEMORY = (PinLearningRate, ScaleLearningRate, SwapSchedule)


class Mutations:
    """The mutation RPCs of one servicer, on the server's loop."""

    def __init__(self, slot: ControllerSlot, waiting: WaitingCalls, journal: Journal | None,
                 role_of: Callable[[aio.ServicerContext], str]) -> None:
        self._slot = slot
        self._waiting = waiting
        self._journal = journal
        self._role_of = role_of

    async def change(self, method: str, request: MutationRequest, context: aio.ServicerContext) -> pb.Change:
        """Run the mutation RPC `method` (a key of `change_requests.BY_METHOD`) to its answer;
        a domain error aborts the call with its status."""
        async def run() -> pb.Change:
            return await self._submit(change_requests.BY_METHOD[method](request), request, context)

        return await self._journaled(method, request, context, run)

    async def cancel(self, request: pb.CancelChangeRequest, context: aio.ServicerContext) -> pb.Change:
        async def run() -> pb.Change:
            return await asyncio.to_thread(self._cancel, request)

        return await self._journaled("CancelChange", request, context, run)

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

    async def _journaled(self, method: str, request: Message, context: aio.ServicerContext,
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
        SetLearningRate it amounts to, and its outcome."""
        assert self._journal is not None and isinstance(request.action, PinLearningRate)
        message = pb.SetLearningRateRequest(learning_rate=request.action.learning_rate, reason=request.reason)
        if isinstance(outcome, Exception):
            status = status_of(outcome)
            code, error, change = code_pb2.Code.Name(status.code), status.message, None
        else:
            code, error, change = "OK", "", change_to_proto(outcome)
        self._journal.record_call(method="local", peer="local", role="local", request=message, code=code,
                                  error=error, snapshot=self._slot.snapshot(), change=change)

    async def _submit(self, change_request: ChangeRequest, request: MutationRequest,
                      context: aio.ServicerContext) -> pb.Change:
        waits = request.wait_until_applied and not request.validate_only
        preview_steps = getattr(request, "preview_steps", 0)
        # Bound the waiting calls before anything is queued.
        with self._waiting.slot(
                "too many calls are waiting for their change to apply; retry without "
                "wait_until_applied and follow the change with WatchState or WaitChange") \
                if waits else contextlib.nullcontext():
            controller = self._slot.bound()
            if (controller.wal is None or request.validate_only) \
                    and isinstance(change_request.action, _SUBMITTED_IN_MEMORY):
                # Nothing to write to disk: pure Python under locks held briefly, cheaper than
                # the hop to an executor thread and back (issue 20: docs/benchmarks.md).
                change = controller.submit(change_request, validate_only=request.validate_only,
                                           preview_steps=preview_steps)
            else:  # the write-ahead log's fsync: a disk stall must hold up this call only
                change = await asyncio.to_thread(controller.submit, change_request,
                                                 validate_only=request.validate_only,
                                                 preview_steps=preview_steps)
            if waits and change.status is ChangeStatus.PENDING:
                change = await self._waiting.wait(controller, change, context)
        if change.status is ChangeStatus.ABORTED:
            raise VersionConflictError(change_request.expected_version or 0, change.current_version or 0)
        if change.status is ChangeStatus.CANCELLED:
            raise FailedPreconditionError("the change was cancelled (by a client, or because the run "
                                          "ended) before it was applied; nothing changed")
        if change.status is ChangeStatus.FAILED and change.error is not None:
            raise change.error
        return change_to_proto(change)
