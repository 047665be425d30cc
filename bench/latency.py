"""RPC latency against the gRPC floor, in one run, from one client.

    python bench/latency.py [--calls 2000] [--quick]

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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc
from _common import ECHO_METHOD, TrainerProcess, emit, p50_p99_ms

from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="GetState/echo pairs")
    parser.add_argument("--writes", type=int, default=200, help="SetLearningRate pairs (no wait, wait)")
    parser.add_argument("--watches", type=int, default=100, help="changes timed through WatchState")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    parser.add_argument("--wal", action="store_true",
                        help="SetLearningRate without and with a checkpoint folder (its write-ahead log)")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.writes, args.watches = min(args.calls, 200), min(args.writes, 20), min(args.watches, 10)
    result = measure_wal(args) if args.wal else measure(args)
    result["config"] = {"calls": args.calls, "writes": args.writes, "watches": args.watches,
                        "quick": args.quick, "cpus": os.cpu_count()}
    emit(result)


if __name__ == "__main__":
    main()
