"""Prometheus metrics of a trainer (`lrctl-trainer --metrics-listen HOST:PORT`).

    metrics = TrainingMetrics(control.controller)         # its own registry, not the global one
    with serve(control.controller, address, extra_interceptors=[metrics.interceptor]), \
            metrics.serving("127.0.0.1", 9100):
        model.fit(...)

Exported (all prefixed `lrctl_`):

- `step`, `epoch`, `learning_rate`, `learning_rate_scale`, `schedule_version`,
  `pending_changes`, `phase{phase}` (1 for the current phase): read from the controller's
  snapshot at scrape time, so a scrape costs one lock and never touches TensorFlow. Given a
  ControllerSlot not bound yet (the trainer is starting), only `phase{phase="starting"}` is 1;
- `changes_total{status}`: finished changes by status (applied, aborted, cancelled, failed,
  validated), counted exactly by the controller;
- `lr_clamped_total`: engine evaluations that clamped the learning rate into the guardrails'
  bounds (or replaced a non-finite one); as last published, like the gauges. Nonzero means
  validation missed something;
- `checkpoint_failures_total`: checkpoint writes that failed (a full or read-only disk),
  from the controller's snapshot (training goes on; `GetState.checkpoint_error` says why);
- `rpcs_total{method, code}`: every RPC the server answered (all services, refused ones
  included), by full method name and gRPC status code, from a server interceptor;
- `apply_seconds`: a histogram of the time the training thread spent in
  `Controller.apply_due` at each boundary that finished at least one change (the outcome
  computation and the one engine load), reported through the controller's `apply_observers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lrctl.service.control.changes import ChangeStatus, Phase
from lrctl.service.control.controller import Controller
from lrctl.service.rpc.handlers import wrap_handler
from lrctl.service.rpc.slot import ControllerSlot

#: Distinct `method` label values at most; further ones (a scanner's garbage) count as "other".
MAX_METHODS = 64
_FINAL = tuple(s for s in ChangeStatus if s is not ChangeStatus.PENDING)
_APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class TrainingMetrics:
    """The metrics of one controller, in a registry of their own (`registry`). Given a
    ControllerSlot, the RPC counter works from the start, the rest once it is bound."""

    def __init__(self, controller: Controller | ControllerSlot,
                 registry: CollectorRegistry | None = None) -> None:
        self.slot = controller if isinstance(controller, ControllerSlot) else ControllerSlot(controller)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rpcs = Counter("lrctl_rpcs", "RPCs answered, by method and gRPC status code",
                            ["method", "code"], registry=self.registry)
        self.apply_seconds = Histogram(
            "lrctl_apply_seconds", "Time the training thread spent applying due changes at a step "
            "boundary (Controller.apply_due)", buckets=_APPLY_BUCKETS, registry=self.registry)
        self.interceptor: aio.ServerInterceptor = _RpcCounter(self)
        self._lock = threading.Lock()
        self._methods: set[str] = set()
        self.registry.register(_StateCollector(self))
        self.slot.on_bind(lambda bound: bound.apply_observers.append(self.apply_seconds.observe))

    @property
    def controller(self) -> Controller | None:
        """The controller measured; None while the trainer is starting."""
        return self.slot.get()

    def changes(self) -> dict[ChangeStatus, int]:
        controller = self.slot.get()
        ended = controller.ended_counts() if controller is not None else {}
        return {status: ended.get(status, 0) for status in _FINAL}

    def count_rpc(self, method: str, code: grpc.StatusCode | None) -> None:
        with self._lock:
            if method not in self._methods:
                if len(self._methods) >= MAX_METHODS:
                    method = "other"
                else:
                    self._methods.add(method)
        name = getattr(code, "name", None) or ("OK" if code is None else str(code))
        self.rpcs.labels(method, name).inc()

    @contextlib.contextmanager
    def serving(self, host: str, port: int) -> Iterator[int]:
        """Serve `/metrics` over HTTP on `host:port` (0: a free port) for the duration of the
        block; yields the port. Raises OSError if it cannot listen."""
        httpd, thread = start_http_server(port, host.strip("[]") or "0.0.0.0", registry=self.registry)
        try:
            yield int(httpd.server_port)
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=2.0)


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, e.g. 0.0.0.0:9100; got {address!r}")
    return host.strip("[]"), int(port)


class _StateCollector(Collector):
    """Gauges read from the controller's snapshot at scrape time."""

    def __init__(self, metrics: TrainingMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.slot.snapshot()
        phase = GaugeMetricFamily("lrctl_phase", "1 for the run's current phase", labels=["phase"])
        for p in Phase:
            phase.add_metric([p.value], 1.0 if p is (snap.phase if snap else Phase.STARTING) else 0.0)
        yield phase
        if snap is None:  # starting: no controller yet, so no state to read
            return

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"lrctl_{name}", documentation, value=value)

        yield gauge("step", "Completed optimizer steps (as last published)", snap.step)
        yield gauge("epoch", "Current epoch", snap.epoch)
        yield gauge("learning_rate", "Learning rate at the current step", snap.learning_rate)
        yield gauge("learning_rate_scale", "Cumulative scale applied to the schedule",
                    snap.schedule.scale)
        yield gauge("schedule_version", "Version of the schedule state", snap.version)
        yield gauge("pending_changes", "Changes queued for a later step boundary", snap.pending_count)
        changes = CounterMetricFamily("lrctl_changes", "Finished changes by status", labels=["status"])
        for status, count in self._metrics.changes().items():
            changes.add_metric([status.value], count)
        yield changes
        yield CounterMetricFamily("lrctl_lr_clamped", "Learning-rate evaluations the engine clamped "
                                  "into the guardrails' bounds (nonzero: validation missed something)",
                                  value=snap.lr_clamp_count)
        yield CounterMetricFamily("lrctl_checkpoint_failures", "Checkpoint writes that failed",
                                  value=snap.checkpoint_failures)


class _RpcCounter(aio.ServerInterceptor):
    """Counts every answered RPC by method and code. The code is known only once the
    handler has returned or aborted, so the handler's behaviour is wrapped."""

    def __init__(self, metrics: TrainingMetrics) -> None:
        self._metrics = metrics

    # gRPC passes None for a method it does not know; its stubs do not say so.
    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED: a scanner's names never become labels
        method = details.method
        return wrap_handler(handler, lambda request, context: _Count(self._metrics, method, context))


class _Count:
    """Counts one call when its handler ends: with the code it set or aborted with, OK if
    none, CANCELLED when the call ended under it (cancelled, deadline), else UNKNOWN."""

    def __init__(self, metrics: TrainingMetrics, method: str, context: aio.ServicerContext) -> None:
        self._metrics, self._method, self._context = metrics, method, context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        code = _code(self._context)
        if code is None and kind is not None:
            cancelled = issubclass(kind, (asyncio.CancelledError, GeneratorExit))
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        self._metrics.count_rpc(self._method, code)


def _code(context: aio.ServicerContext) -> grpc.StatusCode | None:
    try:
        return context.code()  # set by abort or set_code, else None
    except NotImplementedError:
        return None
