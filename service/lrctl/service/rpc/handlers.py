"""gRPC asyncio method handlers: wrapping one in an async context (the interceptors' budgets and
counters), a serializer that passes responses serialized already straight through, and
requests that do not parse answered INTERNAL.

gRPC's asyncio server tells a handler's style by its function: a coroutine function answers
(or writes its stream with `context.write`), an async generator function yields its stream.
A wrapper keeps its handler's style, so the health servicer's Watch (a coroutine that writes)
and lrctl's WatchState (an async generator) both stay what they are.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

#: What an interceptor runs a call's handler inside (entered before, exited after it).
Around = contextlib.AbstractAsyncContextManager[Any]
#: Makes the Around of one call from its request (the request iterator of a client-streaming
#: call) and its context.
MakeAround = Callable[[Any, aio.ServicerContext], Around]


def wrap_handler(handler: grpc.RpcMethodHandler, around: MakeAround, *,
                 request_deserializer: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour run inside `around(request, context)`, same style and
    serializers (or another `request_deserializer`)."""
    wrap = _stream if handler.response_streaming else _answer
    return rebuild(handler, lambda behavior: wrap(behavior, around),
                   request_deserializer=request_deserializer)


def rebuild(handler: grpc.RpcMethodHandler,
            behavior: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda b: b, *,
            request_deserializer: Callable[[bytes], Any] | None = None,
            response_serializer: Callable[[Any], bytes] | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler`, its behaviour passed through `behavior` and
    its (de)serializers replaced where given."""
    args = (request_deserializer or handler.request_deserializer,
            response_serializer or handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behavior(handler.unary_unary), *args)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior(handler.stream_unary), *args)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behavior(handler.unary_stream), *args)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(behavior(handler.stream_stream), *args)
    return handler


def _answer(behavior: Callable[..., Any], around: MakeAround) -> Callable[..., Any]:
    async def answer(request: Any, context: aio.ServicerContext) -> Any:
        async with around(request, context):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
    return answer


def _stream(behavior: Callable[..., Any], around: MakeAround) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def generate(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(request, context):
                async for response in behavior(request, context):
                    yield response
        return generate
    if inspect.iscoroutinefunction(behavior):
        async def write(request: Any, context: aio.ServicerContext) -> None:
            async with around(request, context):
                await behavior(request, context)
        return write
    raise TypeError(f"{behavior!r} is not an asyncio stream handler (an async generator or coroutine "
                    "function): this server runs on asyncio only")


def passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response serializer that sends `bytes` as they are (a response serialized once for
    every reader) and serializes anything else with `serialize`."""
    def serializer(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        return serialize(response) if serialize is not None else response  # type: ignore[no-any-return]
    return serializer


class _Undecodable:
    """A request that did not parse."""


_UNDECODABLE = _Undecodable()


def strict_requests(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (of a unary request) answering a request that does not parse with INTERNAL,
    "Exception deserializing request!", as gRPC's threaded server does (its asyncio server
    answers UNKNOWN, and logs the parser's traceback)."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 -- any parser error: the client sent garbage
            return _UNDECODABLE

    return wrap_handler(handler, _Refuse, request_deserializer=deserialize)


class _Refuse:
    def __init__(self, request: Any, context: aio.ServicerContext) -> None:
        self._request, self._context = request, context

    async def __aenter__(self) -> None:
        if self._request is _UNDECODABLE:
            await self._context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")

    async def __aexit__(self, *exc_info: object) -> None:
        return None
