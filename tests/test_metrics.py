"""Prometheus metrics (`--metrics-listen`): a real fit, a real server and client, a scrape."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import pytest
import tensorflow as tf
import tiny

from lrctl.client import TrainingControlClient
from lrctl.client.errors import LrctlError
from lrctl.service import TrainingControl
from lrctl.service.apps import trainer_args
from lrctl.service.observability.metrics import TrainingMetrics, split_address
from lrctl.service.rpc.server import serve

TOKEN = "metrics-test-token"
SERVICE = "/lrctl.v1.TrainingControlService"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    """The sample `name{labels}` (labels in any order) of a Prometheus text exposition."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


class _Remote(keras.callbacks.Callback):
    """At step 2, changes the LR through the real client (due at step 5), makes one invalid
    request and one without a token."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.results: list[Any] = []

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if int(self.model.optimizer.iterations.numpy()) != 2:
            return
        target = f"127.0.0.1:{self.port}"
        with TrainingControlClient(target, token=TOKEN) as client:
            self.results.append(client.set_learning_rate(0.05, apply_at_step=5, reason="cool"))
            self.results.append(client.get_state())
            with pytest.raises(LrctlError):
                client.scale_learning_rate(-1.0)
        with TrainingControlClient(target) as anonymous, pytest.raises(LrctlError):
            anonymous.get_state()


def test_scrape_shows_the_lr_change_change_counts_and_rpc_counts() -> None:
    keras.utils.set_random_seed(0)
    model = tiny.make_model(0.1)
    control = TrainingControl(model.optimizer, publish_interval=0.0)
    metrics = TrainingMetrics(control.controller)
    TrainingMetrics(control.controller)  # a second set: its own registry, no name clash
    with serve(control.controller, "127.0.0.1:0", write_tokens=[TOKEN],
               extra_interceptors=[metrics.interceptor]) as (_, port), \
            metrics.serving("127.0.0.1", 0) as metrics_port:
        before = _scrape(metrics_port)
        assert _value(before, "lrctl_learning_rate") == pytest.approx(0.1)
        assert _value(before, "lrctl_changes_total", status="applied") == 0

        remote = _Remote(port)
        x, y = tiny.data(8)
        model.fit(x, y, batch_size=tiny.BATCH, epochs=1, verbose=0, shuffle=False,
                  callbacks=[remote, control.callback])
        assert len(remote.results) == 2
        text = _scrape(metrics_port)

    assert _value(text, "lrctl_learning_rate") == pytest.approx(0.05)
    assert _value(text, "lrctl_learning_rate_scale") == 1.0
    assert _value(text, "lrctl_schedule_version") == 1
    assert _value(text, "lrctl_step") == 8
    assert _value(text, "lrctl_phase", phase="finished") == 1
    assert _value(text, "lrctl_changes_total", status="applied") == 1
    assert _value(text, "lrctl_changes_total", status="cancelled") == 0
    assert _value(text, "lrctl_apply_seconds_count") == 1
    assert _value(text, "lrctl_rpcs_total", method=f"{SERVICE}/SetLearningRate", code="OK") == 1
    assert _value(text, "lrctl_rpcs_total", method=f"{SERVICE}/SetLearningRate",
                  code="INVALID_ARGUMENT") == 1
    assert _value(text, "lrctl_rpcs_total", method=f"{SERVICE}/GetState", code="OK") == 1
    assert _value(text, "lrctl_rpcs_total", method=f"{SERVICE}/GetState",
                  code="UNAUTHENTICATED") == 1


def test_metrics_of_a_starting_trainer_then_of_the_controller_bound_later() -> None:
    from fakes import MemoryTarget

    from lrctl.client import pb
    from lrctl.service.control.changes import ChangeRequest, PinLearningRate
    from lrctl.service.control.controller import Controller
    from lrctl.service.rpc.slot import ControllerSlot
    from lrctl.service.schedules import specs

    slot = ControllerSlot(run_id="r", incarnation="i")
    metrics = TrainingMetrics(slot)
    with serve(slot, "127.0.0.1:0", extra_interceptors=[metrics.interceptor]) as (_, port), \
            metrics.serving("127.0.0.1", 0) as metrics_port, \
            TrainingControlClient(f"127.0.0.1:{port}", timeout=30) as client:
        assert client.get_state().phase == pb.PHASE_STARTING
        text = _scrape(metrics_port)
        assert _value(text, "lrctl_phase", phase="starting") == 1
        assert _value(text, "lrctl_rpcs_total", method=f"{SERVICE}/GetState", code="OK") == 1
        assert "lrctl_step " not in text  # no state before the controller exists
        controller = Controller(MemoryTarget(specs.ActiveSchedule(specs.Constant(0.1))))
        slot.bind(controller)
        controller.submit(ChangeRequest(PinLearningRate(0.2)))
        controller.apply_due(3)
        text = _scrape(metrics_port)
        assert _value(text, "lrctl_schedule_version") == 1 and _value(text, "lrctl_step") == 3
        assert _value(text, "lrctl_apply_seconds_count") == 1  # its observer was added at bind


def test_metrics_address_and_flags() -> None:
    assert split_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert split_address("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError):
        split_address("localhost")
    args = trainer_args.parse(["--demo", "--metrics-listen", "127.0.0.1:0", "--tensorboard-dir", "tb",
                           "--tensorboard-every", "5"])
    assert (args.metrics_listen, args.tensorboard_dir, args.tensorboard_every) == ("127.0.0.1:0", "tb", 5)
    assert trainer_args.parse(["--demo"]).metrics_listen is None


LIMIT = 120  # seconds: a safety limit for a hung process, never a timing check


def test_trainer_serves_metrics_and_writes_tensorboard(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """`lrctl-trainer --metrics-listen --tensorboard-dir`: the wiring, end to end."""
    board = tmp_path / "tb"
    process = subprocess.Popen(
        [sys.executable, "-c", "from lrctl.service.apps.trainer import main; raise SystemExit(main())",
         "--demo", "--listen", "127.0.0.1:0", "--verbose", "0", "--metrics-listen", "127.0.0.1:0",
         "--tensorboard-dir", str(board)], stderr=subprocess.PIPE, text=True, env=subprocess_env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "control server on port" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(LIMIT), "the trainer never listened"
        text = "".join(lines)
        grpc_port = int(re.search(r"control server on port (\d+)", text).group(1))  # type: ignore[union-attr]
        metrics_port = int(re.search(r"metrics on http://[^:]+:(\d+)/metrics", text).group(1))  # type: ignore[union-attr]
        with TrainingControlClient(f"127.0.0.1:{grpc_port}", timeout=LIMIT) as client:
            deadline = time.monotonic() + LIMIT
            while client.get_state().step < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            change = client.set_learning_rate(0.0123, wait=True, reason="from the test")
        scraped = _scrape(metrics_port)
        assert _value(scraped, "lrctl_learning_rate") == pytest.approx(0.0123)
        assert _value(scraped, "lrctl_changes_total", status="applied") == 1
        assert _value(scraped, "lrctl_rpcs_total", method=f"{SERVICE}/SetLearningRate", code="OK") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=LIMIT) == 0, "".join(lines)
    finally:
        process.kill()
        reader.join(timeout=10)

    texts = [(event.step, tf.make_ndarray(value.tensor).item().decode())
             for path in board.glob("events.out.tfevents.*")
             for event in tf.compat.v1.train.summary_iterator(str(path))
             for value in event.summary.value if value.tag == "lrctl/changes"]
    assert texts == [(change.applied_step, texts[0][1])]
    assert "from the test" in texts[0][1]
