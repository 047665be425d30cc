"""The server's thread budgets: how many streaming and waiting calls may run at once, and
the limiter that enforces the stream caps (RESOURCE_EXHAUSTED beyond them).

Every streaming call (WatchState, Health/Watch, reflection) and every waiting call
(`wait_until_applied`) holds a worker thread while it lasts. All are capped, and the server's
pool has UNARY_RESERVE threads beyond the caps, so unary calls and health checks always run.
Pure Python and gRPC: no TensorFlow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

MAX_STREAMS = 64  # concurrent WatchState calls; then RESOURCE_EXHAUSTED
#: Concurrent Health/Watch and reflection streams: these need no token, so they have a budget
#: of their own, and anonymous callers can never take the slots of authenticated ones.
MAX_OPEN_STREAMS = 16
MAX_WAITERS = 32  # concurrent waiting SetLearningRate/SwapSchedule calls; then RESOURCE_EXHAUSTED
UNARY_RESERVE = 16  # threads left for everything else

STREAMS_EXHAUSTED = (
    "too many open streams: the server allows {cap} at a time ({which}); close one or poll "
    "with a unary call instead"
)


class StreamLimiter(grpc.ServerInterceptor):
    """Bounds concurrent streaming RPCs; beyond a cap: RESOURCE_EXHAUSTED.

    Each such call holds a worker thread for as long as it lasts, so without a bound, open
    streams alone could take every thread and starve unary calls (GetState, health Check).
    The services that need no token (health, reflection: every method outside
    `guarded_prefix`) have a budget of their own, `max_open_streams`, so that anonymous
    callers can never take the slots of authenticated ones (`max_streams`).
    A slot is taken when the call starts running and given back when its handler returns,
    whether it ended, failed, or the client cancelled or hung up: the bound is on threads.
    """

    def __init__(self, max_streams: int, max_open_streams: int, guarded_prefix: str) -> None:
        for name, value in (("max_streams", max_streams), ("max_open_streams", max_open_streams)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1. Received: {value}")
        self.max_streams = max_streams
        self.max_open_streams = max_open_streams
        self._guarded_prefix = guarded_prefix
        self._slots = _Slots(max_streams, "WatchState")
        self._open_slots = _Slots(max_open_streams, "Health/Watch and reflection together, "
                                  "which need no token")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        slots = (self._slots if handler_call_details.method.startswith(self._guarded_prefix)
                 else self._open_slots)
        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(slots.streaming(handler.unary_stream), *args)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(slots.streaming(handler.stream_stream),
                                                         *args)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(slots.unary(handler.stream_unary), *args)
        return handler


class _Slots:
    """One budget of streaming calls."""

    def __init__(self, cap: int, which: str) -> None:
        self.cap = cap
        self._which = which
        self._free = threading.BoundedSemaphore(cap)

    def _acquire(self, context: grpc.ServicerContext) -> None:
        if not self._free.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          STREAMS_EXHAUSTED.format(cap=self.cap, which=self._which))

    def streaming(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        # Calling the wrapper with two arguments also turns a non-blocking handler (the health
        # servicer's Watch) into its blocking form, whose sends can never block its setter.
        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._acquire(context)
            try:
                # gRPC drops (and so closes) this generator when the call ends, even if it
                # stops iterating early on a cancel: the `finally` always runs.
                yield from behavior(request, context)
            finally:
                self._free.release()

        return streaming

    def unary(
        self, behavior: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def unary(requests: Any, context: grpc.ServicerContext) -> Any:
            self._acquire(context)
            try:
                return behavior(requests, context)
            finally:
                self._free.release()

        return unary
