"""Cost of computing the learning rate in the graph: lrctl's ControllableSchedule against the
Keras class it stands in for, side by side in one run.

    python bench/bench_schedule.py [--evals 2000] [--repeats 7] [--jit-compile] [--baseline FILE]

Each measurement is one `tf.function` running a `tf.while_loop` of `--evals` dependent
evaluations (each at the next step), so it reports latency per evaluation, which is what a
training step pays, rather than throughput of evaluations run in parallel. The loop's own
cost is measured too (`loop_only`) and subtracted. `--jit-compile` compiles the loop with XLA
(use more `--evals` there: an evaluation costs nanoseconds). `--baseline` measures another
engine.py's ControllableSchedule alongside, in the same conditions (e.g. an earlier commit's:
`git show COMMIT:service/lrctl/service/schedules/engine.py > /tmp/engine_before.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from lrctl.service.schedules.engine import ControllableSchedule

S = keras.optimizers.schedules
KINDS: dict[str, Any] = {
    "ExponentialDecay": S.ExponentialDecay(0.001, 10, 0.96, staircase=True),
    "PiecewiseConstantDecay": S.PiecewiseConstantDecay([100, 200, 300], [0.1, 0.01, 0.001, 0.0001]),
    "PolynomialDecay": S.PolynomialDecay(0.1, 1000, 0.001, power=2.0, cycle=True),
    "InverseTimeDecay": S.InverseTimeDecay(0.1, 100, 0.5),
    "CosineDecay": S.CosineDecay(0.0, 1000, alpha=0.1, warmup_target=0.1, warmup_steps=100),
    "CosineDecayRestarts": S.CosineDecayRestarts(0.1, 100),
}


def latency_us(schedule: Callable[[Any], Any], evals: int, repeats: int, jit_compile: bool = False) -> float:
    """Median microseconds per evaluation of `schedule(step)` in a dependent chain."""
    start_step = tf.Variable(1000, dtype=tf.int64)

    @tf.function(jit_compile=jit_compile or None)
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


def _load_engine(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_engine", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ControllableSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jit-compile", action="store_true", help="compile the loop with XLA")
    parser.add_argument("--baseline", help="an engine.py to measure alongside (as baseline_us)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    baseline = _load_engine(args.baseline) if args.baseline else None
    digits = 3 if args.jit_compile else 1

    def measure(schedule: Callable[[Any], Any]) -> float:
        return latency_us(schedule, args.evals, args.repeats, args.jit_compile)

    loop = measure(lambda step: tf.zeros([]))
    rows = {}
    for name, keras_schedule in KINDS.items():
        keras_us = measure(keras_schedule) - loop
        lrctl_us = measure(ControllableSchedule(keras_schedule)) - loop
        rows[name] = {"keras_us": round(keras_us, digits), "lrctl_us": round(lrctl_us, digits),
                      "extra_us": round(lrctl_us - keras_us, digits)}
        if baseline is not None:
            rows[name]["baseline_us"] = round(measure(baseline(keras_schedule)) - loop, digits)
    result = {"jit_compile": args.jit_compile, "loop_only_us": round(loop, digits), "per_evaluation": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
