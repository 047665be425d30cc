"""Cost of computing the learning rate in the graph: lrctl's ControllableSchedule against the
Keras class it stands in for, side by side in one run.

    python bench/bench_schedule.py [--evals 2000] [--repeats 7]

Each measurement is one `tf.function` running a `tf.while_loop` of `--evals` dependent
evaluations (each at the next step), so it reports latency per evaluation, which is what a
training step pays, rather than throughput of evaluations run in parallel. The loop's own
cost is measured too (`loop_only`) and subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from lrctl.service.engine import ControllableSchedule

S = keras.optimizers.schedules
KINDS: dict[str, Any] = {
    "ExponentialDecay": S.ExponentialDecay(0.001, 10, 0.96, staircase=True),
    "PiecewiseConstantDecay": S.PiecewiseConstantDecay([100, 200, 300], [0.1, 0.01, 0.001, 0.0001]),
    "PolynomialDecay": S.PolynomialDecay(0.1, 1000, 0.001, power=2.0, cycle=True),
    "InverseTimeDecay": S.InverseTimeDecay(0.1, 100, 0.5),
    "CosineDecay": S.CosineDecay(0.0, 1000, alpha=0.1, warmup_target=0.1, warmup_steps=100),
    "CosineDecayRestarts": S.CosineDecayRestarts(0.1, 100),
}


def latency_us(schedule: Callable[[Any], Any], evals: int, repeats: int) -> float:
    """Median microseconds per evaluation of `schedule(step)` in a dependent chain."""
    start_step = tf.Variable(1000, dtype=tf.int64)

    @tf.function
    def run() -> Any:
        def body(i: Any, acc: Any) -> tuple[Any, Any]:
            return i + 1, acc + tf.cast(schedule(start_step + tf.cast(i, tf.int64)), tf.float32)

        return tf.while_loop(lambda i, _: i < evals, body, (tf.constant(0), tf.constant(0.0)))[1]

    run()  # trace
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) / evals * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    loop = latency_us(lambda step: tf.zeros([]), args.evals, args.repeats)
    rows = {}
    for name, keras_schedule in KINDS.items():
        keras_us = latency_us(keras_schedule, args.evals, args.repeats) - loop
        lrctl_us = latency_us(ControllableSchedule(keras_schedule), args.evals, args.repeats) - loop
        rows[name] = {"keras_us": round(keras_us, 1), "lrctl_us": round(lrctl_us, 1),
                      "extra_us": round(lrctl_us - keras_us, 1)}
    result = {"loop_only_us": round(loop, 1), "per_evaluation": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
