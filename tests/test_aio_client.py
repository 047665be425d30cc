"""`lrctl.client.aio` drives a real trainer under asyncio, and watches (async and sync) end
cleanly when cancelled, on the server too. Real `model.fit`, real server, real clients."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator

import grpc
import grpc.aio
import keras
import pytest
from live import LiveTrainer

from lrctl.client import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TrainingControlClient,
    VersionConflict,
    aio,
    errors,
    pb,
    schedules,
)
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve

LIMIT = 60.0  # a safety limit, never a timing check


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


@pytest.fixture
def one_stream() -> Iterator[tuple[TrainingControl, str]]:
    """A real server over a run that has not started, with room for one stream only."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0", max_streams=1) as (_, port):
        yield control, f"127.0.0.1:{port}"


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5)


@pytest.mark.asyncio
async def test_async_client_gets_sets_scales_and_swaps(trainer: LiveTrainer) -> None:
    async with aio.TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        await client.wait_until_ready(LIMIT)
        assert await client.health() == "SERVING"
        state = await client.get_state()
        assert state.phase == pb.PHASE_TRAINING

        change = await client.set_learning_rate(0.05, wait=True, reason="aio")
        assert change.status == pb.CHANGE_STATUS_APPLIED and change.request_id  # automatic id
        assert _close(trainer.lr_at(change.applied_step), 0.05)

        change = await client.scale_learning_rate(0.5, wait=True)
        assert _close(trainer.lr_at(change.applied_step), 0.025)

        change = await client.swap_schedule(schedules.Constant(0.004), wait=True)
        assert _close(trainer.lr_at(change.applied_step), 0.004)
        assert (await client.get_change(request_id=change.request_id)).version == change.version
        assert (await client.get_change(version=change.version)).request_id == change.request_id

        change = await client.update_learning_rate(lambda s: s.learning_rate * 2)
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert _close(trainer.lr_at(change.applied_step), 0.008)

        seen = [c.request_id async for c in client.iter_changes(page_size=2)]
        assert change.request_id == seen[0] and len(seen) >= 4


@pytest.mark.asyncio
async def test_async_watch_and_cancel_change(trainer: LiveTrainer) -> None:
    async with aio.TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        steps = []
        async with client.watch(0.01) as updates:
            async for state in updates:
                steps.append(state.step)
                if len(steps) == 3:
                    break
        assert steps == sorted(steps) and steps[-1] > steps[0]

        far = (await client.get_state()).step + 10_000_000
        pending = await client.set_learning_rate(0.5, apply_at_step=far)
        assert pending.status == pb.CHANGE_STATUS_PENDING
        cancelled = await client.cancel_change(request_id=pending.request_id, reason="no")
        assert cancelled.status == pb.CHANGE_STATUS_CANCELLED
        waited = await client.wait_change(request_id=pending.request_id, timeout=LIMIT)
        assert waited.status == pb.CHANGE_STATUS_CANCELLED


@pytest.mark.asyncio
async def test_async_errors_are_typed_with_details(trainer: LiveTrainer) -> None:
    async with aio.TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        version = (await client.get_state()).version
        with pytest.raises(VersionConflict) as conflict:
            await client.scale_learning_rate(1.0, expected_version=version + 1000)
        assert conflict.value.current_version is not None
        with pytest.raises(InvalidArgument) as invalid:
            await client.set_learning_rate(float("nan"))
        assert invalid.value.field_violations
        with pytest.raises(NotFound):
            await client.cancel_change(request_id="no-such-change")
        with pytest.raises(NotFound):
            await client.get_change(request_id="no-such-change")
        with pytest.raises(InvalidArgument) as info:
            await anext(aiter(client.watch(min_interval=-1.0)))
        assert [f for f, _ in info.value.field_violations] == ["min_interval"]


def test_from_rpc_error_maps_aio_errors() -> None:
    error = grpc.aio.AioRpcError(grpc.StatusCode.ABORTED, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(), details="stale")
    mapped = errors.from_rpc_error(error)
    assert isinstance(mapped, VersionConflict) and mapped.message == "stale"


@pytest.mark.asyncio
async def test_wait_until_ready_times_out_before_the_run(
        one_stream: tuple[TrainingControl, str]) -> None:
    async with aio.TrainingControlClient(one_stream[1], timeout=LIMIT) as client:
        with pytest.raises(DeadlineExceeded):
            await client.wait_until_ready(0.2)


async def _first_update(target: str) -> pb.TrainingState:
    """The first update of a new watch, retried while the server's only slot is taken."""
    deadline = time.monotonic() + LIMIT
    async with aio.TrainingControlClient(target, timeout=LIMIT) as client:
        while True:
            try:
                async with client.watch(0.01) as updates:
                    return await anext(aiter(updates))
            except ResourceExhausted:
                assert time.monotonic() < deadline, "the cancelled watch kept its server slot"
                await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_cancelling_a_watching_task_ends_the_stream_on_the_server(
        one_stream: tuple[TrainingControl, str]) -> None:
    target = one_stream[1]
    first = asyncio.Event()

    async def watch() -> None:
        async with aio.TrainingControlClient(target) as client:
            async for _ in client.watch(0.01):
                first.set()  # the run never starts: the stream then blocks

    task = asyncio.create_task(watch())
    await asyncio.wait_for(first.wait(), LIMIT)
    async with aio.TrainingControlClient(target, timeout=LIMIT) as client:
        with pytest.raises(ResourceExhausted):  # the one slot is held by the watch
            await anext(aiter(client.watch(0.01)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await _first_update(target)).phase == pb.PHASE_STARTING


def test_sync_watch_is_cancelled_from_another_thread(
        one_stream: tuple[TrainingControl, str]) -> None:
    target = one_stream[1]
    first = threading.Event()
    seen: list[pb.TrainingState] = []
    failure: list[BaseException] = []

    with TrainingControlClient(target, timeout=LIMIT) as client:
        with client.watch(0.01) as updates:

            def consume() -> None:
                try:
                    for state in updates:  # blocks after the first: the run never starts
                        seen.append(state)
                        first.set()
                except BaseException as exc:  # noqa: BLE001 -- reported below
                    failure.append(exc)

            thread = threading.Thread(target=consume, daemon=True)
            thread.start()
            assert first.wait(LIMIT)
            updates.cancel()  # from this thread, while the consumer is blocked in next()
            thread.join(LIMIT)
            assert not thread.is_alive() and failure == [] and len(seen) >= 1
            assert updates.cancelled
        # The server's only stream slot came back.
        assert asyncio.run(_first_update(target)).phase == pb.PHASE_STARTING
