"""ListMeasurements end to end: a real `fit`, the real server and client. A reader that
reconnects with its page token misses nothing; epoch ends carry the validation metrics; bad
requests name their field; the CLI and the asyncio client read the same measurements."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from io import StringIO

import keras
import numpy as np
import pytest
from live import LiveTrainer, state_until

from lrctl.client import InvalidArgument, TrainingControlClient, cli, pb
from lrctl.client import aio as lrctl_aio
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


def _read_all(client: TrainingControlClient, token: str, upto: int) -> tuple[list[pb.Measurement], str, bool]:
    """Pages from `token` until the measurement numbered `upto` is read."""
    read: list[pb.Measurement] = []
    truncated = False
    while not read or read[-1].sequence < upto:
        page = client.list_measurements(page_token=token, page_size=7)
        assert page.next_page_token
        truncated = truncated or page.truncated
        read.extend(page.measurements)
        token = page.next_page_token
    return read, token, truncated


def test_a_reconnecting_reader_resumes_from_its_token_and_misses_nothing(trainer: LiveTrainer) -> None:
    with TrainingControlClient(trainer.target, timeout=60) as client:
        state = state_until(client, lambda s: s.measurement_sequence >= 3)
        first, token, truncated = _read_all(client, "", state.measurement_sequence)
    assert not truncated and first[0].sequence == 1
    # The reader is gone while training goes on (epoch ends every 100 steps are recorded).
    with TrainingControlClient(trainer.target, timeout=60) as client:
        later = state_until(client, lambda s: s.measurement_sequence >= first[-1].sequence + 3)
        step_then = later.step
    with TrainingControlClient(trainer.target, timeout=60) as client:  # a new connection
        rest, _, truncated = _read_all(client, token, later.measurement_sequence)
    assert not truncated
    seen = [m.sequence for m in [*first, *rest]]
    assert seen == list(range(1, seen[-1] + 1))  # every one, once, in order
    steps = [m.step for m in [*first, *rest]]
    assert steps == sorted(steps) and steps[-1] <= step_then + 100
    assert all("loss" in m.metrics and m.time.seconds > 0 for m in [*first, *rest])


def test_start_step_bad_requests_and_tokens(trainer: LiveTrainer) -> None:
    with TrainingControlClient(trainer.target, timeout=60) as client:
        state_until(client, lambda s: s.measurement_sequence >= 2)
        newest = client.get_state().measurement_sequence
        everything, _, _ = _read_all(client, "", newest)
        middle = everything[len(everything) // 2].step
        page = client.list_measurements(start_step=middle, page_size=1000)
        assert page.measurements and all(m.step >= middle for m in page.measurements)
        assert page.measurements[0].sequence == min(m.sequence for m in everything if m.step >= middle)
        for kwargs, field in [({"page_size": -1}, "page_size"), ({"start_step": -1}, "start_step"),
                              ({"page_token": "not-a-token"}, "page_token"),
                              ({"page_token": client.list_changes().next_page_token or "x"}, "page_token")]:
            with pytest.raises(InvalidArgument) as info:
                client.list_measurements(**kwargs)
            assert field in str(info.value), info.value
        assert len(client.list_measurements(page_size=5000).measurements) <= 1000
        # Caught up: an empty page, and a token to go on with.
        caught_up = client.list_measurements(page_token=_read_all(client, "", client.get_state(
            ).measurement_sequence)[1])
        assert caught_up.next_page_token and all(m.sequence > newest for m in caught_up.measurements)


def test_the_cli_and_the_asyncio_client(trainer: LiveTrainer) -> None:
    with TrainingControlClient(trainer.target, timeout=60) as client:
        state_until(client, lambda s: s.measurement_sequence >= 2)
    out = StringIO()
    assert cli.main(["--target", trainer.target, "--timeout", "60", "measurements", "--json"], out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [int(m["sequence"]) for m in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 2
    out = StringIO()
    assert cli.main(["--target", trainer.target, "measurements", "--start-step", "1"], out=out) == 0
    assert out.getvalue().startswith("#") and "loss=" in out.getvalue()

    async def read() -> list[int]:
        async with lrctl_aio.TrainingControlClient(trainer.target, timeout=60) as aclient:
            return [m.sequence async for m in aclient.iter_measurements(page_size=3)]

    sequences = asyncio.run(read())
    assert sequences[: len(lines)] == [int(m["sequence"]) for m in lines]


def test_epoch_ends_carry_validation_metrics_and_a_change_is_measured() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    control = TrainingControl(model.optimizer)
    x = np.random.default_rng(0).normal(size=(64, 2)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    gate = threading.Event()

    class Gate(keras.callbacks.Callback):
        """Holds training at step 4 until the change below is queued (a safety limit, not a
        timing check: only the order matters)."""

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 4 and not gate.is_set():
                gate.wait(60)

    with serve(control.controller, "127.0.0.1:0") as (_, port), \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=60) as client:
        fit = threading.Thread(target=lambda: model.fit(
            x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0, shuffle=False,
            callbacks=[control.callback, Gate()]))
        fit.start()
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(gate.set)
            change = client.set_learning_rate(0.02)  # applies by step 5: the gate holds step 4
            gate.set()
            fit.join(120)
        assert not fit.is_alive()
        measurements = list(client.iter_measurements())
        applied = client.get_change(change.name)
    ends = [m for m in measurements if m.epoch_end]
    assert [(m.epoch, m.step) for m in ends] == [(0, 8), (1, 16)]
    assert all("val_loss" in m.metrics and "loss" in m.metrics for m in ends)
    assert applied.status == pb.CHANGE_STATUS_APPLIED
    # The first batch logs taken after the change are recorded, however fast the steps.
    assert any(not m.epoch_end and m.step > applied.applied_step for m in measurements)
    assert [m.sequence for m in measurements] == list(range(1, len(measurements) + 1))
