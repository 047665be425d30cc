"""Training-thread time per applied change, and retraces, against retracing the train step.

    python bench/swap.py [--changes 60] [--quick]

In one process: the seed model trains in a custom loop (`train_on_batch`) with lrctl and its
server. For each change (set, scale, swap in turn), a gRPC client queues it, and the step
boundary that applies it is timed on the training thread, minus the median idle boundary.
Retraces are counted by the loss function's Python body, which runs only when the train
step is traced. The reference is the way without lrctl: assign a new learning rate and
rebuild the train function (`make_train_function(force=True)`), timed over its first step
minus a median plain step.

The last line is JSON with `retraces` (traces of the train step after warm-up, over all
changes) and `ms_per_change` (median; by kind in `ms_per_change_by_kind`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import keras
from _common import BATCH, emit, seed_data, seed_model

from lrctl.client.schedules import to_schedule
from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

TRACES = [0]


def counting_loss(y_true: Any, y_pred: Any) -> Any:
    TRACES[0] += 1  # Python: runs at trace time only
    return keras.losses.categorical_crossentropy(y_true, y_pred)


def _model() -> Any:
    model = seed_model()
    model.compile(optimizer=model.optimizer, loss=counting_loss)
    return model


def _request(kind: str, i: int) -> tuple[str, Any]:
    if kind == "set":
        return "SetLearningRate", pb.SetLearningRateRequest(learning_rate=0.001 * (1 + i % 3))
    if kind == "scale":
        return "SetLearningRate", pb.SetLearningRateRequest(scale=1.0 + 0.01 * (i % 2))
    schedules = (keras.optimizers.schedules.ExponentialDecay(0.001, 10, 0.96),
                 keras.optimizers.schedules.CosineDecay(0.001, 1000),
                 keras.optimizers.schedules.PiecewiseConstantDecay([100, 200], [0.001, 0.0005, 0.0001]))
    return "SwapSchedule", pb.SwapScheduleRequest(schedule=to_schedule(schedules[i % len(schedules)]))


def measure_lrctl(args: argparse.Namespace, x: Any, y: Any) -> dict[str, Any]:
    model = _model()
    control = TrainingControl(model.optimizer)
    kinds = ("set", "scale", "swap")
    per_kind: dict[str, list[float]] = {k: [] for k in kinds}
    with serve(control.controller, "127.0.0.1:0") as (_, port), control.training(), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)
        for i in range(5):  # warm-up: trace, and one change of each kind
            control.step_boundary()
            model.train_on_batch(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
        for i, kind in enumerate(kinds):
            method, request = _request(kind, i)
            getattr(stub, method)(request, timeout=30)
            control.step_boundary()
            model.train_on_batch(x[:BATCH], y[:BATCH])
        traces_before = TRACES[0]
        idle = []
        for i in range(args.changes * 2):
            begin = time.perf_counter()
            control.step_boundary()
            idle.append(time.perf_counter() - begin)
            model.train_on_batch(x[:BATCH], y[:BATCH])
        idle_s = statistics.median(idle)
        applied = 0
        for i in range(args.changes):
            kind = kinds[i % 3]
            method, request = _request(kind, i)
            getattr(stub, method)(request, timeout=30)
            begin = time.perf_counter()
            applied += len(control.step_boundary())
            per_kind[kind].append(time.perf_counter() - begin - idle_s)
            model.train_on_batch(x[:BATCH], y[:BATCH])
        retraces = TRACES[0] - traces_before
    all_ms = [t * 1e3 for v in per_kind.values() for t in v]
    return {"retraces": retraces, "applied": applied, "changes": args.changes,
            "ms_per_change": round(statistics.median(all_ms), 3),
            "ms_per_change_p90": round(sorted(all_ms)[int(0.9 * (len(all_ms) - 1))], 3),
            "ms_per_change_by_kind": {k: round(statistics.median(v) * 1e3, 3) for k, v in per_kind.items()},
            "idle_boundary_ms": round(idle_s * 1e3, 4)}


def measure_retrace(args: argparse.Namespace, x: Any, y: Any) -> dict[str, Any]:
    model = _model()
    for _ in range(5):
        model.train_on_batch(x[:BATCH], y[:BATCH])
    steps = []
    for _ in range(20):
        begin = time.perf_counter()
        model.train_on_batch(x[:BATCH], y[:BATCH])
        steps.append(time.perf_counter() - begin)
    step_s = statistics.median(steps)
    traces_before = TRACES[0]
    times = []
    for i in range(args.retrace_changes):
        begin = time.perf_counter()
        model.optimizer.learning_rate.assign(0.001 * (1 + i % 3))
        model.make_train_function(force=True)
        model.train_on_batch(x[:BATCH], y[:BATCH])
        times.append(time.perf_counter() - begin - step_s)
    return {"retraces": TRACES[0] - traces_before, "ms_per_change": round(statistics.median(times) * 1e3, 3),
            "changes": args.retrace_changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=60)
    parser.add_argument("--retrace-changes", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    args = parser.parse_args()
    if args.quick:
        args.changes, args.retrace_changes = min(args.changes, 9), min(args.retrace_changes, 3)
    x, y = seed_data(8)
    lrctl = measure_lrctl(args, x, y)
    retrace = measure_retrace(args, x, y)
    emit({**lrctl, "force_retrace": retrace,
          "config": {"changes": args.changes, "quick": args.quick, "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()
