"""TrainingControlClient: a thin, typed wrapper over the lrctl.v1 gRPC stub.

Every method returns the generated protobuf message and raises `lrctl.client.errors`
exceptions, never raw `grpc.RpcError`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lrctl.client import errors
from lrctl.client.schedules import ScheduleLike, to_schedule
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # typing.Self is 3.11+; typing_extensions is only needed by type checkers.
    from typing_extensions import Self

__all__ = ["DEFAULT_TARGET", "Origin", "TrainingControlClient", "tls_credentials"]

DEFAULT_TARGET = "127.0.0.1:50051"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingControlService"].full_name

# Retry only UNAVAILABLE (server not up yet, connection reset): the request never
# reached the application, so a retry cannot apply a change twice. Changes also
# carry a request_id, so even an ambiguous retry is deduplicated by the server.
# Backoff: 0.1s, 0.2s, 0.4s, 0.8s (randomized, capped by the RPC deadline).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

#: `swap_schedule(origin=...)`: "restart", "global", or a `pb.StepOrigin` value.
Origin = Literal["restart", "global"] | int

_ORIGINS = {"restart": pb.STEP_ORIGIN_RESTART, "global": pb.STEP_ORIGIN_GLOBAL}

_T = TypeVar("_T")


def _origin(origin: Origin) -> pb.StepOrigin.ValueType:
    if isinstance(origin, str):
        try:
            return _ORIGINS[origin.lower()]
        except KeyError:
            raise ValueError(
                f"Argument `origin` must be one of {sorted(_ORIGINS)} or a StepOrigin. "
                f"Received: origin={origin!r}"
            ) from None
    if origin not in pb.StepOrigin.values():
        raise ValueError(f"Argument `origin` is not a StepOrigin value. Received: origin={origin!r}")
    return pb.StepOrigin.ValueType(origin)


def _options(
    request: pb.SetLearningRateRequest | pb.SwapScheduleRequest,
    apply_at_step: int | None,
    expected_version: int | None,
    wait: bool,
    validate_only: bool,
    reason: str,
    request_id: str | None,
    force: bool = False,
    preview_steps: int = 0,
) -> None:
    """Fill the options SetLearningRateRequest and SwapScheduleRequest share."""
    request.request_id = request_id if request_id is not None else uuid.uuid4().hex
    if apply_at_step is not None:
        request.apply_at_step = apply_at_step
    if expected_version is not None:
        request.expected_version = expected_version
    request.wait_until_applied = wait
    request.validate_only = validate_only
    request.reason = reason
    request.force = force
    request.preview_steps = preview_steps


def tls_credentials(ca: str | None = None, cert: str | None = None,
                    key: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` to verify the trainer (None: the system's
    roots), `cert` and `key` to present a client certificate (mutual TLS)."""
    def data(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(data(ca), data(key), data(cert))


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call. Works on plaintext channels too
    (gRPC's call credentials require TLS), so a loopback trainer can still demand a token."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


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
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _SERVICE_CONFIG),
            *(channel_options or ()),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        calls = self._channel
        if token:
            calls = grpc.intercept_channel(self._channel, _BearerToken(token))
        self._stub = pb_grpc.TrainingControlServiceStub(calls)
        self._health = health_pb2_grpc.HealthStub(calls)
        # Tracked so that a deadline that expires while retrying against an
        # unreachable server is reported as Unavailable, not DeadlineExceeded.
        # Written by gRPC's connectivity thread; a plain attribute store is atomic.
        self._connectivity: grpc.ChannelConnectivity | None = None
        self._channel.subscribe(self._on_connectivity, try_to_connect=False)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._connectivity = state

    # --- lifecycle ---

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (e.g. for extra stubs sharing the connection)."""
        return self._channel

    def close(self) -> None:
        """Close the channel; cancels in-flight calls, including watches."""
        self._channel.unsubscribe(self._on_connectivity)
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- helpers ---

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: grpc.RpcError) -> errors.LrctlError:
        error = errors.from_rpc_error(exc)
        if (
            isinstance(error, errors.DeadlineExceeded)
            and self._connectivity == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ):
            # The deadline ran out between UNAVAILABLE retries: the server was never
            # reached, which is what the caller needs to know.
            return errors.Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot connect to {self.target}; the deadline passed while retrying",
            )
        return error

    # --- RPCs ---

    def get_state(self, *, timeout: float | None = None) -> pb.TrainingState:
        """Return a snapshot of the training state (`TrainingState`)."""
        request = pb.GetStateRequest()
        response = self._call(lambda: self._stub.GetState(request, timeout=self._timeout(timeout)))
        return response.state

    def set_learning_rate(
        self,
        value: float,
        *,
        apply_at_step: int | None = None,
        expected_version: int | None = None,
        wait: bool = False,
        validate_only: bool = False,
        reason: str = "",
        request_id: str | None = None,
        force: bool = False,
        preview_steps: int = 0,
        timeout: float | None = None,
    ) -> pb.Change:
        """Pin the learning rate to `value` (resets the scale to 1).

        Args:
            value: the new constant learning rate.
            apply_at_step: apply at the first step boundary with step >= this;
                `None`: the next boundary.
            expected_version: apply only if the state version still equals this;
                otherwise `VersionConflict` (or status ABORTED if it changes before
                the boundary).
            wait: block until applied; on timeout `DeadlineExceeded` is raised and the
                change stays pending.
            validate_only: validate only; returns status VALIDATED, changes nothing.
            reason: free text recorded in the history.
            request_id: idempotency key; `None` generates a UUID4, so retries are safe.
            force: skip the trainer's max_change_factor guardrail (never its bounds).
            preview_steps: with `validate_only`, the horizon of the returned preview
                (`Change.preview`, `Change.preview_current`) and of the guardrail checks.
            timeout: RPC deadline in seconds; `None` uses the client default.

        Returns:
            The `Change` (status PENDING, APPLIED, ABORTED, CANCELLED or VALIDATED).
        """
        request = pb.SetLearningRateRequest(learning_rate=value)
        _options(request, apply_at_step, expected_version, wait, validate_only, reason, request_id,
                 force, preview_steps)
        return self._set(request, timeout)

    def scale_learning_rate(
        self,
        factor: float,
        *,
        apply_at_step: int | None = None,
        expected_version: int | None = None,
        wait: bool = False,
        validate_only: bool = False,
        reason: str = "",
        request_id: str | None = None,
        force: bool = False,
        preview_steps: int = 0,
        timeout: float | None = None,
    ) -> pb.Change:
        """Multiply the active schedule by `factor` (cumulative with earlier scales).

        Arguments and result as for `set_learning_rate`.
        """
        request = pb.SetLearningRateRequest(scale=factor)
        _options(request, apply_at_step, expected_version, wait, validate_only, reason, request_id,
                 force, preview_steps)
        return self._set(request, timeout)

    def _set(self, request: pb.SetLearningRateRequest, timeout: float | None) -> pb.Change:
        response = self._call(
            lambda: self._stub.SetLearningRate(request, timeout=self._timeout(timeout))
        )
        return response.change

    def swap_schedule(
        self,
        schedule: ScheduleLike,
        *,
        origin: Origin = "restart",
        apply_at_step: int | None = None,
        expected_version: int | None = None,
        wait: bool = False,
        validate_only: bool = False,
        reason: str = "",
        request_id: str | None = None,
        force: bool = False,
        preview_steps: int = 0,
        timeout: float | None = None,
    ) -> pb.Change:
        """Replace the active schedule (resets the scale to 1).

        Args:
            schedule: a `Schedule`, a kind message (e.g. `pb.ExponentialDecay`), a
                `keras.optimizers.schedules.serialize()` dict, or a Keras schedule
                object; see `lrctl.client.schedules.to_schedule`.
            origin: "restart" (the schedule starts at its own step 0 where it is
                applied), "global" (evaluated at the optimizer's iteration count,
                as Keras does), or a `pb.StepOrigin` value.
            Others as for `set_learning_rate`.

        Returns:
            The `Change`.
        """
        request = pb.SwapScheduleRequest(schedule=to_schedule(schedule), origin=_origin(origin))
        _options(request, apply_at_step, expected_version, wait, validate_only, reason, request_id,
                 force, preview_steps)
        response = self._call(
            lambda: self._stub.SwapSchedule(request, timeout=self._timeout(timeout))
        )
        return response.change

    def watch(
        self, min_interval: float = 1.0, *, timeout: float | None = None
    ) -> Iterator[pb.TrainingState]:
        """Yield `TrainingState` updates until training ends or the iterator is closed.

        Updates come at most every `min_interval` seconds while training advances,
        and at once after each applied change. Closing the generator (`close()`,
        `break` in a `for` loop followed by garbage collection, or an exception in
        the consumer) cancels the RPC. `timeout` bounds the whole stream; `None`
        (the default) means no deadline, not the client default.
        """
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(min_interval * 1e9))
        request = pb.WatchStateRequest(min_interval=interval)
        try:
            call = self._stub.WatchState(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return self._iterate(call)

    def _iterate(self, call: Any) -> Iterator[pb.TrainingState]:
        try:
            for response in call:
                yield response.state
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            # Runs on normal end, on error and on generator close (GeneratorExit);
            # cancelling a finished call is a no-op.
            call.cancel()

    def cancel_change(
        self,
        *,
        request_id: str | None = None,
        version: int | None = None,
        reason: str = "",
        timeout: float | None = None,
    ) -> pb.Change:
        """Cancel a pending change, named by the `request_id` it was sent with (every change
        this client sends has one: `Change.request_id`). Returns the CANCELLED `Change`.

        Raises `NotFound` for an unknown change and `FailedPrecondition` for one that has
        already been applied, aborted or failed. Give exactly one of `request_id`, `version`.
        """
        if (request_id is None) == (version is None):
            raise ValueError("Give exactly one of `request_id` and `version`.")
        request = pb.CancelChangeRequest(reason=reason)
        if request_id is not None:
            request.request_id = request_id
        else:
            request.version = version or 0
        response = self._call(
            lambda: self._stub.CancelChange(request, timeout=self._timeout(timeout))
        )
        return response.change

    def list_changes(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> pb.ListChangesResponse:
        """One page of changes, newest first (pending and the last 10,000 finished ones).

        `page_size` 0 asks for the server's default (50); pass the response's
        `next_page_token` as `page_token` for the next page (empty: the last page).
        """
        request = pb.ListChangesRequest(page_size=page_size, page_token=page_token)
        return self._call(lambda: self._stub.ListChanges(request, timeout=self._timeout(timeout)))

    def iter_changes(self, *, page_size: int = 0, timeout: float | None = None) -> Iterator[pb.Change]:
        """Every change `list_changes` pages through, newest first."""
        token = ""
        while True:
            page = self.list_changes(page_size=page_size, page_token=token, timeout=timeout)
            yield from page.changes
            token = page.next_page_token
            if not token:
                return

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Return the standard gRPC health status name, e.g. "SERVING" or "NOT_SERVING".

        `service=""` asks about the server as a whole; the training service registers
        as "lrctl.v1.TrainingControlService". An unknown service raises `NotFound`.
        """
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(lambda: self._health.Check(request, timeout=self._timeout(timeout)))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
