"""`lrctl.client.aio.TrainingControlClient`: the client on `grpc.aio`, for asyncio programs.

The same methods, arguments, errors, retry policy and automatic `request_id` as the sync
`lrctl.client.TrainingControlClient`; both run the same plans from `calls`, and only
the transport differs. Use it as an async context manager::

    async with TrainingControlClient("127.0.0.1:50051") as client:
        state = await client.get_state()
        await client.scale_learning_rate(0.5, wait=True)
        async with client.watch(0.5) as updates:
            async for state in updates:
                ...

Cancelling the task that iterates a watch cancels the RPC, so the server's stream ends too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
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
from lrctl.client.channels import DEFAULT_TARGET
from lrctl.client.messages import watch_request
from lrctl.client.method_docs import documented
from lrctl.client.schedules import ScheduleLike
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncWatch", "TrainingControlClient"]


class AsyncWatch:
    """A `WatchState` stream for `async for`. `cancel()` (or leaving `async with`, or
    cancelling the iterating task) ends it and cancels the RPC."""

    def __init__(self, call: Any, error: Callable[[grpc.RpcError], errors.LrctlError]) -> None:
        self._call = call
        self._error = error
        self._cancelled = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> pb.TrainingState:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            self.cancel()  # the iterating task was cancelled: end the stream on the server
            raise
        except grpc.RpcError as exc:
            if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                raise StopAsyncIteration from None
            raise self._error(exc) from exc
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise StopAsyncIteration
        return response.state  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """End the stream; a pending `__anext__` stops. Cancelling twice is a no-op."""
        self._cancelled = True
        self._call.cancel()

    close = cancel

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


# The methods' docs are `method_docs.DOCS`, shared with the sync client.
@documented
class TrainingControlClient:
    """Async client for `lrctl.v1.TrainingControlService`; arguments as for the sync
    `lrctl.client.TrainingControlClient`. Create it inside a running event loop."""

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
        options = channels.channel_options(channel_options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._metadata = channels.call_metadata(token)
        self._stub = pb_grpc.TrainingControlServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- the transport (everything else is in `calls`) ---

    def _error(self, exc: grpc.RpcError) -> errors.LrctlError:
        transient = (
            self._channel.get_state(try_to_connect=False)
            == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        )
        return channels.map_error(exc, self.target, transient)

    async def _invoke(self, call: calls.Call) -> Any:
        stub: Any = self._health if call.health else self._stub
        timeout = self.timeout if call.timeout is None else call.timeout
        try:
            return await getattr(stub, call.method)(call.request, timeout=timeout,
                                                    metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    async def _run(self, plan: calls.Plan[T]) -> T:
        try:
            step = next(plan)
            while True:
                if isinstance(step, calls.Sleep):
                    await asyncio.sleep(step.seconds)
                    step = plan.send(None)
                    continue
                try:
                    result = await self._invoke(step)
                except errors.LrctlError as exc:
                    step = plan.throw(exc)
                else:
                    step = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # --- RPCs: the sync client's methods, arguments and results, awaited; each runs the plan
    # of the same name in `calls` (or `run_action`) ---

    async def get_state(self, *, timeout: float | None = None, view: View = "full") -> pb.TrainingState:
        return await self._run(calls.get_state(timeout, view))

    async def set_learning_rate(
        self, value: float, *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, force: bool = False,
        preview_steps: int = 0, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", apply_after_steps: int | None = None,
    ) -> pb.Change:
        return await self._run(calls.send_change(Pin(value), pick(ChangeOptions, locals()),
                                                 timeout))

    async def scale_learning_rate(
        self, factor: float, *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, force: bool = False,
        preview_steps: int = 0, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", apply_after_steps: int | None = None,
    ) -> pb.Change:
        return await self._run(calls.send_change(Scale(factor), pick(ChangeOptions, locals()),
                                                 timeout))

    async def set_optimizer_parameters(
        self, parameters: Mapping[str, float], *, apply_at_step: int | None = None,
        expected_version: int | None = None, wait: bool = False, validate_only: bool = False,
        reason: str = "", request_id: str | None = None, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None,
    ) -> pb.Change:
        return await self._run(calls.send_change(Parameters(dict(parameters)),
                                                 pick(ChangeOptions, locals()), timeout))

    async def swap_schedule(
        self, schedule: ScheduleLike, *, origin: Origin = "restart",
        apply_at_step: int | None = None, expected_version: int | None = None,
        wait: bool = False, validate_only: bool = False, reason: str = "",
        request_id: str | None = None, force: bool = False, preview_steps: int = 0,
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
        apply_after_steps: int | None = None, schedule_start_step: int = 0,
        scale: float | None = None,
    ) -> pb.Change:
        return await self._run(calls.send_change(
            pick(Swap, locals()), pick(ChangeOptions, locals()), timeout))

    def watch(self, min_interval: float = 1.0, *, timeout: float | None = None,
              every_steps: int = 0, on_epoch_end: bool = False, changes_only: bool = False,
              view: View = "full") -> AsyncWatch:
        request = watch_request(min_interval, every_steps, on_epoch_end, changes_only, view)
        call = self._stub.WatchState(request, timeout=timeout, metadata=self._metadata)
        return AsyncWatch(call, self._error)

    # --- run control (`run_actions`) ---

    async def pause_training(self, timeout: float | None = None, *,
                             rpc_timeout: float | None = None, **options: Any) -> pb.Change:
        return await self._run(calls.run_action("pause_training", rpc_timeout, options,
                                                timeout=timeout))

    async def resume_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return await self._run(calls.run_action("resume_training", timeout, options))

    async def save_checkpoint(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return await self._run(calls.run_action("save_checkpoint", timeout, options))

    async def stop_training(self, *, timeout: float | None = None, **options: Any) -> pb.Change:
        return await self._run(calls.run_action("stop_training", timeout, options))

    async def load_checkpoint(self, path: str, load_hyperparameters: bool = False, *,
                              timeout: float | None = None, **options: Any) -> pb.Change:
        return await self._run(calls.run_action("load_checkpoint", timeout, options, path=path,
                                                load_hyperparameters=load_hyperparameters))

    async def cancel_change(
        self, *, request_id: str | None = None, version: int | None = None, reason: str = "",
        timeout: float | None = None, expected_run_id: str = "", expected_incarnation: str = "",
    ) -> pb.Change:
        return await self._run(calls.cancel_change(
            request_id=request_id, version=version, reason=reason, timeout=timeout,
            expected_run_id=expected_run_id, expected_incarnation=expected_incarnation))

    async def list_changes(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None,
        filter: str = "",
    ) -> pb.ListChangesResponse:
        return await self._run(calls.list_changes(page_size, page_token, timeout, filter))

    async def iter_changes(
        self, *, page_size: int = 0, timeout: float | None = None, filter: str = ""
    ) -> AsyncIterator[pb.Change]:
        token: str | None = ""
        while token is not None:
            page = await self.list_changes(page_size=page_size, page_token=token, timeout=timeout,
                                           filter=filter)
            for change in page.changes:
                yield change
            token = page.next_page_token or None

    async def list_measurements(
        self, *, start_step: int = 0, page_size: int = 0, page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListMeasurementsResponse:
        return await self._run(calls.list_measurements(start_step, page_size, page_token, timeout))

    async def iter_measurements(
        self, *, start_step: int = 0, page_size: int = 0, page_token: str = "",
        follow: bool = False, poll_interval: float = calls.FOLLOW_INTERVAL,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.Measurement]:
        token = page_token
        while True:
            page = await self.list_measurements(start_step=start_step, page_size=page_size,
                                                page_token=token, timeout=timeout)
            for measurement in page.measurements:
                yield measurement
            token = page.next_page_token or token
            if not page.measurements:
                if not follow:
                    return
                await asyncio.sleep(poll_interval)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return await self._run(calls.health(service, timeout))

    async def wait_until_ready(self, timeout: float | None = 60.0, *,
                               poll_interval: float = calls.POLL_INTERVAL) -> None:
        await self._run(calls.wait_until_ready(timeout, poll_interval))

    async def update(
        self, decide: Callable[[pb.TrainingState], Decision], *, retries: int = 3,
        reason: str = "", force: bool = False, timeout: float | None = None,
        expected_run_id: str = "", expected_incarnation: str = "",
        expected_version: int | None = None,
    ) -> pb.Change | None:
        return await self._run(calls.update(
            decide, retries=retries, options=pick(ChangeOptions, locals()), timeout=timeout))

    async def update_learning_rate(
        self, fn: Callable[[pb.TrainingState], float], *, retries: int = 3, reason: str = "",
        force: bool = False, timeout: float | None = None, expected_run_id: str = "",
        expected_incarnation: str = "", expected_version: int | None = None,
    ) -> pb.Change:
        return await self._run(calls.update_learning_rate(
            fn, retries=retries, options=pick(ChangeOptions, locals()), timeout=timeout))

    async def learning_rate_at(self, step: int, *, timeout: float | None = None,
                               expected_run_id: str = "") -> float:
        return await self._run(calls.learning_rate_at(step, timeout, expected_run_id))

    async def get_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = None,
    ) -> pb.Change:
        return await self._run(calls.get_change(name, request_id=request_id, version=version, timeout=timeout))

    async def wait_change(
        self, name: str | None = None, *, request_id: str | None = None, version: int | None = None,
        timeout: float | None = 60.0, poll_interval: float | None = None,
    ) -> pb.Change:
        return await self._run(calls.wait_change(name, request_id=request_id, version=version, timeout=timeout))
