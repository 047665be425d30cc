"""Added cost per training step, in µs with a 95% confidence interval, of lrctl over plain `fit`.

    python bench/overhead.py [--modes graph jit spe8] [--rounds 200] [--target-ci-us 5] [--quick]

The process is pinned to one core and TensorFlow runs one intra- and one inter-op thread, so
the variants do not compete with each other's thread pools. Variants, all in this process,
interleaved round by round (A B A B ..., order rotated each round):
  plain            Adam(0.001)
  keras_schedule   Adam(ExponentialDecay(...)): Keras's own in-graph schedule
  lrctl_schedule   lrctl's ControllableSchedule attached, no callback
  callback_only    plain model; lrctl's callback (for a TrainingControl on an unused optimizer)
  lrctl_full       schedule, callback and server, no traffic
  assign_per_batch a callback assigning optimizer.learning_rate every batch (the naive peer)
Modes: graph (the default compile), jit (`jit_compile=True`), spe8 (`steps_per_execution=8`).
Each round times one `fit` of --steps steps per variant; the per-step difference to the same
round's plain run is one sample. Rounds continue until the 95% CI of lrctl_full's added cost
is narrower than --target-ci-us, or --rounds / --max-s run out.

The last line is JSON: `ratio` (lrctl_full steps/s over plain, median of paired rounds) and
`added_us_per_step` ({median, ci95, ci_width, mean, n}: the median of the paired per-round
differences, with a distribution-free 95% CI) for the first mode; all modes in `modes`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras
from _common import BATCH, emit, median_ci, seed_data, seed_model

from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve
from lrctl.service.training.attach import attach

VARIANTS = ("plain", "keras_schedule", "lrctl_schedule", "callback_only", "lrctl_full", "assign_per_batch")
MODES = {"graph": {}, "jit": {"jit": True}, "spe8": {"steps_per_execution": 8}}


class _AssignEveryBatch(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.model.optimizer.learning_rate.assign(0.001)


class Variant:
    def __init__(self, name: str, mode: dict[str, Any], x: Any, y: Any) -> None:
        lr: Any = 0.001
        if name == "keras_schedule":
            lr = keras.optimizers.schedules.ExponentialDecay(0.001, 10, 0.96, staircase=True)
        self.model = seed_model(lr, **mode)
        self.x, self.y = x, y
        self.callbacks: list[Any] = []
        self.stack = contextlib.ExitStack()
        if name == "lrctl_schedule":
            attach(self.model.optimizer)
        elif name == "callback_only":
            other = keras.optimizers.Adam(0.001)
            control = TrainingControl(other)
            self.callbacks.append(control.callback)
            self.stack.enter_context(control.training())
        elif name == "lrctl_full":
            control = TrainingControl(self.model.optimizer)
            self.callbacks.append(control.callback)
            self.stack.enter_context(control.training())
            self.stack.enter_context(serve(control.controller, "127.0.0.1:0"))
        elif name == "assign_per_batch":
            self.callbacks.append(_AssignEveryBatch())
        self.fit()  # warm-up: trace and compile outside the timed rounds

    def fit(self) -> float:
        begin = time.perf_counter()
        self.model.fit(self.x, self.y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False,
                       callbacks=self.callbacks)
        return time.perf_counter() - begin


def measure_mode(mode: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    x, y = seed_data(args.steps)
    variants = {name: Variant(name, mode, x, y) for name in args.variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    deadline = time.monotonic() + args.max_s
    rounds = 0
    while rounds < args.rounds and time.monotonic() < deadline:
        order = order[1:] + order[:1]  # rotate: no variant always follows the same one
        for name in order:
            seconds[name].append(variants[name].fit())
        rounds += 1
        if rounds >= args.min_rounds and "lrctl_full" in seconds:
            added = [(t - p) / args.steps * 1e6 for t, p in zip(seconds["lrctl_full"], seconds["plain"])]
            if median_ci(added)["ci_width"] < args.target_ci_us:
                break
    for variant in variants.values():
        variant.stack.close()
    base = seconds["plain"]
    out: dict[str, Any] = {"rounds": rounds}
    for name, s in seconds.items():
        out[name] = {"us_per_step": round(statistics.median(s) / args.steps * 1e6, 1),
                     "ratio": round(statistics.median(b / t for b, t in zip(base, s)), 4),
                     "added_us_per_step": median_ci([(t - b) / args.steps * 1e6 for t, b in zip(s, base)])}
    if "keras_schedule" in seconds and "lrctl_full" in seconds:
        out["added_us_over_keras_schedule"] = median_ci(
            [(t - k) / args.steps * 1e6 for t, k in zip(seconds["lrctl_full"], seconds["keras_schedule"])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=200, help="steps per timed fit")
    parser.add_argument("--rounds", type=int, default=400, help="at most this many rounds per mode")
    parser.add_argument("--min-rounds", type=int, default=20)
    parser.add_argument("--max-s", type=float, default=600.0, help="at most this long per mode")
    parser.add_argument("--target-ci-us", type=float, default=5.0, help="stop once the CI is this narrow")
    parser.add_argument("--quick", action="store_true", help="a small run (CI): graph mode, few rounds")
    args = parser.parse_args()
    for required in ("plain", "lrctl_full"):
        if required not in args.variants:
            args.variants.insert(0, required)
    if args.quick:
        args.modes, args.steps, args.rounds, args.min_rounds, args.max_s = args.modes[:1], 20, 3, 3, 20.0
    modes = {name: measure_mode(MODES[name], args) for name in args.modes}
    first = modes[args.modes[0]]
    emit({"ratio": first["lrctl_full"]["ratio"], "added_us_per_step": first["lrctl_full"]["added_us_per_step"],
          "mode": args.modes[0], "modes": modes,
          "config": {"steps": args.steps, "quick": args.quick, "affinity": sorted(os.sched_getaffinity(0)),
                     "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()
