"""The server's budgets: how many streaming and waiting calls may be open at once, and the
interceptor that enforces the stream caps (RESOURCE_EXHAUSTED beyond them).

The server runs on one asyncio event loop: an open stream or a waiting call is a suspended
coroutine, not a thread, so the caps bound memory and the work of waking them, and unary
calls and health checks always run beside them. Each budget is a plain count, taken and given
back on the loop. Pure Python and gRPC: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from lrctl.service.rpc.handlers import Around, wrap_handler

MAX_STREAMS = 200  # concurrent WatchState calls; then RESOURCE_EXHAUSTED
#: Concurrent Health/Watch and reflection streams: these need no token, so they have a budget
#: of their own, and anonymous callers can never take the slots of authenticated ones.
MAX_OPEN_STREAMS = 16
#: Concurrent waiting calls (SetLearningRate/SwapSchedule with wait_until_applied, and
#: WaitChange, together); then RESOURCE_EXHAUSTED.
MAX_WAITERS = 1000

STREAMS_EXHAUSTED = (
    "too many open streams: the server allows {cap} at a time ({which}); close one or poll "
    "with a unary call instead"
)


class Budget:
    """At most `cap` at a time. Used on the event loop only, so a count needs no lock."""

    def __init__(self, name: str, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"{name} must be >= 1. Received: {cap}")
        self.cap = cap
        self.taken = 0

    def take(self) -> bool:
        """Take one unit if one is free; whether it was."""
        if self.taken >= self.cap:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1


class StreamLimiter(aio.ServerInterceptor):
    """Bounds concurrent streaming RPCs; beyond a cap: RESOURCE_EXHAUSTED.

    The services that need no token (health, reflection: every method outside
    `guarded_prefix`) have a budget of their own, `max_open_streams`, so that anonymous
    callers can never take the slots of authenticated ones (`max_streams`).
    A slot is taken when the call starts running and given back when its handler returns,
    whether it ended, failed, or the client cancelled or hung up.
    """

    def __init__(self, max_streams: int, max_open_streams: int, guarded_prefix: str) -> None:
        self._slots = _Slots(Budget("max_streams", max_streams), "WatchState")
        self._open_slots = _Slots(Budget("max_open_streams", max_open_streams),
                                  "Health/Watch and reflection together, which need no token")
        self.max_streams, self.max_open_streams = max_streams, max_open_streams
        self._guarded_prefix = guarded_prefix

    # gRPC passes None for a method it does not know; its stubs do not say so.
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        slots = (self._slots if handler_call_details.method.startswith(self._guarded_prefix)
                 else self._open_slots)
        return wrap_handler(handler, slots.around)


class _Slots:
    """One budget of streaming calls."""

    def __init__(self, budget: Budget, which: str) -> None:
        self._budget = budget
        self._which = which

    def around(self, request: Any, context: aio.ServicerContext) -> Around:
        return _Slot(self._budget, self._which, context)


class _Slot:
    """Holds one slot of a budget for as long as a call's handler runs."""

    def __init__(self, budget: Budget, which: str, context: aio.ServicerContext) -> None:
        self._budget, self._which, self._context = budget, which, context

    async def __aenter__(self) -> None:
        if not self._budget.take():
            await self._context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      STREAMS_EXHAUSTED.format(cap=self._budget.cap, which=self._which))

    async def __aexit__(self, *exc_info: object) -> None:
        self._budget.give_back()
