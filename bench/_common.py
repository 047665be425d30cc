"""Shared pieces of the bench scripts: the seed model, statistics, the raw grpcio echo server
(the latency floor) and a trainer child process that serves lrctl and the echo side by side.

Run as a script, it is that child:

    python bench/_common.py trainer [--steps-per-epoch N [--checkpoint-dir DIR]]

It trains the seed model with lrctl until its stdin closes, and prints one line
`PORTS <lrctl port> <echo port>` once the first step has run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
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


def median_ci(samples: Sequence[float]) -> dict[str, Any]:
    """Median with a distribution-free 95% confidence interval (binomial order statistics),
    and the mean beside it. On a shared machine a few rounds run 2x slow: they move the mean
    and its t interval a lot, the median and this interval hardly."""
    ordered = sorted(samples)
    n = len(ordered)
    k = math.floor((n - 1.96 * math.sqrt(n)) / 2)  # 0-based rank of the lower bound
    low, high = (ordered[k], ordered[n - 1 - k]) if n and k >= 0 else (-math.inf, math.inf)
    median = statistics.median(ordered) if n else math.nan
    return {"median": round(median, 2), "ci95": [round(low, 2), round(high, 2)],
            "ci_width": round(high - low, 2), "mean": round(statistics.fmean(ordered), 2) if n else math.nan,
            "n": n}


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


def echo_server(payload: bytes) -> tuple[Any, int]:
    """A raw grpcio server answering ECHO_METHOD with `payload`, pre-serialized: the floor any
    unary call of that response size pays on this machine. Returns (server, port)."""
    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return payload

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="echo"), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class TrainerProcess:
    """A child process training the seed model with lrctl and an echo server beside it."""

    def __init__(self, steps_per_epoch: int = 50, checkpoint_dir: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_common.py"), "trainer", "--steps-per-epoch",
             str(steps_per_epoch), *(["--checkpoint-dir", checkpoint_dir] if checkpoint_dir else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "PORTS":
            self.proc.kill()
            raise RuntimeError(f"trainer child did not start: {line}")
        self.port, self.echo_port = int(line[1]), int(line[2])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> TrainerProcess:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _trainer_main(steps_per_epoch: int, checkpoint_dir: str | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from lrctl.service import TrainingControl
    from lrctl.service.rpc.server import serve
    model = seed_model()
    control = TrainingControl(model.optimizer, run_id="bench")
    if checkpoint_dir:  # its write-ahead log: every change fsynced before the answer
        from lrctl.service.training.checkpoints import Checkpointer

        Checkpointer(control, model, checkpoint_dir)
    x, y = seed_data(steps_per_epoch)
    stop = threading.Event()
    started = threading.Event()

    class Stopper(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            started.set()
            if stop.is_set():
                self.model.stop_training = True

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        # The floor's payload: a GetState response of the size lrctl sends during training.
        def announce() -> None:
            started.wait()
            payload = _state_payload(port)
            echo, echo_port = echo_server(payload)
            holder.append(echo)
            print(f"PORTS {port} {echo_port}", flush=True)

        holder: list[Any] = []
        threading.Thread(target=announce, daemon=True).start()
        with control.training():
            while not stop.is_set():
                model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False,
                          callbacks=[control.callback, Stopper()])
        for echo in holder:
            echo.stop(None)


def _state_payload(port: int) -> bytes:
    """A GetState response as the server sends it now, serialized: the echo's payload."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/lrctl.v1.TrainingControlService/GetState")
        return call(b"", timeout=30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["trainer"]:
        _trainer_main(int(sys.argv[3]) if len(sys.argv) > 3 else 50,
                      sys.argv[5] if sys.argv[4:5] == ["--checkpoint-dir"] else None)
