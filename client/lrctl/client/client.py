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

from lrctl.client import calls, errors
from lrctl.client.calls import DEFAULT_TARGET, SERVICE_NAME, T
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


def _transient_failure(channel: grpc.Channel) -> bool:
    """Whether the channel is failing to connect, so that a deadline that expires while
    retrying against an unreachable server is reported as Unavailable. The sync channel
    has no public getter; `subscribe()` would cost every `close()` up to 0.2 s (gRPC's
    connectivity thread polls at that period), which `lrctl state` cannot afford."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if not callable(check):
        return False
    try:
        return bool(check(False) == grpc.ChannelConnectivity.TRANSIENT_FAILURE.value[0])
    except Exception:  # noqa: BLE001 -- a best-effort refinement of the error only
        return False


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
        options = calls.channel_options(channel_options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._metadata = calls.call_metadata(token)
        self._stub = pb_grpc.TrainingControlServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- lifecycle ---

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (e.g. for extra stubs sharing the connection)."""
        return self._channel

    def close(self) -> None:
        """Close the channel; cancels in-flight calls, including watches."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- the transport (everything else is in `calls`) ---

    def _error(self, exc: grpc.RpcError) -> errors.LrctlError:
        return calls.map_error(exc, self.target, _transient_failure(self._channel))

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

    # --- RPCs ---

    def get_state(self, *, timeout: float | None = None, view: View = "full") -> pb.TrainingState:
        """Return a snapshot of the training state (`TrainingState`). `view="basic"` leaves
        out the pending and recent change lists (`list_changes` has them)."""
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
        """Pin the learning rate to `value` (resets the scale to 1). The keyword arguments
        are `ChangeOptions`; `timeout` is the RPC deadline in seconds (None: the client's).

        Returns the `Change` (status PENDING, APPLIED, ABORTED, CANCELLED or VALIDATED)."""
        return self._run(calls.send_change(Pin(value), pick(ChangeOptions, locals()), timeout))

    def scale_learning_rate(
        self, factor: float, *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, force: bool = False,
        preview_steps: int = 0, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", apply_after_steps: int | None = None,
    ) -> pb.Change:
        """Multiply the active schedule by `factor` (cumulative with earlier scales).
        Arguments and result as for `set_learning_rate`."""
        return self._run(calls.send_change(Scale(factor), pick(ChangeOptions, locals()), timeout))

    def set_optimizer_parameters(
        self, parameters: Mapping[str, float], *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None,
    ) -> pb.Change:
        """Set optimizer hyperparameters (`momentum`, `beta_1`, `beta_2`, `epsilon`,
        `weight_decay`, `clipnorm`, `global_clipnorm`, `clipvalue`) or registered variables,
        by name, as one change at a step boundary (SetOptimizerParameters); the options as for
        `set_learning_rate` (`force` and `preview_steps` do not apply).
        `TrainingState.hyperparameters` lists what the trainer can set."""
        return self._run(calls.send_change(Parameters(dict(parameters)), pick(ChangeOptions, locals()),
                                       timeout))

    def swap_schedule(
        self, schedule: ScheduleLike, *, origin: Origin = "restart",
        apply_at_step: int | None = None, expected_version: int | None = None,
        wait: bool = False, validate_only: bool = False, reason: str = "",
        request_id: str | None = None, force: bool = False, preview_steps: int = 0,
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None, schedule_start_step: int = 0,
        scale: float | None = None,
    ) -> pb.Change:
        """Replace the active schedule (resets the scale to 1): `schedule`, `origin`,
        `schedule_start_step` and `scale` are `Swap`'s; the rest as for `set_learning_rate`."""
        return self._run(calls.send_change(
            pick(Swap, locals()), pick(ChangeOptions, locals()), timeout))

    # --- run control: each a change like the ones above (options: `ChangeOptions` but
    # `force` and `preview_steps`) ---

    def pause_training(self, timeout: float | None = None, *, rpc_timeout: float | None = None,
                       **options: Any) -> pb.Change:
        """Pause training at a step boundary: it waits there until `resume_training`,
        `stop_training`, a shutdown, or `timeout` seconds (the pause's own; None: the server's
        default, 1 hour; at most 7 days). Pausing a paused run restarts its timeout. Changes
        still apply while paused. `rpc_timeout` is the RPC deadline (None: the client's)."""
        request = calls.pause_request(timeout, ChangeOptions(**options))
        return self._run(calls.send_run_action("PauseTraining", request, rpc_timeout))

    def resume_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        """Resume a paused run (applied, with no effect, if it is not paused)."""
        return self._run(calls.send_run_action(
            "ResumeTraining", calls.run_action_request("ResumeTraining", ChangeOptions(**options)), timeout))

    def save_checkpoint(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        """Write a checkpoint at a step boundary; the applied change names it
        (`checkpoint_path`, `checkpoint_step`). `FailedPrecondition` without --checkpoint-dir."""
        return self._run(calls.send_run_action(
            "SaveCheckpoint", calls.run_action_request("SaveCheckpoint", ChangeOptions(**options)), timeout))

    def stop_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        """End the run for good at a step boundary (or `apply_at_step`): a final checkpoint,
        pending changes cancelled with `reason`, phase FINISHED, the trainer exits 0."""
        return self._run(calls.send_run_action(
            "StopTraining", calls.run_action_request("StopTraining", ChangeOptions(**options)), timeout))

    def load_checkpoint(self, path: str, load_hyperparameters: bool = False, *,
                        timeout: float | None = None, **options: Any) -> pb.Change:
        """Load weights and optimizer state from the checkpoint at `path` (a folder written
        with --checkpoint-dir, or one of its weights files, under the trainer's
        --checkpoint-root) at a step boundary, keeping this run's step; with
        `load_hyperparameters`, its schedule too. The applied change names the file, its step
        and the run that wrote it."""
        request = calls.run_action_request("LoadCheckpoint", ChangeOptions(**options), path=path,
                                           load_hyperparameters=load_hyperparameters)
        return self._run(calls.send_run_action("LoadCheckpoint", request, timeout))

    def watch(self, min_interval: float = 1.0, *, timeout: float | None = None,
              every_steps: int = 0, on_epoch_end: bool = False, changes_only: bool = False,
              view: View = "full") -> Watch:
        """Stream `TrainingState` updates until training ends or the watch is cancelled.

        Updates come at most every `min_interval` seconds while training advances, and at
        once after each applied change. Returns a `Watch`: iterate it, and end it with
        `cancel()` from any thread or by leaving `with client.watch(...) as updates:`; either
        cancels the RPC. `timeout` bounds the whole stream (`None`, the default: no deadline,
        not the client's). Triggers: `every_steps` (an update each time training is that many
        steps on), `on_epoch_end` (one per new epoch), `changes_only` (no time-based updates;
        changes, phase changes and the triggers still send). `view="basic"`: updates without
        the change lists."""
        request = calls.watch_request(min_interval, every_steps, on_epoch_end, changes_only, view)
        call = self._stub.WatchState(request, timeout=timeout, metadata=self._metadata)
        return Watch(call, self._error)

    def cancel_change(
        self, *, request_id: str | None = None, version: int | None = None, reason: str = "",
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
    ) -> pb.Change:
        """Cancel a pending change, named by the `request_id` it was sent with (every change
        this client sends has one: `Change.request_id`) or by its `version`: give exactly one.
        Returns the CANCELLED `Change`; `reason` and the fences are as in `ChangeOptions`.

        Raises `NotFound` for an unknown change and `FailedPrecondition` for one that has
        already been applied, aborted or failed."""
        return self._run(calls.cancel_change(
            request_id=request_id, version=version, reason=reason, timeout=timeout,
            expected_run_id=expected_run_id, expected_incarnation=expected_incarnation))

    def list_changes(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None,
        filter: str = "",
    ) -> pb.ListChangesResponse:
        """One page of changes, newest first (pending and the last 10,000 finished ones).
        `page_size` 0 asks for the server's default (50); pass the response's
        `next_page_token` as `page_token` for the next page (empty: the last page), with the
        same `filter`: conditions joined by AND, e.g. `status = APPLIED AND version >= 12`
        (`status`, `version`, `request_id`; see ListChangesRequest.filter). With a selective
        filter a page may be short, even empty, and still have a next page."""
        return self._run(calls.list_changes(page_size, page_token, timeout, filter))

    def iter_changes(self, *, page_size: int = 0, timeout: float | None = None,
                     filter: str = "") -> Iterator[pb.Change]:
        """Every change `list_changes` pages through, newest first (those matching `filter`)."""
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
        """One page of the run's measurements (batch and epoch logs, the last 10,000), oldest
        first, at or after `start_step`. `page_size` 0: the server's default (100; 1,000 at
        most). Pass the response's `next_page_token` as `page_token` to read what came after,
        also after a reconnection: a page with no measurements means nothing newer yet, and
        `truncated` says that some were dropped before you read them."""
        return self._run(calls.list_measurements(start_step, page_size, page_token, timeout))

    def iter_measurements(
        self, *, start_step: int = 0, page_size: int = 0, page_token: str = "",
        follow: bool = False, poll_interval: float = calls.FOLLOW_INTERVAL,
        timeout: float | None = None,
    ) -> Iterator[pb.Measurement]:
        """Every measurement `list_measurements` pages through, oldest first; with `follow`,
        keeps asking (every `poll_interval` seconds once caught up) for new ones."""
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
        """Return the standard gRPC health status name, e.g. "SERVING" or "NOT_SERVING".
        `service=""` asks about the server as a whole; the training service registers as
        "lrctl.v1.TrainingControlService". An unknown service raises `NotFound`."""
        return self._run(calls.health(service, timeout))

    # --- conveniences built on the RPCs above ---

    def wait_until_ready(self, timeout: float | None = 60.0, *,
                         poll_interval: float = calls.POLL_INTERVAL) -> None:
        """Block until the trainer is reachable and training (its training service reports
        SERVING). Raises `DeadlineExceeded` after `timeout` seconds (`None`: no limit)."""
        self._run(calls.wait_until_ready(timeout, poll_interval))

    def update(
        self, decide: Callable[[pb.TrainingState], Decision], *, retries: int = 3,
        reason: str = "", force: bool = False, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        expected_version: int | None = None,
    ) -> pb.Change | None:
        """Read-modify-write: read the state, call `decide(state)`, and send what it returns,
        `Scale(factor)`, `Pin(learning_rate)` or `Swap(schedule, ...)` (None: no change, returns
        None), with `expected_version=state.version`, waiting until it is applied. If another
        change gets in first (`VersionConflict` on arrival, or aborted at the step boundary),
        read the fresh state and call `decide` again, up to `retries` more times; then the
        conflict is raised. It never returns a pending change that may still abort.

            client.update(lambda s: Scale(0.5) if s.metrics["loss"] > 1 else None)

        `reason`, `force` and the fences are as in `ChangeOptions` (they go with every send);
        `expected_version` says you decided on that version already: a state at another
        version raises `VersionConflict` at once, with no new decision. `timeout` is each
        RPC's deadline, the wait for the outcome included (`DeadlineExceeded`: it stays pending).
        """
        return self._run(calls.update(
            decide, retries=retries, options=pick(ChangeOptions, locals()), timeout=timeout))

    def update_learning_rate(
        self, fn: Callable[[pb.TrainingState], float], *, retries: int = 3, reason: str = "",
        force: bool = False, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", expected_version: int | None = None,
    ) -> pb.Change:
        """`update` for the learning rate `fn(state)` wants now, sent as a scale of the active
        schedule by `fn(state) / state.learning_rate`: the schedule keeps its kind and keeps
        running (a CosineDecay stays a CosineDecay, scaled). On a conflict `fn` is called again
        on the fresh state. `ValueError` if the schedule gives 0 now (use `update` with `Pin`).
        Other arguments as for `update`.

            client.update_learning_rate(lambda s: s.learning_rate * 0.5, reason="plateau")
        """
        change = self._run(calls.update(
            calls.relative_scale(fn), retries=retries, options=pick(ChangeOptions, locals()),
            timeout=timeout))
        assert change is not None  # relative_scale always decides
        return change

    def learning_rate_at(self, step: int, *, timeout: float | None = None,
                         expected_run_id: str = "") -> float:
        """The learning rate the current schedule and scale give at a future `step`, as the
        trainer computes it (a validate_only no-op change: needs the write role; nothing is
        queued). `FailedPrecondition` if `step` has passed."""
        return self._run(calls.learning_rate_at(step, timeout, expected_run_id))

    def get_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = None,
    ) -> pb.Change:
        """The change named `name` (`Change.name`, "changes/{id}", on every change the server
        accepted), or the one sent with `request_id`, or applied as `version`: give exactly one.
        Raises `NotFound` if the server no longer has it (it keeps every pending change and the
        last 10,000 finished ones), `InvalidArgument` for a malformed name."""
        return self._run(calls.get_change(name, request_id=request_id, version=version, timeout=timeout))

    def wait_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = 60.0, poll_interval: float | None = None,
    ) -> pb.Change:
        """Wait until the change (named as for `get_change`) is terminal (applied, failed,
        aborted or cancelled) and return it. The server answers the moment it is (WaitChange):
        nothing polls, and `poll_interval` is accepted and ignored. While the trainer restarts
        it asks again until `timeout`. Raises `DeadlineExceeded` after `timeout` seconds
        (`None`: no limit); the change stays pending."""
        return self._run(calls.wait_change(name, request_id=request_id, version=version, timeout=timeout))
