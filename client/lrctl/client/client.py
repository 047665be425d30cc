"""TrainingControlClient: a thin, typed wrapper over the lrctl.v1 gRPC stub.

Every method returns the generated protobuf message and raises `lrctl.client.errors`
exceptions, never raw `grpc.RpcError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from lrctl.client import calls, channels, errors
from lrctl.client.calls import T
from lrctl.client.changes import (
    ChangeOptions,
    Decision,
    Origin,
    Parameters,
    Pin,
    Scale,
    Swap,
    View,
    pick,
)
from lrctl.client.channels import DEFAULT_TARGET, SERVICE_NAME, tls_credentials
from lrctl.client.messages import watch_request
from lrctl.client.method_docs import documented
from lrctl.client.schedules import ScheduleLike
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # typing.Self is 3.11+; typing_extensions is only needed by type checkers.
    from typing_extensions import Self

__all__ = [
    "DEFAULT_TARGET",
    "SERVICE_NAME",
    "ChangeOptions",
    "Origin",
    "Parameters",
    "Pin",
    "Scale",
    "Swap",
    "TrainingControlClient",
    "View",
    "Watch",
    "tls_credentials",
]


class Watch:
    """A `WatchState` stream: iterate it for `TrainingState`s; `cancel()` (from any thread)
    ends the iteration cleanly. Use it as a context manager to cancel on exit::

        with client.watch(0.5) as updates:
            for state in updates:
                ...
    """

    def __init__(self, call: Any, error: Callable[[grpc.RpcError], errors.LrctlError]) -> None:
        self._call = call
        self._error = error
        self._cancelled = threading.Event()

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> pb.TrainingState:
        if self._cancelled.is_set():
            raise StopIteration
        try:
            response = next(self._call)
        except StopIteration:
            raise
        except grpc.RpcError as exc:
            if self._cancelled.is_set():
                raise StopIteration from None
            raise self._error(exc) from exc
        return response.state  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """End the stream (on the server too); a blocked iteration stops. Thread-safe;
        cancelling a finished stream is a no-op."""
        self._cancelled.set()
        self._call.cancel()

    close = cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


# The methods' docs are `method_docs.DOCS`, shared with the asyncio client.
@documented
class TrainingControlClient:
    """Client for `lrctl.v1.TrainingControlService`.

    Use as a context manager (or call `close()`)::

        with TrainingControlClient("127.0.0.1:50051") as client:
            print(client.get_state().learning_rate)
            client.scale_learning_rate(0.5, wait=True, reason="loss plateau")

    Args:
        target: the server address, `host:port`.
        timeout: default RPC deadline in seconds for unary calls; `None` for none.
            Methods take `timeout=` to override it per call.
        credentials: channel credentials for TLS (see `tls_credentials`); `None` uses an
            insecure channel.
        channel_options: extra gRPC channel options, `(key, value)` pairs; they are
            appended after (and so override) the built-in retry configuration.
        token: a bearer token sent with every call (`authorization` metadata), for a
            trainer started with tokens; `None` sends none.
    """

    def __init__(
        self, target: str = DEFAULT_TARGET, *, timeout: float | None = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None, token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = channels.channel_options(channel_options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = channels.call_metadata(token)
        self._stub = pb_grpc.TrainingControlServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- lifecycle ---

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (e.g. for extra stubs sharing the connection)."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- the transport (everything else is in `calls`) ---

    def _error(self, exc: grpc.RpcError) -> errors.LrctlError:
        return channels.map_error(exc, self.target, channels.failing_to_connect(self._channel))

    def _invoke(self, call: calls.Call) -> Any:
        stub: Any = self._health if call.health else self._stub
        timeout = self.timeout if call.timeout is None else call.timeout
        try:
            return getattr(stub, call.method)(call.request, timeout=timeout,
                                              metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def _run(self, plan: calls.Plan[T]) -> T:
        return calls.drive(plan, self._invoke)

    # --- RPCs: each runs the plan of the same name in `calls` (or `run_action`) ---

    def get_state(self, *, timeout: float | None = None, view: View = "full") -> pb.TrainingState:
        return self._run(calls.get_state(timeout, view))

    # The change methods' keyword arguments other than `timeout` are `ChangeOptions`' fields
    # (and `Swap`'s); `pick(..., locals())` hands them on, so they are named once here.

    def set_learning_rate(
        self, value: float, *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, force: bool = False,
        preview_steps: int = 0, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", apply_after_steps: int | None = None,
    ) -> pb.Change:
        return self._run(calls.send_change(Pin(value), pick(ChangeOptions, locals()), timeout))

    def scale_learning_rate(
        self, factor: float, *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, force: bool = False,
        preview_steps: int = 0, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", apply_after_steps: int | None = None,
    ) -> pb.Change:
        return self._run(calls.send_change(Scale(factor), pick(ChangeOptions, locals()), timeout))

    def set_optimizer_parameters(
        self, parameters: Mapping[str, float], *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None,
    ) -> pb.Change:
        return self._run(calls.send_change(Parameters(dict(parameters)),
                                           pick(ChangeOptions, locals()), timeout))

    def swap_schedule(
        self, schedule: ScheduleLike, *, origin: Origin = "restart",
        apply_at_step: int | None = None, expected_version: int | None = None,
        wait: bool = False, validate_only: bool = False, reason: str = "",
        request_id: str | None = None, force: bool = False, preview_steps: int = 0,
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None, schedule_start_step: int = 0,
        scale: float | None = None,
    ) -> pb.Change:
        return self._run(calls.send_change(
            pick(Swap, locals()), pick(ChangeOptions, locals()), timeout))

    # --- run control (`run_actions`): each a change like the ones above ---

    def pause_training(self, timeout: float | None = None, *, rpc_timeout: float | None = None,
                       **options: Any) -> pb.Change:
        return self._run(calls.run_action("pause_training", rpc_timeout, options, timeout=timeout))

    def resume_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return self._run(calls.run_action("resume_training", timeout, options))

    def save_checkpoint(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return self._run(calls.run_action("save_checkpoint", timeout, options))

    def stop_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return self._run(calls.run_action("stop_training", timeout, options))

    def load_checkpoint(self, path: str, load_hyperparameters: bool = False, *,
                        timeout: float | None = None, **options: Any) -> pb.Change:
        return self._run(calls.run_action("load_checkpoint", timeout, options, path=path,
                                          load_hyperparameters=load_hyperparameters))

    def watch(self, min_interval: float = 1.0, *, timeout: float | None = None,
              every_steps: int = 0, on_epoch_end: bool = False, changes_only: bool = False,
              view: View = "full") -> Watch:
        request = watch_request(min_interval, every_steps, on_epoch_end, changes_only, view)
        call = self._stub.WatchState(request, timeout=timeout, metadata=self._metadata)
        return Watch(call, self._error)

    def cancel_change(
        self, *, request_id: str | None = None, version: int | None = None, reason: str = "",
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
    ) -> pb.Change:
        return self._run(calls.cancel_change(
            request_id=request_id, version=version, reason=reason, timeout=timeout,
            expected_run_id=expected_run_id, expected_incarnation=expected_incarnation))

    def list_changes(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None,
        filter: str = "",
    ) -> pb.ListChangesResponse:
        return self._run(calls.list_changes(page_size, page_token, timeout, filter))

    def iter_changes(self, *, page_size: int = 0, timeout: float | None = None,
                     filter: str = "") -> Iterator[pb.Change]:
        token = ""
        while True:
            page = self.list_changes(page_size=page_size, page_token=token, timeout=timeout,
                                     filter=filter)
            yield from page.changes
            token = page.next_page_token
            if not token:
                return

    def list_measurements(
        self, *, start_step: int = 0, page_size: int = 0, page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListMeasurementsResponse:
        return self._run(calls.list_measurements(start_step, page_size, page_token, timeout))

    def iter_measurements(
        self, *, start_step: int = 0, page_size: int = 0, page_token: str = "",
        follow: bool = False, poll_interval: float = calls.FOLLOW_INTERVAL,
        timeout: float | None = None,
    ) -> Iterator[pb.Measurement]:
        token = page_token
        while True:
            page = self.list_measurements(start_step=start_step, page_size=page_size,
                                          page_token=token, timeout=timeout)
            yield from page.measurements
            token = page.next_page_token or token
            if not page.measurements:
                if not follow:
                    return
                time.sleep(poll_interval)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return self._run(calls.health(service, timeout))

    # --- conveniences built on the RPCs above ---

    def wait_until_ready(self, timeout: float | None = 60.0, *,
                         poll_interval: float = calls.POLL_INTERVAL) -> None:
        self._run(calls.wait_until_ready(timeout, poll_interval))

    def update(
        self, decide: Callable[[pb.TrainingState], Decision], *, retries: int = 3,
        reason: str = "", force: bool = False, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        expected_version: int | None = None,
    ) -> pb.Change | None:
        return self._run(calls.update(
            decide, retries=retries, options=pick(ChangeOptions, locals()), timeout=timeout))

    def update_learning_rate(
        self, fn: Callable[[pb.TrainingState], float], *, retries: int = 3, reason: str = "",
        force: bool = False, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", expected_version: int | None = None,
    ) -> pb.Change:
        return self._run(calls.update_learning_rate(
            fn, retries=retries, options=pick(ChangeOptions, locals()), timeout=timeout))

    def learning_rate_at(self, step: int, *, timeout: float | None = None,
                         expected_run_id: str = "") -> float:
        return self._run(calls.learning_rate_at(step, timeout, expected_run_id))

    def get_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = None,
    ) -> pb.Change:
        return self._run(calls.get_change(name, request_id=request_id, version=version, timeout=timeout))

    def wait_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = 60.0, poll_interval: float | None = None,
    ) -> pb.Change:
        return self._run(calls.wait_change(name, request_id=request_id, version=version, timeout=timeout))
