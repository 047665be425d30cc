"""Guards for the embedded server: a bound on long-lived RPCs and a rate limit on gRPC's logs.

Pure Python and gRPC, like the server: no TensorFlow.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

STREAMS_EXHAUSTED = (
    "too many open streams: the server allows {cap} at a time ({which}); close one or poll "
    "with a unary call instead"
)


def short(text: str, limit: int = 80) -> str:
    """`text` on one line and at most `limit` characters, for logging client-supplied strings
    (a `reason` could otherwise flood the log or forge extra log lines)."""
    flat = text.replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: max(limit - 1, 0)] + "…"


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


class RateLimitFilter(logging.Filter):
    """Lets through at most one record per `interval` seconds from each logging call site.

    gRPC logs a full traceback for every request it cannot deserialize: a client sending
    garbage in a loop would otherwise fill the disk. The first record passes; later ones in
    the window are counted and the next record to pass says how many were dropped.
    """

    def __init__(self, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # (logger, file, line) -> (when one last passed, how many dropped since). Call sites
        # are finitely many, so this stays small whatever the messages say.
        self._sites: dict[tuple[str, str, int], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.pathname, record.lineno)
        now = self._clock()
        with self._lock:
            passed_at, dropped = self._sites.get(key, (-math.inf, 0))
            if now - passed_at < self.interval:
                self._sites[key] = (passed_at, dropped + 1)
                return False
            self._sites[key] = (now, 0)
        if dropped:
            record.msg = (f"{record.getMessage()} [{dropped} more like this in the last "
                          f"{now - passed_at:.0f} s were not logged]")
            record.args = None
        return True


def rate_limit_logs(logger_names: tuple[str, ...], interval: float = 60.0) -> None:
    """Install one RateLimitFilter on each named logger, once per process."""
    shared: RateLimitFilter | None = None
    for name in logger_names:
        target = logging.getLogger(name)
        if any(isinstance(f, RateLimitFilter) for f in target.filters):
            continue
        shared = shared or RateLimitFilter(interval)
        target.addFilter(shared)
