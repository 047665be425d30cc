"""Training under a mixed RPC load, and whether every accepted change applied exactly once.

    python bench/load.py [--clients 32] [--phase-s 5] [--quick]
    python bench/load.py --baseline 48d26fa [--rounds 8] [--phase-s 4] [--quick]

A child process trains the seed model with lrctl. This process runs phases, each
`--phase-s` long, and reads the trainer's step count at each phase's start and end:
  none       no load (before and after the loaded phases; their mean is the baseline)
  busy       no RPC, a busy-loop process competing for the CPU (the contention control)
  rate_10    10 calls/s in all, from --clients threads
  rate_100   100 calls/s
  rate_max   as fast as the clients go (bounded by --max-calls and the phase length)
The mix: reads (GetState), a few WatchState streams held open, conflicting writes
(scale 1.0 with the `expected_version` last read: some lose with ABORTED), and retries (the
same SetLearningRate request, with the same `request_id`, sent twice).

Afterwards the server's change history is read in full. For every change a client saw
accepted (by request_id): `lost` counts those never applied, `duplicated` those applied more
than once; `out_of_order` counts applied changes whose versions or steps go backwards.
Traffic goes to 127.0.0.1 only. The last line is JSON with `lost`, `duplicated`, `ratio_100`.

`--baseline REF` measures instead this checkout's server (new) against REF's (baseline, e.g.
48d26fa), side by side in one run (bench/_baseline.py: both trainer children from this venv,
taking turns to train; rounds A B then B A ...), after `--history` changes applied on each
(so that the whole state carries that many recent changes). In each turn, every phase once
(`--phase-s` long after a 0.5 s ramp, a different phase first in each round):
  none        no load
  busy        a busy-loop process, no gRPC: what any competing process costs on this machine
  reads_100   100 GetState reads/s (new: view BASIC; baseline: no view) from one separate
              load-generator process (bench/_loadgen.py: paced, open loop)
  reads_1000  1,000 reads/s
Training steps/s is counted by the trainer child itself (not through lrctl). Per side:
`steps_per_s` (median over rounds, 95% CI), `ratio_<phase>` (the median over rounds of the
phase's steps/s over the same turn's no-load steps/s, with its CI), `reads_100_over_busy`,
and `reads` (reads/s actually answered, the generator's p50/p99 in ms, status codes).
`new_over_baseline` holds the medians of the per-round ratios new/baseline of each ratio_<phase>.
Target: the new side's ratio_reads_100 >= its ratio_busy (`target_reads_100_ge_busy`).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import itertools

import grpc
from _baseline import Side, open_sides
from _common import HERE, TrainerProcess, emit, median_ci, paired_ratios

from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

APPLIED = pb.CHANGE_STATUS_APPLIED
PENDING = pb.CHANGE_STATUS_PENDING
RAMP_S = 0.5  # a phase's load runs this long before its steps are counted


class Load:
    """Client threads sending the mix at a total rate (None: as fast as they can)."""

    def __init__(self, target: str, clients: int) -> None:
        self.channels = [grpc.insecure_channel(target) for _ in range(clients)]
        self.stubs = [pb_grpc.TrainingControlServiceStub(c) for c in self.channels]
        self.lock = threading.Lock()
        self.accepted: dict[str, int] = {}  # request_id -> version seen (0 while pending)
        self.errors: collections.Counter[str] = collections.Counter()
        self.calls = 0
        self.retry_mismatch = 0

    def _one(self, stub: Any, i: int) -> None:
        kind = i % 4
        try:
            if kind in (0, 1):  # reads are half the mix
                stub.GetState(pb.GetStateRequest(), timeout=10)
                code = "OK"
            else:
                version = stub.GetState(pb.GetStateRequest(), timeout=10).state.version
                request = pb.SetLearningRateRequest(scale=1.0, request_id=str(uuid.uuid4()))
                if kind == 2:  # a conflicting write: others move the version meanwhile
                    request.expected_version = version
                first = stub.SetLearningRate(request, timeout=10).change
                if kind == 3:  # a retry with the same request_id must not apply twice
                    again = stub.SetLearningRate(request, timeout=10).change
                    if again.request_id != first.request_id:
                        with self.lock:
                            self.retry_mismatch += 1
                if first.status in (APPLIED, PENDING):
                    with self.lock:
                        self.accepted[request.request_id] = first.version
                code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with self.lock:
            self.errors[code] += 1
            self.calls += 1

    def run(self, rate: float | None, seconds: float, max_calls: int) -> int:
        start_calls = self.calls
        deadline = time.monotonic() + seconds
        per_client = None if rate is None else len(self.stubs) / rate  # seconds between calls

        def client(n: int, stub: Any) -> None:
            next_at = time.monotonic() + (0 if per_client is None else per_client * n / len(self.stubs))
            i = n
            while time.monotonic() < deadline and self.calls - start_calls < max_calls:
                if per_client is not None:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                        if time.monotonic() >= deadline:
                            break
                    next_at += per_client
                self._one(stub, i)
                i += 1

        threads = [threading.Thread(target=client, args=(n, s), daemon=True) for n, s in enumerate(self.stubs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        return self.calls - start_calls

    def close(self) -> None:
        for c in self.channels:
            c.close()


def _watchers(target: str, count: int, stop: threading.Event) -> list[Any]:
    calls = []
    channel = grpc.insecure_channel(target)
    watch = channel.unary_stream("/lrctl.v1.TrainingControlService/WatchState",
                                 request_serializer=pb.WatchStateRequest.SerializeToString,
                                 response_deserializer=pb.WatchStateResponse.FromString)
    for _ in range(count):
        request = pb.WatchStateRequest()
        request.min_interval.FromMilliseconds(200)
        call = watch(request, timeout=600)

        def drain(c: Any = call) -> None:
            try:
                for _ in c:
                    pass
            except grpc.RpcError:
                pass

        threading.Thread(target=drain, daemon=True).start()
        calls.append(call)
    calls.append(channel)
    return calls


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with TrainerProcess() as trainer, grpc.insecure_channel(trainer.target) as channel:
        stub = pb_grpc.TrainingControlServiceStub(channel)
        load = Load(trainer.target, args.clients)

        def steps() -> tuple[int, float]:
            return stub.GetState(pb.GetStateRequest(), timeout=30).state.step, time.perf_counter()

        def phase(name: str) -> float:
            busy = None
            s0, t0 = steps()
            calls = 0
            if name == "busy":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(args.phase_s)
                busy.kill()
                busy.wait()
            elif name.startswith("rate_"):
                rate = None if name == "rate_max" else float(name.split("_")[1])
                calls = load.run(rate, args.phase_s, args.max_calls)
            else:
                time.sleep(args.phase_s)
            s1, t1 = steps()
            rates.setdefault(name, []).append((s1 - s0) / (t1 - t0))
            if calls:
                call_rates[name] = round(calls / (t1 - t0), 1)
            return rates[name][-1]

        rates: dict[str, list[float]] = {}
        call_rates: dict[str, float] = {}
        stop = threading.Event()
        watchers = _watchers(trainer.target, args.watchers, stop)
        for name in ("none", "rate_10", "busy", "rate_100", "rate_max", "none"):
            phase(name)
        for call in watchers[:-1]:
            call.cancel()
        watchers[-1].close()
        time.sleep(0.5)  # let the last accepted changes reach a step boundary
        history: list[Any] = []
        token = ""
        while True:
            page = stub.ListChanges(pb.ListChangesRequest(page_size=500, page_token=token), timeout=30)
            history.extend(page.changes)
            token = page.next_page_token
            if not token:
                break
        load.close()
    applied_by_id = collections.Counter(c.request_id for c in history if c.status == APPLIED)
    # An accepted write with expected_version may still lose at the boundary (ABORTED, the
    # documented outcome of a conflict that lands while it waits): that is not a loss.
    final = {c.request_id: c.status for c in history if c.status != APPLIED}
    aborted = sum(1 for rid in load.accepted if applied_by_id[rid] == 0 and final.get(rid) == pb.CHANGE_STATUS_ABORTED)
    lost = sum(1 for rid in load.accepted if applied_by_id[rid] == 0) - aborted
    duplicated = sum(1 for rid in load.accepted if applied_by_id[rid] > 1)
    applied = sorted((c for c in history if c.status == APPLIED), key=lambda c: c.version)
    out_of_order = sum(1 for a, b in itertools.pairwise(applied)
                       if b.version != a.version + 1 or b.applied_step < a.applied_step)
    base = sum(rates["none"]) / len(rates["none"])
    ratios = {k: round(sum(v) / len(v) / base, 3) for k, v in rates.items()}
    return {"lost": lost, "duplicated": duplicated, "out_of_order": out_of_order,
            "aborted_at_boundary": aborted, "retry_mismatch": load.retry_mismatch, "accepted": len(load.accepted),
            "applied": len(applied), "ratio_10": ratios["rate_10"], "ratio_100": ratios["rate_100"],
            "ratio_max": ratios["rate_max"], "ratio_busy": ratios["busy"],
            "steps_per_s": {k: round(sum(v) / len(v), 1) for k, v in rates.items()},
            "calls_per_s": call_rates, "calls": load.calls, "codes": dict(load.errors)}


# -- --baseline: the new server beside the previous one, under GetState reads ----------------------
READ_PHASES = ("none", "busy", "reads_100", "reads_1000")


class LoadGenerator:
    """bench/_loadgen.py, one process for the whole run: paced GetState reads, open loop."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_loadgen.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _say(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the load generator ended")
        return answer

    def start(self, target: str, rate: float, view: int) -> None:
        self._say(f"start {target} {rate} {view}")

    def stop(self) -> dict[str, Any]:
        outcome: dict[str, Any] = json.loads(self._say("stop"))
        return outcome

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _read_phase(side: Side, name: str, load: LoadGenerator, phase_s: float) -> tuple[float, dict[str, Any] | None]:
    """Training steps/s of `side` during `phase_s` of phase `name`, and the reads' outcome."""
    busy = None
    if name == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    elif name.startswith("reads_"):
        load.start(side.trainer.target, float(name.split("_")[1]), side.state_view)
    time.sleep(min(RAMP_S, phase_s / 2))  # the load running at its pace before the count starts
    s0, t0 = side.trainer.steps()
    time.sleep(phase_s)
    s1, t1 = side.trainer.steps()
    outcome = None
    if busy is not None:
        busy.kill()
        busy.wait()
    elif name.startswith("reads_"):
        outcome = load.stop()
    return (s1 - s0) / (t1 - t0), outcome


def _reads_summary(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The generator's rounds in one phase: reads/s answered (median, CI), the medians of their
    p50 and p99 (ms), and the totals."""
    codes: collections.Counter[str] = collections.Counter()
    for outcome in outcomes:
        codes.update(outcome.get("codes", {}))

    def median_of(key: str) -> float | None:
        values = [o[key] for o in outcomes if o.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    return {"answered_per_s": median_ci([o.get("answered_per_s", 0.0) for o in outcomes], digits=1),
            "p50_ms": median_of("p50_ms"), "p99_ms": median_of("p99_ms"),
            "sent": sum(o.get("sent", 0) for o in outcomes), "skipped": sum(o.get("skipped", 0) for o in outcomes),
            "codes": dict(codes)}


def measure_sides(args: argparse.Namespace) -> dict[str, Any]:
    load = LoadGenerator()
    try:
        with open_sides(args.baseline, args.candidate) as sides:
            sides.give_history(args.history)
            rates: dict[str, dict[str, list[float]]] = {side.name: {phase: [] for phase in READ_PHASES} for side in sides.all}
            reads: dict[str, dict[str, list[dict[str, Any]]]] = {
                side.name: {phase: [] for phase in READ_PHASES if phase.startswith("reads_")} for side in sides.all}
            sources = {side.name: side.source for side in sides.all}
            state_bytes = {side.name: side.state_bytes() for side in sides.all}
            for r, side in sides.rounds(args.rounds):
                # Each round starts at another phase: none is first after a turn only every 4th.
                for phase in READ_PHASES[r % 4:] + READ_PHASES[:r % 4]:
                    steps_per_s, outcome = _read_phase(side, phase, load, args.phase_s)
                    rates[side.name][phase].append(steps_per_s)
                    if outcome is not None:
                        reads[side.name][phase].append(outcome)
    finally:
        load.close()
    result: dict[str, Any] = {"sides": {}}
    for name, by_phase in rates.items():
        none = by_phase["none"]
        result["sides"][name] = {
            "source": sources[name], "state_bytes": state_bytes[name],
            "steps_per_s": {phase: median_ci(v, digits=1) for phase, v in by_phase.items()},
            **{f"ratio_{phase}": paired_ratios(by_phase[phase], none) for phase in READ_PHASES[1:]},
            "reads_100_over_busy": paired_ratios(by_phase["reads_100"], by_phase["busy"]),
            "reads": {phase: _reads_summary(outcomes) for phase, outcomes in reads[name].items()},
        }
    new, old = rates["new"], rates["baseline"]

    def over_none(by_phase: dict[str, list[float]], phase: str) -> list[float]:
        return [a / b if b > 0 else math.nan for a, b in zip(by_phase[phase], by_phase["none"], strict=True)]

    result["new_over_baseline"] = {f"ratio_{phase}": paired_ratios(over_none(new, phase), over_none(old, phase))
                                   for phase in READ_PHASES[1:]}
    ours = result["sides"]["new"]
    result["target_reads_100_ge_busy"] = ours["ratio_reads_100"]["median"] >= ours["ratio_busy"]["median"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--watchers", type=int, default=4, help="WatchState streams held open")
    parser.add_argument("--phase-s", type=float, help="seconds per phase (5; with --baseline 4)")
    parser.add_argument("--max-calls", type=int, default=2000, help="calls per phase at most")
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    sides = parser.add_argument_group("new against baseline (--baseline): GetState reads only")
    sides.add_argument("--baseline", metavar="REF", help="measure this checkout against the lrctl of git REF")
    sides.add_argument("--candidate", metavar="REF", help="the new side from git REF instead of this checkout")
    sides.add_argument("--rounds", type=int, default=8, help="turns of each side, every phase in each")
    sides.add_argument("--history", type=int, default=10, help="changes applied on each side before measuring")
    args = parser.parse_args()
    if args.phase_s is None:
        args.phase_s = 4.0 if args.baseline else 5.0
    if args.quick:
        args.clients, args.watchers = min(args.clients, 8), min(args.watchers, 2)
        args.phase_s, args.max_calls = min(args.phase_s, 1.0), min(args.max_calls, 300)
        args.rounds, args.history = min(args.rounds, 2), min(args.history, 2)
    result = measure_sides(args) if args.baseline else measure(args)
    result["config"] = {"clients": args.clients, "watchers": args.watchers, "phase_s": args.phase_s,
                        "max_calls": args.max_calls, "quick": args.quick, "cpus": os.cpu_count()}
    if args.baseline:
        result["config"] = {"phase_s": args.phase_s, "rounds": args.rounds, "history": args.history,
                            "quick": args.quick, "cpus": os.cpu_count()}
    emit(result)


if __name__ == "__main__":
    main()
