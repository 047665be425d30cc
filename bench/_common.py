"""Shared pieces of the bench scripts: the seed model, statistics, the raw grpcio echo server
(the latency floor) and a trainer child process that serves lrctl and the echo side by side.

Run as a script, it is that child:

    python bench/_common.py trainer [--steps-per-epoch N] [--checkpoint-dir DIR]

It trains the seed model with lrctl until its stdin closes. It prints `LRCTL <file of the
lrctl.service it imported>` at once and `PORTS <lrctl port> <echo port>` once its first epochs
have run. On stdin it takes `pause` (answers `PAUSED` once training waits at a step's end),
`resume` (`RUNNING`), `steps` (`STEPS <batches trained> <its monotonic time>`) and
`payload` (resizes the echo to GetState's answer now: `PAYLOAD <bytes>`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 32
ECHO_METHOD = "/bench.Echo/Echo"

# Two-sided 95% Student t quantiles by degrees of freedom; 1.96 beyond the table.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
        10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def t95(df: int) -> float:
    if df <= 0:
        return math.inf
    known = [k for k in _T95 if k <= df]
    return _T95[max(known)] if df <= 120 else 1.96


def mean_ci(samples: Sequence[float]) -> dict[str, Any]:
    """Mean with a 95% confidence interval (Student t; infinite with fewer than 2 samples)."""
    n = len(samples)
    mean = statistics.fmean(samples) if n else math.nan
    half = t95(n - 1) * statistics.stdev(samples) / math.sqrt(n) if n > 1 else math.inf
    return {"mean": round(mean, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)],
            "ci_width": round(2 * half, 2), "n": n}


def median_ci(samples: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """Median with a distribution-free 95% confidence interval (binomial order statistics),
    and the mean beside it. On a shared machine a few rounds run 2x slow: they move the mean
    and its t interval a lot, the median and this interval hardly."""
    ordered = sorted(samples)
    n = len(ordered)
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)  # 0-based rank of the lower bound
    low, high = (ordered[k], ordered[n - 1 - k]) if n and k >= 0 else (-math.inf, math.inf)
    median = statistics.median(ordered) if n else math.nan
    return {"median": round(median, digits), "ci95": [round(low, digits), round(high, digits)],
            "ci_width": round(high - low, digits),
            "mean": round(statistics.fmean(ordered), digits) if n else math.nan, "n": n}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """The median of the ratios of paired figures (of the same round), with its 95% CI; a pair
    without a figure (NaN, or a zero denominator) is left out."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True) if math.isfinite(a) and b > 0]
    return {k: v for k, v in median_ci(ratios, digits=3).items() if k != "mean"}


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def p50_p99_ms(seconds: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(seconds, 50) * 1e3, 3), "p99_ms": round(percentile(seconds, 99) * 1e3, 3),
            "n": len(seconds)}


def emit(result: dict[str, Any]) -> None:
    """The result, as one JSON line: always the script's last line of output."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True), flush=True)


def seed_model(lr: Any = 0.001, *, jit: bool = False, steps_per_execution: int = 1) -> Any:
    """The seed article's model: Dense 784->10 relu, Dense 10 softmax, Adam."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="categorical_crossentropy",
                  jit_compile=jit, steps_per_execution=steps_per_execution)
    return model


def seed_data(steps: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * steps, 784)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, BATCH * steps)]
    return x, y


def echo_server(payload: list[bytes]) -> tuple[Any, int]:
    """A raw grpcio server answering ECHO_METHOD with `payload[0]`, pre-serialized (replace it
    to resize the answer): the floor any unary call of that response size pays on this
    machine. Returns (server, port)."""
    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return payload[0]

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="echo"), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class TrainerProcess:
    """A child process training the seed model with lrctl and an echo server beside it.

    `lrctl_root`: a source tree of lrctl (bench/_baseline.py's `materialize`) whose service/
    and client/ go first on the child's PYTHONPATH, so it serves that version from this same
    venv; None: the lrctl this venv imports. The child names the lrctl it imported, and that
    is checked. `pause`/`resume` stop and restart its training at a step boundary (one
    trainer measured while another waits); `resize_echo` sizes the echo to the GetState
    response as it is now."""

    def __init__(self, steps_per_epoch: int = 50, checkpoint_dir: str | None = None, *,
                 lrctl_root: str | None = None, wait: bool = True) -> None:
        env = dict(os.environ)
        if lrctl_root is not None:
            paths = [os.path.join(lrctl_root, "service"), os.path.join(lrctl_root, "client")]
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
            self.expected_lrctl = os.path.join(lrctl_root, "service", "lrctl", "service")
        else:
            self.expected_lrctl = _venv_lrctl_service()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_common.py"), "trainer", "--steps-per-epoch",
             str(steps_per_epoch), *(["--checkpoint-dir", checkpoint_dir] if checkpoint_dir else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.port = self.echo_port = 0
        self.lrctl_file = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the first step and the ports; check which lrctl the child imported."""
        self.lrctl_file = self._expect("LRCTL")[0]
        if os.path.dirname(os.path.realpath(self.lrctl_file)) != os.path.realpath(self.expected_lrctl):
            self.proc.kill()
            raise RuntimeError(f"trainer child imported {self.lrctl_file}, not the lrctl in {self.expected_lrctl}")
        ports = self._expect("PORTS")
        self.port, self.echo_port = int(ports[0]), int(ports[1])

    def _expect(self, word: str) -> list[str]:
        """The fields after `word` on the child's next line that starts with it."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                raise RuntimeError(f"trainer child ended before saying {word}")
            fields = line.split()
            if fields[:1] == [word]:
                return fields[1:]

    def _command(self, command: str, answer: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._expect(answer)

    def pause(self) -> None:
        """Return once the training thread waits at a step's end."""
        self._command("pause", "PAUSED")

    def resume(self) -> None:
        """Return once the training thread runs again."""
        self._command("resume", "RUNNING")

    def steps(self) -> tuple[int, float]:
        """(batches trained, the child's time.monotonic() then): exact, unlike the state's step,
        which is published at most every 0.1 s, and read without going through lrctl."""
        count, at = self._command("steps", "STEPS")
        return int(count), float(at)

    def resize_echo(self) -> int:
        """Make the echo's payload the GetState (view BASIC) response as it is now; its size."""
        return int(self._command("payload", "PAYLOAD")[0])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> TrainerProcess:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _venv_lrctl_service() -> str:
    """The folder of the lrctl.service this interpreter would import (without importing it:
    it imports TensorFlow)."""
    import importlib.util

    spec = importlib.util.find_spec("lrctl.service")
    assert spec is not None and spec.origin is not None
    return os.path.dirname(spec.origin)


# The state carries all its fields (epoch metrics, steps per second) after a few epochs: the
# echo's payload is taken then.
SETTLED_EPOCHS = 3

# GetStateRequest(view=STATE_VIEW_BASIC), serialized by hand: the child may run an lrctl from
# before views (its stubs lack the field), and a server from then ignores the unknown field.
BASIC_STATE_REQUEST = b"\x08\x01"


def _trainer_main(steps_per_epoch: int, checkpoint_dir: str | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import lrctl.service
    from lrctl.service import TrainingControl
    from lrctl.service.rpc.server import serve

    say_lock = threading.Lock()

    def say(line: str) -> None:
        with say_lock:
            print(line, flush=True)

    say(f"LRCTL {lrctl.service.__file__}")  # the parent checks it is the version it asked for
    model = seed_model()
    control = TrainingControl(model.optimizer, run_id="bench")
    if checkpoint_dir:  # its write-ahead log: every change fsynced before the answer
        from lrctl.service.training.checkpoints import Checkpointer

        Checkpointer(control, model, checkpoint_dir)
    x, y = seed_data(steps_per_epoch)
    stop = threading.Event()
    started = threading.Event()
    running = threading.Event()
    running.set()
    payload: list[bytes] = []  # the echo's answer, replaced by the "payload" command
    lrctl_port: list[int] = []

    steps = [0]  # batches trained, counted here: exact, where the served state's step is throttled

    class Stopper(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            steps[0] += 1
            if steps[0] >= SETTLED_EPOCHS * steps_per_epoch:
                started.set()
            if not running.is_set():  # paused between two steps, as long as the parent says
                say("PAUSED")
                running.wait()
                say("RUNNING")
            if stop.is_set():
                self.model.stop_training = True

    def read_commands() -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "pause":
                running.clear()
            elif command == "resume":
                running.set()
            elif command == "steps":
                say(f"STEPS {steps[0]} {time.monotonic()}")
            elif command == "payload":
                payload[0] = _state_payload(lrctl_port[0])
                say(f"PAYLOAD {len(payload[0])}")
        stop.set()  # stdin closed: the parent is done
        running.set()

    threading.Thread(target=read_commands, daemon=True).start()
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        lrctl_port.append(port)

        # The floor's payload: a GetState response of the size lrctl sends during training.
        def announce() -> None:
            started.wait()
            payload.append(_state_payload(port))
            echo, echo_port = echo_server(payload)
            holder.append(echo)
            say(f"PORTS {port} {echo_port}")

        holder: list[Any] = []
        threading.Thread(target=announce, daemon=True).start()
        # One fit over endless epochs, until the parent says stop: a fit per epoch would stall
        # training for 0.1 to 0.4 s at each epoch's start (a new data pipeline), here every 50 steps.
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
        with control.training():
            model.fit(data, steps_per_epoch=steps_per_epoch, epochs=2**31 - 1, verbose=0,
                      callbacks=[control.callback, Stopper()])
        for echo in holder:
            echo.stop(None)


def _state_payload(port: int) -> bytes:
    """A GetState (view BASIC) response as the server sends it now, serialized: the echo's
    payload. A server from before views answers its whole state, its GetState response."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/lrctl.v1.TrainingControlService/GetState")
        return call(BASIC_STATE_REQUEST, timeout=30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["trainer"]:
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("--steps-per-epoch", type=int, default=50)
        parser.add_argument("--checkpoint-dir")
        options = parser.parse_args(sys.argv[2:])
        _trainer_main(options.steps_per_epoch, options.checkpoint_dir)
        # Everything is stopped and flushed: skip the interpreter's teardown, where TensorFlow's
        # and gRPC's native threads can take 10 to 60 s on a busy machine.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
