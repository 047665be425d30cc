"""Training-thread time per applied change, and retraces, against retracing the train step.

    python bench/swap.py [--changes 60] [--quick]
    python bench/swap.py --baseline REF [--changes 300] [--rounds 20] [--quick]

In one process: the seed model trains in a custom loop (`train_on_batch`) with lrctl and its
server. For each change (set, scale, swap in turn), a gRPC client queues it, and the step
boundary that applies it is timed on the training thread, minus the median idle boundary.
Retraces are counted by the loss function's Python body, which runs only when the train
step is traced. The reference is the way without lrctl: assign a new learning rate and
rebuild the train function (`make_train_function(force=True)`), timed over its first step
minus a median plain step.

The last line is JSON with `retraces` (traces of the train step after warm-up, over all
changes) and `ms_per_change` (median; by kind in `ms_per_change_by_kind`).

`--baseline REF` measures instead this checkout's lrctl (new) against REF's (baseline), in one
run: one child process per side (this same script and venv, REF's `git archive` first on the
baseline's PYTHONPATH: bench/_baseline.py), both set up at once, then taking turns in rounds
A B, B A, ... (the waiting one blocks on its stdin, idle). A round is 20 idle boundaries (the
round's idle median is subtracted) then `--changes / --rounds` changes, set, scale and swap in
turn. JSON: `sides.{new,baseline}.ms_per_change` (median with a distribution-free 95% CI, p90,
by kind, retraces) and `new_over_baseline` (the median over rounds of each round's ratio of
medians, with its CI); `target_median_lt_1_ms`, `target_p90_lt_1_5_ms` for the new side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


class Turns:
    """The worker side of `--baseline`: the model, lrctl and its server, set up once; each
    `round` line on stdin runs one round and answers one JSON line (after `ROUND`)."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y
        self.model = _model()
        self.control = TrainingControl(self.model.optimizer)

    def step(self) -> None:
        self.model.train_on_batch(self.x[:BATCH], self.y[:BATCH])

    def serve(self) -> None:
        import lrctl.service
        print("LRCTL", lrctl.service.__file__, flush=True)
        kinds = ("set", "scale", "swap")
        control = self.control
        with serve(control.controller, "127.0.0.1:0") as (_, port), control.training(), \
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TrainingControlServiceStub(channel)
            for i in range(8):  # warm-up: trace, and changes of each kind
                method, request = _request(kinds[i % 3], i)
                getattr(stub, method)(request, timeout=30)
                control.step_boundary()
                self.step()
            traces_before, done = TRACES[0], 0
            print("READY", flush=True)
            for line in sys.stdin:
                if line.split()[:1] != ["round"]:
                    break
                count = int(line.split()[1])
                idle = []
                for _ in range(20):
                    begin = time.perf_counter()
                    control.step_boundary()
                    idle.append(time.perf_counter() - begin)
                    self.step()
                idle_s = statistics.median(idle)
                times: list[tuple[str, float]] = []
                for _ in range(count):
                    kind = kinds[done % 3]
                    method, request = _request(kind, done)
                    getattr(stub, method)(request, timeout=30)
                    begin = time.perf_counter()
                    applied = len(control.step_boundary())
                    elapsed = time.perf_counter() - begin - idle_s
                    if applied != 1:
                        raise RuntimeError(f"a {kind} change did not apply at its boundary")
                    times.append((kind, elapsed))
                    done += 1
                    self.step()
                print("ROUND", json.dumps({"times": times, "idle_s": idle_s,
                                           "retraces": TRACES[0] - traces_before}), flush=True)


class Worker:
    """A `--worker` child of one side (its lrctl from `lrctl_root`, None: this venv's)."""

    def __init__(self, lrctl_root: str | None) -> None:
        from _common import HERE as bench_dir
        from _common import _venv_lrctl_service
        env = dict(os.environ)
        if lrctl_root is not None:
            paths = [os.path.join(lrctl_root, "service"), os.path.join(lrctl_root, "client")]
            env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
            expected = os.path.join(lrctl_root, "service", "lrctl", "service")
        else:
            expected = _venv_lrctl_service()
        self.proc = subprocess.Popen([sys.executable, os.path.join(bench_dir, "swap.py"), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.expected = expected
        self.lrctl_file = ""

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"swap worker ended before saying {word}")
            if line.split()[:1] == [word]:
                return line[len(word):].strip()

    def wait_ready(self) -> None:
        self.lrctl_file = self._expect("LRCTL")
        if os.path.dirname(os.path.realpath(self.lrctl_file)) != os.path.realpath(self.expected):
            raise RuntimeError(f"swap worker imported {self.lrctl_file}, not the lrctl in {self.expected}")
        self._expect("READY")

    def round(self, count: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"round {count}\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._expect("ROUND")))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure_sides(args: argparse.Namespace) -> dict[str, Any]:
    from _baseline import materialize, working_tree
    from _common import median_ci, paired_ratios, percentile
    sha, root = materialize(args.baseline)
    sources = {"new": {"ref": "working tree", **working_tree()},
               "baseline": {"ref": args.baseline, "sha": sha}}
    workers = {"new": Worker(None), "baseline": Worker(root)}
    try:
        for worker in workers.values():
            worker.wait_ready()
        per_round = max(3, args.changes // args.rounds)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
        names = list(workers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                rounds[name].append(workers[name].round(per_round))
    finally:
        for worker in workers.values():
            worker.close()
    result: dict[str, Any] = {"sides": {}}
    medians: dict[str, list[float]] = {}
    for name, results in rounds.items():
        pooled = [t * 1e3 for r in results for _, t in r["times"]]
        by_kind: dict[str, list[float]] = {}
        for r in results:
            for kind, t in r["times"]:
                by_kind.setdefault(kind, []).append(t * 1e3)
        medians[name] = [statistics.median(t for _, t in r["times"]) for r in results]
        result["sides"][name] = {
            "source": {**sources[name], "lrctl": workers[name].lrctl_file},
            "ms_per_change": median_ci(pooled, digits=3),
            "ms_per_change_p90": round(percentile(pooled, 90), 3),
            "ms_per_change_by_kind": {k: round(statistics.median(v), 3) for k, v in by_kind.items()},
            "idle_boundary_ms": round(statistics.median(r["idle_s"] for r in results) * 1e3, 4),
            "retraces": results[-1]["retraces"] if results else None,
        }
    result["new_over_baseline"] = {"ms_per_change": paired_ratios(medians["new"], medians["baseline"])}
    new = result["sides"]["new"]
    result["target_median_lt_1_ms"] = new["ms_per_change"]["median"] < 1.0
    result["target_p90_lt_1_5_ms"] = new["ms_per_change_p90"] < 1.5
    return result


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
    parser.add_argument("--baseline", metavar="REF", help="measure this checkout against the lrctl of git REF")
    parser.add_argument("--rounds", type=int, default=20, help="with --baseline: turns of each side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one side's child
    args = parser.parse_args()
    if args.worker:
        Turns(*seed_data(8)).serve()
        return
    if args.baseline:
        if args.quick:
            args.changes, args.rounds = min(args.changes, 12), min(args.rounds, 2)
        result = measure_sides(args)
        result["config"] = {"changes": args.changes, "rounds": args.rounds, "quick": args.quick,
                            "cpus": os.cpu_count()}
        emit(result)
        return
    if args.quick:
        args.changes, args.retrace_changes = min(args.changes, 9), min(args.retrace_changes, 3)
    x, y = seed_data(8)
    lrctl = measure_lrctl(args, x, y)
    retrace = measure_retrace(args, x, y)
    emit({**lrctl, "force_retrace": retrace,
          "config": {"changes": args.changes, "quick": args.quick, "cpus": os.cpu_count()}})


if __name__ == "__main__":
    main()
