"""The embedded gRPC server: lrctl's service, standard health checking and reflection.

`serve()` is a context manager yielding `(server, port)`; pass port 0 to let the OS choose.
The server is gRPC's asyncio server, on an event loop of its own in one thread
("lrctl-grpc"): every call is a coroutine there, so a thousand waiting calls and hundreds of
streams cost no thread each, and the training thread wakes them through one listener
(rpc/wakeups.py). Health: the overall service "" is SERVING for as long as the server runs (a
liveness probe); "lrctl.v1.TrainingControlService" is SERVING only while training (a readiness
probe). The controller may come later (a `ControllerSlot`): until then the state is STARTING.
Beyond loopback it needs a token or mutual TLS, or `insecure=True` (lrctl.service.rpc.auth.exposed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.service.control.changes import Phase
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import rate_limit_logs
from lrctl.service.rpc.auth import DEFAULT_ADDRESS, DeniedHook, TokenAuth, exposed
from lrctl.service.rpc.budgets import MAX_OPEN_STREAMS, MAX_STREAMS, MAX_WAITERS, StreamLimiter
from lrctl.service.rpc.journal import Journal
from lrctl.service.rpc.servicer import TrainingControlServicer
from lrctl.service.rpc.slot import ControllerSlot
from lrctl.service.rpc.wakeups import Wakeups
from lrctl.v1 import training_control_pb2 as pb

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
    # Calls that arrived but that the loop has not picked up yet: past gRPC's default (1,000)
    # it cancels new ones, and a burst of a thousand waiting calls is within the budgets.
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
    ("grpc.server_max_unrequested_time_in_server", 300),  # seconds; default 30
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


def _bind(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
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


#: Seconds a stopping server lets its calls finish before it cancels them.
STOP_GRACE = 1.0


@dataclasses.dataclass
class RunningServer:
    """What `serve()` yields as its `server`: the running server and the loop it runs on."""

    #: gRPC's asyncio server: call its methods on `loop` (e.g. asyncio.run_coroutine_threadsafe).
    server: aio.Server
    loop: asyncio.AbstractEventLoop
    port: int
    health_port: int | None  # the health-only plaintext port, if any
    _stop: asyncio.Event
    _servicer: TrainingControlServicer

    @property
    def waiting_calls(self) -> int:
        """Calls waiting for a change now (`wait_until_applied` and WaitChange), of `max_waiters`."""
        return self._servicer.waiting_calls


@dataclasses.dataclass(frozen=True)
class _Config:
    slot: ControllerSlot
    address: str
    max_streams: int
    max_open_streams: int
    max_waiters: int
    journal: Journal | None
    auth: TokenAuth | None
    credentials: grpc.ServerCredentials | None
    health_address: str | None
    extra_interceptors: tuple[aio.ServerInterceptor, ...]


async def _set(servicer: health_aio.HealthServicer, service: str, status: Any, sent: dict[str, Any]) -> None:
    # Only on a change: every `set` sends one message to each Health/Watch stream.
    if sent.get(service) != status:
        await servicer.set(service, status)
        sent[service] = status


async def _follow_phase(wakeups: Wakeups, servicer: health_aio.HealthServicer, sent: dict[str, Any]) -> None:
    """Keep the training service's health in step with the run's phase, once there is a
    controller: woken by every phase change, like a watcher. The overall service "" is never
    touched: the process still serves while it starts, compiles and after the run ends, and a
    liveness probe must not kill it then."""
    while not wakeups.closed:
        snap = wakeups.snapshot
        await _set(servicer, SERVICE_NAME,
                   _SERVING if snap is not None and snap.phase is Phase.TRAINING else _NOT_SERVING, sent)
        await wakeups.next_update()


async def _serve(config: _Config, started: concurrent.futures.Future[RunningServer]) -> None:
    """The server's life on its loop: build, bind (a BindError goes to `started`), serve until
    told to stop, stop gracefully."""
    loop = asyncio.get_running_loop()
    wakeups = Wakeups(loop)
    auth = config.auth
    servicer = TrainingControlServicer(config.slot, wakeups, max_waiters=config.max_waiters,
                                       journal=config.journal, role_of=auth.role_name if auth else None)
    # Authentication runs first, so that a caller without a token never holds a stream slot.
    limiter = StreamLimiter(config.max_streams, config.max_open_streams, f"/{SERVICE_NAME}/")
    interceptors: list[aio.ServerInterceptor] = [limiter]
    if auth is not None:
        interceptors.insert(0, auth)
    server = aio.server(interceptors=[*config.extra_interceptors, *interceptors], options=_OPTIONS)
    handlers = servicer.method_handlers()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    servers = [server]
    if config.health_address is not None:
        # Its Health/Watch streams share the open budget with the main port's.
        health_server = aio.server(interceptors=[*config.extra_interceptors, limiter], options=_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        servers.append(health_server)
    try:
        port = _bind(server, config.address, config.credentials)
        health_port = None if config.health_address is None else _bind(servers[1], config.health_address, None)
    except BindError as e:
        for unbound in servers:
            await unbound.stop(None)
        started.set_exception(e)
        return
    sent: dict[str, Any] = {}
    await _set(health_servicer, "", _SERVING, sent)
    await _set(health_servicer, SERVICE_NAME, _NOT_SERVING, sent)  # known, not ready, before any call
    for each in servers:
        await each.start()
    config.slot.on_bind(wakeups.attach)  # from now on the loop hears of every publish
    follower = asyncio.create_task(_follow_phase(wakeups, health_servicer, sent))
    stop = asyncio.Event()
    started.set_result(RunningServer(server, loop, port, health_port, stop, servicer))
    try:
        await stop.wait()
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(*(each.stop(STOP_GRACE) for each in servers))
    finally:
        wakeups.close()  # before the loop closes: no publisher may schedule on a closed loop
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


def _run(config: _Config, started: concurrent.futures.Future[RunningServer]) -> None:
    """The server thread: one event loop, for the server's life."""
    try:
        asyncio.run(_serve(config, started))
    except BaseException as e:
        if not started.done():
            started.set_exception(e)
        else:
            logger.exception("the lrctl server's loop failed")


@contextlib.contextmanager
def serve(controller: Controller | ControllerSlot, address: str = DEFAULT_ADDRESS, *,
          max_streams: int = MAX_STREAMS, max_open_streams: int = MAX_OPEN_STREAMS,
          max_waiters: int = MAX_WAITERS, unary_reserve: int = 0,
          journal: Journal | None = None,
          write_tokens: Sequence[str] = (), read_tokens: Sequence[str] = (),
          credentials: grpc.ServerCredentials | None = None, insecure: bool = False,
          health_address: str | None = None,
          extra_interceptors: Sequence[aio.ServerInterceptor] = ()) -> Iterator[tuple[RunningServer, int]]:
    """Run the server on its own thread and event loop for the duration of the `with` block.

    `controller`: a Controller, or a ControllerSlot to bind one into later (lrctl-trainer
    serves while TensorFlow loads): until then, the state is STARTING, readiness NOT_SERVING,
    and calls that need the controller get UNAVAILABLE. `journal`: where every mutation
    attempt is recorded (see lrctl.service.rpc.journal). `max_streams`, `max_open_streams`,
    `max_waiters`: the budgets (lrctl.service.rpc.budgets); `unary_reserve` is ignored (no
    threads to reserve: unary calls never wait behind streams on the event loop).
    `write_tokens`/`read_tokens`: bearer tokens of each role (see lrctl.service.rpc.auth); none:
    no authentication. `credentials`: TLS (lrctl.service.rpc.auth.server_credentials); None:
    plaintext. `insecure`: allow an address beyond loopback with neither a token nor mutual
    TLS. `health_address`: also serve the health service alone, plaintext, there (for
    kubelet's native gRPC probes, which cannot speak TLS; it tells only SERVING or not).
    `extra_interceptors`: asyncio server interceptors (grpc.aio.ServerInterceptor), run first
    (outermost), so they see every call, refused ones included (e.g.
    lrctl.service.observability.metrics' RPC counter).

    Yields a `RunningServer` and the port. Raises ValueError for an address beyond loopback
    (e.g. 0.0.0.0) without a token or mutual TLS, unless `insecure`: anyone who could reach it
    could change the learning rate. Raises AddressInUseError if `address` is taken: SO_REUSEPORT
    is off, so a second trainer on the same port fails to start instead of sharing the port's
    clients at random. Leaving the block stops the server (calls get STOP_GRACE seconds to end).
    """
    del unary_reserve
    if exposed(address, tokens=bool(write_tokens or read_tokens), credentials=credentials,
               insecure=insecure):
        raise ValueError(
            f"refusing to serve on {address} without authentication: anyone who can reach it "
            "could change the learning rate (TLS alone does not say who may connect). Pass "
            "write_tokens=[token], or mutual-TLS credentials (lrctl.service.rpc.auth."
            "server_credentials(cert, key, client_ca=...)), or insecure=True to accept the risk.")
    rate_limit_logs(("grpc._server", "grpc._common", "grpc._cython.cygrpc", "grpc.aio._server"))
    slot = controller if isinstance(controller, ControllerSlot) else ControllerSlot(controller)
    auth = TokenAuth(write_tokens, read_tokens) if write_tokens or read_tokens else None
    if auth is not None and journal is not None:
        auth.on_denied = _journal_denied(journal, slot, auth.role_name)
    config = _Config(slot, address, max_streams, max_open_streams, max_waiters, journal, auth,
                     credentials, health_address, tuple(extra_interceptors))
    started: concurrent.futures.Future[RunningServer] = concurrent.futures.Future()
    thread = threading.Thread(target=_run, args=(config, started), name="lrctl-grpc", daemon=True)
    thread.start()
    try:
        running = started.result()  # a BindError is raised here, in the caller's thread
    except BaseException:
        thread.join()
        raise
    servicer = running._servicer
    if journal is not None:  # local changes (Keras's LR callbacks) are journaled too
        slot.on_bind(lambda bound: bound.local_observers.append(servicer.record_local))
    logger.info("lrctl listening on %s (port %d)", address, running.port)
    if running.health_port is not None:
        logger.info("health checks alone, plaintext, on %s (port %d)", health_address, running.health_port)
    try:
        yield running, running.port
    finally:
        bound = slot.get()
        if journal is not None and bound is not None:
            bound.local_observers.remove(servicer.record_local)
        running.loop.call_soon_threadsafe(running._stop.set)
        thread.join()


def _journal_denied(journal: Journal, slot: ControllerSlot,
                    role_of: Callable[[aio.ServicerContext], str]) -> DeniedHook:
    """Record a mutation refused for its credentials, as the servicer records the others."""
    def record(method: str, request: Any, context: aio.ServicerContext, code: grpc.StatusCode,
               message: str) -> None:
        journal.record_call(method=method, peer=context.peer(), role=role_of(context), request=request,
                            code=code.name, error=message, snapshot=slot.snapshot())
    return record
