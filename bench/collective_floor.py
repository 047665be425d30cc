"""The floor under the multi-worker exchange: lrctl's own launcher (`exchange._Launcher`, the
one the exchange uses) run back to back between two worker processes on 127.0.0.1 with no
training, so what one exchange costs by itself is known apart from a job.

    python bench/collective_floor.py [--exchanges 400] [--quick]

Each worker launches an exchange of the size a two-worker job sends, waits for it, checks the
sum, and launches the next. The last line is JSON, per worker: `launch_ms` (median time of
the call on the calling thread: what the training thread pays), `wall_ms_per_exchange` and
`cpu_ms_per_exchange` (the process's CPU time, all its threads: the collective's gRPC work
included), after 50 exchanges of warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

WARMUP = 50


def _worker(index: int, ports: list[int], exchanges: int) -> dict[str, float]:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    import numpy as np
    import tensorflow as tf

    from lrctl.service.schedules.engine import ControllableSchedule
    from lrctl.service.training.exchange import _Launcher

    tf.distribute.MultiWorkerMirroredStrategy()  # the cluster and collectives, as in a job
    width = len(ControllableSchedule(0.001).read_packed()) + 2 * len(ports) + 1
    launcher = _Launcher(f"/job:worker/replica:0/task:{index}/device:CPU:0", len(ports), width)
    launches: list[float] = []
    for n in range(exchanges):
        if n == WARMUP:
            wall, cpu = time.perf_counter(), time.process_time()
        vector = np.zeros(width, np.int64)
        vector[index] = n + 1
        started = time.perf_counter()
        launched = launcher.send(vector)
        launches.append(time.perf_counter() - started)
        total = launched.result()
        if not (total[: len(ports)] == n + 1).all():
            raise SystemExit(f"exchange {n}: wrong sum {total[: len(ports)]}")
    measured = exchanges - WARMUP
    return {"launch_ms": round(1e3 * statistics.median(launches[WARMUP:]), 4),
            "wall_ms_per_exchange": round(1e3 * (time.perf_counter() - wall) / measured, 4),
            "cpu_ms_per_exchange": round(1e3 * (time.process_time() - cpu) / measured, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help=f"{WARMUP + 10} exchanges")
    parser.add_argument("--worker", nargs=2, metavar=("INDEX", "PORTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.exchanges = WARMUP + 10
    if args.exchanges <= WARMUP:
        parser.error(f"--exchanges must be more than the {WARMUP} of warm-up")
    if args.worker:
        index, ports = int(args.worker[0]), [int(p) for p in args.worker[1].split(",")]
        print(json.dumps(_worker(index, ports, args.exchanges)), flush=True)
        return
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = ",".join(str(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([sys.executable, __file__, "--exchanges", str(args.exchanges),
                               "--worker", str(i), addresses], env=env, stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    workers = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    print(json.dumps({"bench": "collective_floor", "exchanges": args.exchanges - WARMUP,
                      "workers": workers}), flush=True)


if __name__ == "__main__":
    main()
