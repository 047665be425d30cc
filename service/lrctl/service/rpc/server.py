"""The embedded gRPC server: lrctl's service, standard health checking and reflection.

`serve()` is a context manager yielding `(server, port)`; pass port 0 to let the OS choose.
Health: the overall service "" is SERVING for as long as the server runs (a liveness probe);
"lrctl.v1.TrainingControlService" is SERVING only while training (a readiness probe). The
controller may come later (a `ControllerSlot`): until then the state is STARTING.
Beyond loopback it needs a token or mutual TLS, or `insecure=True` (lrctl.service.rpc.auth.exposed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.service.control.changes import Phase
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import rate_limit_logs
from lrctl.service.rpc.auth import DEFAULT_ADDRESS, DeniedHook, TokenAuth, exposed
from lrctl.service.rpc.budgets import (
    MAX_OPEN_STREAMS,
    MAX_STREAMS,
    MAX_WAITERS,
    UNARY_RESERVE,
    StreamLimiter,
)
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.servicer import TrainingControlServicer
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingControlService"].full_name
logger = logging.getLogger("lrctl.server")

#: SO_REUSEPORT off: one trainer per port. Keepalive pings find peers that vanished without
#: closing (a killed controller, a cut network), so their streams end and free their slots.
_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(RuntimeError):
    """The server could not listen on its address."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


class AddressInUseError(BindError):
    """Something (most likely another trainer) already listens on the address."""


def _in_use(address: str) -> bool:
    """Whether binding `address` fails with EADDRINUSE: gRPC reports every bind failure
    alike, and only this one deserves the "another trainer" hint."""
    if address.startswith(("unix:", "unix-abstract:")):
        return False
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:  # grpcio >= 1.6x raises; older ones return 0
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port:
        return port
    if _in_use(address):
        raise AddressInUseError(address, f"{address} is already in use: is another trainer running?")
    raise BindError(address, f"cannot listen on {address}: check the host and port")


def _set(servicer: health.HealthServicer, service: str, status: Any, sent: dict[str, Any]) -> None:
    # Only on a change: every `set` sends one message to each Health/Watch stream.
    if sent.get(service) != status:
        servicer.set(service, status)
        sent[service] = status


def _follow_phase(slot: ControllerSlot, servicer: health.HealthServicer, stop: threading.Event,
                  sent: dict[str, Any], poll: float = 0.5) -> None:
    """Keep the training service's health in step with the run's phase (a watcher like any
    other client's), once there is a controller. The overall service "" is never touched: the
    process still serves while it starts, compiles and after the run ends, and a liveness probe
    must not kill it then."""
    controller = slot.wait(lambda: not stop.is_set())  # serve() wakes it when it stops
    while controller is not None and not stop.is_set():
        # Phase changes come at once; an hour's interval keeps the other updates rare.
        for snap in controller.updates(min_interval=3600.0, is_active=lambda: not stop.is_set()):
            _set(servicer, SERVICE_NAME, _SERVING if snap.phase is Phase.TRAINING else _NOT_SERVING,
                 sent)
        # The stream ends with each run; another `fit` on the same controller starts a new one.
        stop.wait(poll)


@contextlib.contextmanager
def serve(controller: Controller | ControllerSlot, address: str = DEFAULT_ADDRESS, *,
          max_streams: int = MAX_STREAMS, max_open_streams: int = MAX_OPEN_STREAMS,
          max_waiters: int = MAX_WAITERS, unary_reserve: int = UNARY_RESERVE,
          journal: Journal | None = None,
          write_tokens: Sequence[str] = (), read_tokens: Sequence[str] = (),
          credentials: grpc.ServerCredentials | None = None, insecure: bool = False,
          health_address: str | None = None,
          extra_interceptors: Sequence[grpc.ServerInterceptor] = ()) -> Iterator[tuple[grpc.Server, int]]:
    """Run the server on a background thread pool for the duration of the `with` block.

    `controller`: a Controller, or a ControllerSlot to bind one into later (lrctl-trainer
    serves while TensorFlow loads): until then, the state is STARTING, readiness NOT_SERVING,
    and calls that need the controller get UNAVAILABLE. `journal`: where every mutation
    attempt is recorded (see lrctl.service.rpc.journal).
    `write_tokens`/`read_tokens`: bearer tokens of each role (see lrctl.service.rpc.auth); none:
    no authentication. `credentials`: TLS (lrctl.service.rpc.auth.server_credentials); None:
    plaintext. `insecure`: allow an address beyond loopback with neither a token nor mutual
    TLS. `health_address`: also serve the health service alone, plaintext, there (for
    kubelet's native gRPC probes, which cannot speak TLS; it tells only SERVING or not).
    `extra_interceptors`: server interceptors, run first (outermost), so they see
    every call, refused ones included (e.g. lrctl.service.observability.metrics' RPC counter).

    Raises ValueError for an address beyond loopback (e.g. 0.0.0.0) without a token or mutual
    TLS, unless `insecure`: anyone who reaches it could change the learning rate. Raises
    AddressInUseError if `address` is taken: SO_REUSEPORT is off, so a second trainer on the
    same port fails to start instead of sharing the port's clients at random.
    """
    if exposed(address, tokens=bool(write_tokens or read_tokens), credentials=credentials,
               insecure=insecure):
        raise ValueError(
            f"refusing to serve on {address} without authentication: anyone who can reach it "
            "could change the learning rate (TLS alone does not say who may connect). Pass "
            "write_tokens=[token], or mutual-TLS credentials (lrctl.service.rpc.auth."
            "server_credentials(cert, key, client_ca=...)), or insecure=True to accept the risk.")
    rate_limit_logs(("grpc._server", "grpc._common"))
    slot = controller if isinstance(controller, ControllerSlot) else ControllerSlot(controller)
    # Every capped call holds a thread; unary_reserve more keep unary calls and health checks
    # running whatever the streams and waiters do (lrctl.service.rpc.budgets).
    pool = futures.ThreadPoolExecutor(max_streams + max_open_streams + max_waiters + unary_reserve,
                                      thread_name_prefix="lrctl-grpc")
    auth = TokenAuth(write_tokens, read_tokens) if write_tokens or read_tokens else None
    if auth is not None and journal is not None:
        auth.on_denied = _journal_denied(journal, slot, auth.role_name)
    # Authentication runs first, so that a caller without a token never holds a stream slot.
    limiter = StreamLimiter(max_streams, max_open_streams, f"/{SERVICE_NAME}/")
    interceptors: list[grpc.ServerInterceptor] = [limiter]
    if auth is not None:
        interceptors.insert(0, auth)
    server = grpc.server(pool, interceptors=[*extra_interceptors, *interceptors], options=_OPTIONS)
    servicer = TrainingControlServicer(slot, max_waiters=max_waiters, journal=journal,
                                       role_of=auth.role_name if auth else None)
    pb_grpc.add_TrainingControlServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    servers = [(server, pool)]
    if health_address is not None:
        # Its own few threads; its Watch streams share the open budget with the main port's.
        health_pool = futures.ThreadPoolExecutor(max_open_streams + unary_reserve,
                                                 thread_name_prefix="lrctl-health-grpc")
        health_server = grpc.server(health_pool, interceptors=[*extra_interceptors, limiter],
                                    options=_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        servers.append((health_server, health_pool))
    try:
        port = _bind(server, address, credentials)
        if health_address is not None:
            health_port = _bind(servers[1][0], health_address, None)
    except BindError:
        for unbound, unused in servers:
            unbound.stop(None)
            unused.shutdown(wait=False)
        raise
    if journal is not None:  # local changes (Keras's LR callbacks) are journaled too
        slot.on_bind(lambda bound: bound.local_observers.append(servicer.record_local))
    sent: dict[str, Any] = {}
    _set(health_servicer, "", _SERVING, sent)
    _set(health_servicer, SERVICE_NAME, _NOT_SERVING, sent)  # known, not ready, before any call
    for each, _ in servers:
        each.start()
    stop = threading.Event()
    follower = threading.Thread(target=_follow_phase,
                                args=(slot, health_servicer, stop, sent),
                                name="lrctl-health", daemon=True)
    follower.start()
    logger.info("lrctl listening on %s (port %d)", address, port)
    if health_address is not None:
        logger.info("health checks alone, plaintext, on %s (port %d)", health_address, health_port)
    try:
        yield server, port
    finally:
        bound = slot.get()
        if journal is not None and bound is not None:
            bound.local_observers.remove(servicer.record_local)
        stop.set()
        slot.wake()  # the health follower may still wait for a controller
        health_servicer.enter_graceful_shutdown()
        for each, _ in servers:
            each.stop(grace=1.0).wait()
        follower.join(timeout=2.0)


def _journal_denied(journal: Journal, slot: ControllerSlot,
                    role_of: Callable[[grpc.ServicerContext], str]) -> DeniedHook:
    """Record a mutation refused for its credentials, as the servicer records the others."""
    def record(method: str, request: Any, context: grpc.ServicerContext, code: grpc.StatusCode,
               message: str) -> None:
        journal.record_call(method=method, peer=context.peer(), role=role_of(context), request=request,
                            code=code.name, error=message, snapshot=slot.snapshot())
    return record
