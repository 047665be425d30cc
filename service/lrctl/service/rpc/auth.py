"""Bearer-token authentication for lrctl's service, and TLS server credentials.

Two roles: `read` may call GetState, WatchState, ListChanges, GetChange, WaitChange and
ListMeasurements; `write`
may call everything.
Tokens travel as `authorization: Bearer <token>` metadata and are compared in constant time.
Health checking and reflection stay open, so that Kubernetes probes and `buf curl` work
without a token: they reveal no training state and change nothing.

Beyond loopback, a server needs a token or mutual TLS (`exposed`): TLS alone encrypts, but
lets anyone who connects write.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc import aio

from lrctl.v1 import training_control_pb2 as pb

#: Where a server listens unless told otherwise: loopback, so it needs no token.
DEFAULT_ADDRESS = "127.0.0.1:50051"
_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["TrainingControlService"].full_name + "/"
#: Methods the read role may call; every other method of the service needs the write role.
READ_METHODS = frozenset(_SERVICE + name for name in ("GetState", "WatchState", "ListChanges",
                                                      "GetChange", "WaitChange", "ListMeasurements"))


#: Told of each refused mutation: (method name, request, context, code, message).
DeniedHook = Callable[[str, Any, aio.ServicerContext, grpc.StatusCode, str], None]


#: Credentials that make clients present a certificate signed by a CA (mutual TLS).
_MUTUAL: weakref.WeakSet[grpc.ServerCredentials] = weakref.WeakSet()


class Role(enum.IntEnum):
    READ = 1
    WRITE = 2


def read_secret(path: str | os.PathLike[str]) -> str:
    """A token from a file (surrounding whitespace dropped). Never from argv: `ps` shows argv."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {os.fspath(path)!r} is empty")
    return token


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


class TokenAuth(aio.ServerInterceptor):
    """Checks the caller's token and role before any lrctl handler runs (and before the
    interceptors after it: a caller without a token never holds a stream slot).

    Missing or unknown token: UNAUTHENTICATED. A read token calling a mutation:
    PERMISSION_DENIED. `on_denied`, if set, is told of every refused mutation (the audit
    journal records it).
    """

    def __init__(self, write_tokens: Sequence[str], read_tokens: Sequence[str] = ()) -> None:
        if not write_tokens and not read_tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._tokens = [(t.encode(), Role.WRITE) for t in write_tokens] + \
                       [(t.encode(), Role.READ) for t in read_tokens]
        self.on_denied: DeniedHook | None = None

    def role(self, metadata: Iterable[tuple[str, Any]] | None) -> Role | None:
        """The role a call's metadata proves, or None."""
        presented = _bearer(metadata)
        if presented is None:
            return None
        found = None
        for token, role in self._tokens:  # no early exit: the time says nothing about a match
            if hmac.compare_digest(presented, token):
                found = role if found is None else max(found, role)
        return found

    def role_name(self, context: aio.ServicerContext) -> str:
        role = self.role(context.invocation_metadata())
        return role.name.lower() if role is not None else ""

    # gRPC passes None for a method it does not know; its stubs do not say so.
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(_SERVICE):
            return handler  # health, reflection: open
        role = self.role(details.invocation_metadata)
        if role is None:
            return self._deny(handler, method, grpc.StatusCode.UNAUTHENTICATED,
                              "missing or invalid token: send `authorization: Bearer <token>`")
        if role < Role.WRITE and method not in READ_METHODS:
            return self._deny(handler, method, grpc.StatusCode.PERMISSION_DENIED,
                              "this token has the read role; changes need a write token")
        return handler

    def _deny(self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode,
              message: str) -> grpc.RpcMethodHandler:
        async def deny(request: Any, context: aio.ServicerContext) -> Any:
            if self.on_denied is not None and method not in READ_METHODS:
                self.on_denied(method.rsplit("/", 1)[-1], request, context, code, message)
            await context.abort(code, message)

        args = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny, *args)
        return grpc.unary_unary_rpc_method_handler(deny, *args)


def server_credentials(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                       client_ca: str | os.PathLike[str] | None = None) -> grpc.ServerCredentials:
    """TLS with this certificate and key; with `client_ca`, mutual TLS: a client must present
    a certificate signed by that CA."""
    def data(path: str | os.PathLike[str]) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_server_credentials(
        [(data(key), data(cert))], root_certificates=data(client_ca) if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    if client_ca is not None:
        _MUTUAL.add(credentials)
    return credentials


def verifies_clients(credentials: grpc.ServerCredentials | None) -> bool:
    """Whether `credentials` came from `server_credentials` with a `client_ca` (mutual TLS).
    gRPC's credentials are opaque, so any others count as not verifying clients."""
    return credentials is not None and credentials in _MUTUAL


def is_loopback(address: str) -> bool:
    """Whether a gRPC bind address (HOST:PORT or unix:PATH) is reachable from this machine only."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def exposed(address: str, *, tokens: bool, credentials: grpc.ServerCredentials | None,
            insecure: bool) -> bool:
    """Whether serving on `address` would let anyone who reaches it change the learning rate:
    beyond loopback without a token or mutual TLS, unless `insecure` accepts the risk."""
    return not (tokens or verifies_clients(credentials) or insecure or is_loopback(address))
