"""RPC latency against the gRPC floor, in one run, from one client.

    python bench/latency.py [--calls 2000] [--quick]
    python bench/latency.py --baseline 48d26fa [--calls 2000] [--waits 200] [--quick]

A child process trains the seed model with lrctl and also serves a raw grpcio echo (a
generic handler returning a pre-serialized GetState response of the same size). This
process alternates calls (A B A B ...) to both, so drift hits each alike, and reports p50/p99
of: GetState, the echo (the floor), SetLearningRate (scale 1.0) without and with
`wait_until_applied`, and the WatchState delivery delay (from sending a change to the
stream delivering the state with its version). Both sides deserialize a GetStateResponse.

The last line is JSON with `get_state_p50_ratio` (GetState p50 over the echo's p50).

`--wal` measures instead SetLearningRate (scale 1.0, no wait) against two trainers, one
without and one with a checkpoint folder (hence the write-ahead log's fsync before each
answer), calls alternating: `set_learning_rate` and `set_learning_rate_wal`, p50/p99.

`--baseline REF` measures instead this checkout's server (new) against REF's (baseline, e.g.
48d26fa), side by side in one run (bench/_baseline.py: both trainer children from this venv,
taking turns to train, rounds A B then B A ...). Each side first applies `--history` changes
(so that the whole state carries that many recent changes), then its echo is resized to its
GetState answer. Per side:
  get_state, echo          GetState (new: view BASIC; baseline: no view, the whole state)
                           against the raw grpcio echo of the same response size, pairs
                           alternating; `get_state_over_echo` is the median over rounds of each
                           round's p50 ratio (target for the new side: <= 1.15)
  wait_change              new: submit a change with `apply_after_steps`, then WaitChange
  wait_until_applied       both: the submit itself waits (`wait_until_applied`)
  poll_list_changes        baseline: submit, then poll ListChanges every 50 ms (the old
                           client's wait_change)
The three are the delay from the change's `applied_time` (stamped by the training thread as it
decides the change, before loading it: same machine, same clock) to the moment the answer is
back in this client; a wait that began after the change applied is counted in `late`, not
timed. Durations are medians in ms with a distribution-free 95% CI (order statistics) and p99;
`new_over_baseline` holds the medians over rounds of the per-round ratios new/baseline, with
their CIs. The last line is JSON with `get_state_basic_over_echo` and `new_over_baseline`.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc
from _baseline import Side, open_sides
from _common import (
    ECHO_METHOD,
    TrainerProcess,
    emit,
    median_ci,
    p50_p99_ms,
    paired_ratios,
    percentile,
)
from google.protobuf.duration_pb2 import Duration

from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

POLL_S = 0.05  # the old client's wait_change: ListChanges every 50 ms


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with TrainerProcess() as trainer, grpc.insecure_channel(trainer.target) as channel, \
            grpc.insecure_channel(f"127.0.0.1:{trainer.echo_port}") as echo_channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)
        get_state = channel.unary_unary(
            "/lrctl.v1.TrainingControlService/GetState",
            request_serializer=pb.GetStateRequest.SerializeToString,
            response_deserializer=pb.GetStateResponse.FromString)
        echo = echo_channel.unary_unary(ECHO_METHOD, request_serializer=pb.GetStateRequest.SerializeToString,
                                        response_deserializer=pb.GetStateResponse.FromString)
        request = pb.GetStateRequest()
        size = get_state(request, timeout=30).ByteSize()
        echo_size = echo(request, timeout=30).ByteSize()
        for _ in range(20):  # warm both channels
            get_state(request, timeout=30)
            echo(request, timeout=30)
        times: dict[str, list[float]] = {"get_state": [], "echo": []}
        for i in range(args.calls):
            pair = (("get_state", get_state), ("echo", echo))
            for name, call in pair if i % 2 == 0 else pair[::-1]:
                begin = time.perf_counter()
                call(request, timeout=30)
                times[name].append(time.perf_counter() - begin)

        writes: dict[str, list[float]] = {"set_no_wait": [], "set_wait": []}
        for i in range(args.writes):
            for wait in (False, True) if i % 2 == 0 else (True, False):
                begin = time.perf_counter()
                stub.SetLearningRate(pb.SetLearningRateRequest(scale=1.0, wait_until_applied=wait),
                                     timeout=30)
                writes["set_wait" if wait else "set_no_wait"].append(time.perf_counter() - begin)

        # WatchState delivery: time from sending a change to the stream carrying its version.
        arrivals: dict[int, float] = {}
        ready = threading.Event()
        watch = channel.unary_stream(
            "/lrctl.v1.TrainingControlService/WatchState",
            request_serializer=pb.WatchStateRequest.SerializeToString,
            response_deserializer=pb.WatchStateResponse.FromString)
        watch_request = pb.WatchStateRequest()
        watch_request.min_interval.FromSeconds(3600)
        stream = watch(watch_request, timeout=600)

        def consume() -> None:
            try:
                for response in stream:
                    arrivals.setdefault(response.state.version, time.perf_counter())
                    ready.set()
            except Exception:  # noqa: BLE001 -- the stream is cancelled at the end
                ready.set()

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        ready.wait(30)
        delays = []
        for _ in range(args.watches):
            begin = time.perf_counter()
            version = stub.SetLearningRate(pb.SetLearningRateRequest(scale=1.0, wait_until_applied=True),
                                           timeout=30).change.version
            deadline = time.monotonic() + 10
            while version not in arrivals and time.monotonic() < deadline:
                time.sleep(0.0002)
            if version in arrivals:
                delays.append(arrivals[version] - begin)
        stream.cancel()
        step_a, t_a = get_state(request, timeout=30).state.step, time.perf_counter()
        time.sleep(0.3)
        step_b, t_b = get_state(request, timeout=30).state.step, time.perf_counter()
        step_ms = (t_b - t_a) * 1e3 / max(1, step_b - step_a)
    stats = {name: p50_p99_ms(s) for name, s in {**times, **writes, "watch_delivery": delays}.items()}
    return {
        "get_state_p50_ratio": round(stats["get_state"]["p50_ms"] / stats["echo"]["p50_ms"], 3),
        "get_state_p99_ratio": round(stats["get_state"]["p99_ms"] / stats["echo"]["p99_ms"], 3),
        "get_state": stats["get_state"], "echo": stats["echo"],
        "set_learning_rate": stats["set_no_wait"], "set_learning_rate_wait": stats["set_wait"],
        "watch_delivery": stats["watch_delivery"], "step_ms": round(step_ms, 3),
        "response_bytes": size, "echo_bytes": echo_size,
    }


def measure_wal(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder, TrainerProcess() as plain, \
            TrainerProcess(checkpoint_dir=folder) as durable, \
            grpc.insecure_channel(plain.target) as a, grpc.insecure_channel(durable.target) as b:
        stubs = {"set_learning_rate": pb_grpc.TrainingControlServiceStub(a),
                 "set_learning_rate_wal": pb_grpc.TrainingControlServiceStub(b)}
        times: dict[str, list[float]] = {name: [] for name in stubs}
        request = pb.SetLearningRateRequest(scale=1.0)
        for _ in range(10):  # warm both channels
            for stub in stubs.values():
                stub.SetLearningRate(request, timeout=30)
        for i in range(args.writes):
            pair = list(stubs.items())
            for name, stub in pair if i % 2 == 0 else pair[::-1]:
                begin = time.perf_counter()
                stub.SetLearningRate(request, timeout=30)
                times[name].append(time.perf_counter() - begin)
        return {name: p50_p99_ms(s) for name, s in times.items()}


# -- --baseline: the new server beside the previous one ------------------------------------------
Samples = dict[str, dict[str, list[list[float]]]]  # side -> measure -> one list per round


def _state_calls(side: Side) -> tuple[Callable[..., Any], Callable[..., Any], pb.GetStateRequest]:
    """(GetState, the echo, the request): both answers deserialized as a GetStateResponse."""
    get_state = side.channel.unary_unary(
        "/lrctl.v1.TrainingControlService/GetState", request_serializer=pb.GetStateRequest.SerializeToString,
        response_deserializer=pb.GetStateResponse.FromString)
    echo = side.echo_channel.unary_unary(
        ECHO_METHOD, request_serializer=pb.GetStateRequest.SerializeToString,
        response_deserializer=pb.GetStateResponse.FromString)
    return get_state, echo, pb.GetStateRequest(view=side.state_view)  # type: ignore[arg-type]


def _boundary_delay(change: pb.Change, began: float, back: float) -> float | None:
    """Seconds from `change`'s applied_time to `back`; None if it applied before `began`."""
    if change.status != pb.CHANGE_STATUS_APPLIED:
        raise RuntimeError(f"change {change.name or change.request_id} ended {pb.ChangeStatus.Name(change.status)}")
    applied = change.applied_time.ToNanoseconds() / 1e9
    return None if applied < began else back - applied


def _change(after_steps: int, **fields: Any) -> pb.SetLearningRateRequest:
    return pb.SetLearningRateRequest(scale=1.0, apply_after_steps=after_steps, request_id=str(uuid.uuid4()),
                                     **fields)


def _wait_change(stub: Any, after_steps: int) -> float | None:
    name = stub.SetLearningRate(_change(after_steps), timeout=30).change.name
    began = time.time()
    answer = stub.WaitChange(pb.WaitChangeRequest(name=name, timeout=Duration(seconds=30)), timeout=60)
    return _boundary_delay(answer.change, began, time.time())


def _wait_until_applied(stub: Any, after_steps: int) -> float | None:
    began = time.time()
    change = stub.SetLearningRate(_change(after_steps, wait_until_applied=True), timeout=60).change
    return _boundary_delay(change, began, time.time())


def _poll_list_changes(stub: Any, after_steps: int) -> float | None:
    request = _change(after_steps)
    stub.SetLearningRate(request, timeout=30)
    began = time.time()
    while True:  # as the old client's wait_change: the newest page, then sleep while pending
        page = stub.ListChanges(pb.ListChangesRequest(page_size=100), timeout=30)
        change = next(c for c in page.changes if c.request_id == request.request_id)
        if change.status != pb.CHANGE_STATUS_PENDING:
            return _boundary_delay(change, began, time.time())
        time.sleep(POLL_S)


WAITS: dict[str, Callable[[Any, int], float | None]] = {
    "wait_change": _wait_change, "wait_until_applied": _wait_until_applied,
    "poll_list_changes": _poll_list_changes}


def _waits(side: Side) -> list[str]:
    return ["wait_change", "wait_until_applied"] if side.new_api else ["wait_until_applied", "poll_list_changes"]


def _summary(rounds: list[list[float]]) -> dict[str, Any]:
    """Median (ms) with its 95% CI over all samples, and p99."""
    pooled = [s * 1e3 for r in rounds for s in r]
    summary = median_ci(pooled, digits=3)
    return {"median_ms": summary["median"], "ci95_ms": summary["ci95"], "p99_ms": round(percentile(pooled, 99), 3),
            "n": summary["n"]}


def _round_medians(rounds: list[list[float]]) -> list[float]:
    return [statistics.median(r) if r else float("nan") for r in rounds]


def measure_sides(args: argparse.Namespace) -> dict[str, Any]:
    samples: Samples = {}
    step_s: dict[str, list[float]] = {"new": [], "baseline": []}  # seconds per step, per round
    late: dict[str, dict[str, int]] = {}
    result: dict[str, Any] = {"sides": {}}
    with open_sides(args.baseline, args.candidate) as sides:
        calls = {side.name: _state_calls(side) for side in sides.all}
        sides.give_history(args.history)
        for side in sides.all:
            sides.turn(side)
            get_state, echo, request = calls[side.name]
            echo_bytes = side.trainer.resize_echo()
            for _ in range(20):  # warm both channels
                get_state(request, timeout=30)
                echo(request, timeout=30)
            result["sides"][side.name] = {
                "source": side.source, "response_bytes": get_state(request, timeout=30).ByteSize(),
                "echo_bytes": echo_bytes}
            samples[side.name] = {name: [] for name in ("get_state", "echo", "set_learning_rate", "echo_set",
                                                        "set_wait", *_waits(side))}
            late[side.name] = dict.fromkeys(_waits(side), 0)

        per_round = max(1, args.calls // args.rounds)
        for _, side in sides.rounds(args.rounds):
            get_state, echo, request = calls[side.name]
            times: dict[str, list[float]] = {"get_state": [], "echo": []}
            for i in range(per_round):
                pair = (("get_state", get_state), ("echo", echo))
                for name, call in pair if i % 2 == 0 else pair[::-1]:
                    begin = time.perf_counter()
                    call(request, timeout=30)
                    times[name].append(time.perf_counter() - begin)
            for name, values in times.items():
                samples[side.name][name].append(values)

        per_round = max(1, args.writes // args.rounds)
        scale_1 = pb.SetLearningRateRequest(scale=1.0)
        wait_1 = pb.SetLearningRateRequest(scale=1.0, wait_until_applied=True)
        for r, side in sides.rounds(args.rounds):
            stub = pb_grpc.TrainingControlServiceStub(side.channel)
            _, echo, request = calls[side.name]
            times: dict[str, list[float]] = {"set_learning_rate": [], "echo_set": [], "set_wait": []}
            steps_before, at_before = side.trainer.steps()
            pair = (("set_learning_rate", functools.partial(stub.SetLearningRate, scale_1, timeout=30)),
                    ("echo_set", functools.partial(echo, request, timeout=30)))
            for i in range(per_round):
                for name, call in pair if (i + r) % 2 == 0 else pair[::-1]:
                    begin = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - begin)
                begin = time.perf_counter()
                stub.SetLearningRate(wait_1, timeout=30)
                times["set_wait"].append(time.perf_counter() - begin)
            steps_after, at_after = side.trainer.steps()
            for name, values in times.items():
                samples[side.name][name].append(values)
            step_s[side.name].append((at_after - at_before) / max(1, steps_after - steps_before))

        per_round = max(1, args.waits // args.rounds)
        for _, side in sides.rounds(args.rounds):
            stub = pb_grpc.TrainingControlServiceStub(side.channel)
            for name in _waits(side):
                delays = [WAITS[name](stub, args.after_steps) for _ in range(per_round)]
                samples[side.name][name].append([d for d in delays if d is not None])
                late[side.name][name] += sum(d is None for d in delays)

    medians = {name: {measure: _round_medians(rounds) for measure, rounds in measures.items()}
               for name, measures in samples.items()}  # side -> measure -> one median per round
    for name, measures in samples.items():
        side_result = result["sides"][name]
        side_result.update({measure: _summary(rounds) for measure, rounds in measures.items()})
        side_result["get_state_over_echo"] = paired_ratios(medians[name]["get_state"], medians[name]["echo"])
        side_result["late"] = late[name]
        # Issue 20: SetLearningRate (scale 1.0, no wait) against the echo in the same round, and
        # the submit that waits (`wait_until_applied`) against one step plus the echo.
        side_result["set_learning_rate_over_echo"] = paired_ratios(medians[name]["set_learning_rate"],
                                                                   medians[name]["echo_set"])
        side_result["step_ms"] = median_ci([t * 1e3 for t in step_s[name]], digits=3)
        side_result["set_wait_over_step_plus_echo"] = paired_ratios(
            medians[name]["set_wait"], [a + b for a, b in zip(step_s[name], medians[name]["echo_set"], strict=True)])
    new, old = medians["new"], medians["baseline"]

    def over_echo(side: dict[str, list[float]]) -> list[float]:
        return [a / b for a, b in zip(side["get_state"], side["echo"], strict=True)]

    result["new_over_baseline"] = {
        "get_state": paired_ratios(new["get_state"], old["get_state"]),
        "get_state_over_echo": paired_ratios(over_echo(new), over_echo(old)),
        "wait_change_over_wait_until_applied": paired_ratios(new["wait_change"], old["wait_until_applied"]),
        "wait_change_over_poll_list_changes": paired_ratios(new["wait_change"], old["poll_list_changes"]),
        "wait_until_applied": paired_ratios(new["wait_until_applied"], old["wait_until_applied"]),
        "set_learning_rate": paired_ratios(new["set_learning_rate"], old["set_learning_rate"]),
        "set_wait": paired_ratios(new["set_wait"], old["set_wait"]),
    }
    set_ratio = result["sides"]["new"]["set_learning_rate_over_echo"]["median"]
    result["target_set_learning_rate_le_1_5_echo"] = set_ratio <= 1.5
    result["target_set_wait_le_step_plus_echo"] = result["sides"]["new"]["set_wait_over_step_plus_echo"]["median"] <= 1.0
    basic = result["sides"]["new"]["get_state_over_echo"]["median"]
    result["get_state_basic_over_echo"] = basic
    result["target_get_state_basic_le_1_15"] = basic <= 1.15
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="GetState/echo pairs (with --baseline: per side)")
    parser.add_argument("--writes", type=int, default=200,
                        help="SetLearningRate pairs (no wait, wait; with --baseline: (set, echo) pairs and a wait)")
    parser.add_argument("--watches", type=int, default=100, help="changes timed through WatchState")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    parser.add_argument("--wal", action="store_true",
                        help="SetLearningRate without and with a checkpoint folder (its write-ahead log)")
    sides = parser.add_argument_group("new against baseline (--baseline)")
    sides.add_argument("--baseline", metavar="REF", help="measure this checkout against the lrctl of git REF")
    sides.add_argument("--candidate", metavar="REF", help="the new side from git REF instead of this checkout")
    sides.add_argument("--rounds", type=int, default=20, help="turns of each side (calls and waits split over them)")
    sides.add_argument("--waits", type=int, default=200, help="changes timed boundary -> client, per way and side")
    sides.add_argument("--history", type=int, default=10, help="changes applied on each side before measuring")
    sides.add_argument("--after-steps", type=int, default=10, help="apply_after_steps of each timed change")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.writes, args.watches = min(args.calls, 200), min(args.writes, 20), min(args.watches, 10)
        args.rounds, args.waits, args.history = min(args.rounds, 2), min(args.waits, 4), min(args.history, 2)
    if args.baseline:
        result = measure_sides(args)
    else:
        result = measure_wal(args) if args.wal else measure(args)
    result["config"] = {"calls": args.calls, "writes": args.writes, "watches": args.watches,
                        "quick": args.quick, "cpus": os.cpu_count()}
    if args.baseline:
        result["config"].update(rounds=args.rounds, waits=args.waits, history=args.history,
                                after_steps=args.after_steps)
    emit(result)


if __name__ == "__main__":
    main()
