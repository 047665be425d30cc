"""Throughput and memory of `model.fit` under lrctl, side by side with plain `fit`, in one run.

    python bench/bench_fit.py [--rounds 7] [--steps 300] [--jit] [--steps-per-execution N]

Model: the seed article's (Dense 784->10 relu, Dense 10 softmax), Adam, batch 32, CPU.
Variants (all in this process, interleaved round by round in a shuffled order, so drift and
ordering effects hit each alike):
  plain            Adam(learning_rate=0.001)                       -- the baseline
  plain_twin       an identical second copy of plain: its ratio shows the noise floor
  keras_schedule   Adam(ExponentialDecay(...)): Keras's own in-graph schedule
  lrctl_idle       lrctl attached, server up, no changes
  lrctl_changes    lrctl attached, an orchestrator process (bench/orchestrator.py) scales
                   the LR every 50 steps over gRPC; it shares the machine's cores
  assign_per_batch a callback assigning optimizer.learning_rate every batch (the naive way)
Reports median steps/s per variant and its speed ratio to `plain` (1.00 = as fast): the
median of per-round ratios with their interquartile range, and the ratio of best rounds. Memory: the
RSS a fresh process gains by building and training each variant, and its ratio to plain's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve

VARIANTS = ("plain", "plain_twin", "keras_schedule", "lrctl_idle", "lrctl_changes", "assign_per_batch")
BATCH = 32


class _AssignEveryBatch(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.model.optimizer.learning_rate.assign(0.001)


class Variant:
    """One compiled model and the callbacks/server it trains with."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(BATCH * args.steps, 784)).astype("float32")
        self.y = keras.utils.to_categorical(rng.integers(0, 10, BATCH * args.steps), 10)
        lr: Any = 0.001
        if name == "keras_schedule":
            lr = keras.optimizers.schedules.ExponentialDecay(0.001, 10, 0.96, staircase=True)
        self.model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="relu"),
                                       keras.layers.Dense(10, activation="softmax")])
        self.model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                           loss="categorical_crossentropy", jit_compile=args.jit,
                           steps_per_execution=args.steps_per_execution)
        self.callbacks: list[keras.callbacks.Callback] = []
        self._stack = contextlib.ExitStack()
        self.controller: Any = None
        if name == "assign_per_batch":
            self.callbacks.append(_AssignEveryBatch())
        if name.startswith("lrctl"):
            control = TrainingControl(self.model.optimizer)
            self.callbacks.append(control.callback)
            self._stack.enter_context(control.training())  # one run across many fit() calls
            _, port = self._stack.enter_context(serve(control.controller, "127.0.0.1:0"))
            if name == "lrctl_changes":
                orchestrator = subprocess.Popen(
                    [sys.executable, os.path.join(os.path.dirname(__file__), "orchestrator.py"), str(port)])
                self._stack.callback(orchestrator.wait)
                self._stack.callback(orchestrator.terminate)
            self.controller = control.controller
        self.fit(epochs=1)  # warm-up: trace and compile outside the timed region

    def fit(self, epochs: int) -> float:
        start = time.perf_counter()
        self.model.fit(self.x, self.y, batch_size=BATCH, epochs=epochs, verbose=0,
                       shuffle=False, callbacks=self.callbacks)
        return time.perf_counter() - start

    @property
    def changes(self) -> int:
        return self.controller.snapshot().version if self.controller else 0

    def close(self) -> None:
        self._stack.close()


def measure_speed(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    variants = {name: Variant(name, args) for name in args.variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)  # no variant always runs right after another
        for name in order:
            seconds[name].append(variants[name].fit(epochs=1))
    for variant in variants.values():
        variant.close()
    # The machines are noisy (2x swings between rounds): ratios are taken round by round
    # against the same round's baseline (paired), and the median of those is reported.
    base = seconds["plain"] if "plain" in seconds else next(iter(seconds.values()))
    def quartiles(s: list[float]) -> list[float]:
        return [round(q, 3) for q in statistics.quantiles([b / t for b, t in zip(base, s)], n=4)]

    return {name: {"steps_per_s": round(args.steps / statistics.median(s), 1),
                   "ratio": quartiles(s)[1], "ratio_iqr": [quartiles(s)[0], quartiles(s)[2]],
                   "ratio_best": round(min(base) / min(s), 3),
                   **({"changes": variants[name].changes} if name == "lrctl_changes" else {})}
            for name, s in seconds.items()}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """Resident memory (MiB) a fresh process gains by building and training one variant:
    RSS after training minus RSS once TensorFlow and lrctl are imported (best of 3)."""
    peaks = {}
    for name in args.variants:
        peaks[name] = min(_child_rss_growth(name, args) for _ in range(3))  # allocator noise
    return peaks


def _child_rss_growth(name: str, args: argparse.Namespace) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, "--steps", str(args.steps),
         "--steps-per-execution", str(args.steps_per_execution), *(["--jit"] if args.jit else [])],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed epoch")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.memory_child:
        before = _rss_mib()
        variant = Variant(args.memory_child, args)
        variant.fit(epochs=2)
        print(_rss_mib() - before)
        variant.close()
        return
    speed = measure_speed(args)
    memory = measure_memory(args)
    result = {"config": {"rounds": args.rounds, "steps": args.steps, "jit": args.jit,
                         "steps_per_execution": args.steps_per_execution, "cpus": os.cpu_count()},
              "speed": speed,
              "rss_growth_mib": {k: round(v, 1) for k, v in memory.items()},
              "rss_growth_ratio": {k: round(v / memory.get("plain", v), 3) for k, v in memory.items()}}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
