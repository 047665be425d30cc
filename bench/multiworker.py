"""What keeping every worker on the chief's schedule costs: the multi-worker demo
(python -m lrctl.service.apps.multi_worker, two processes on 127.0.0.1) with an exchange at every
step boundary against one with none after the first (--sync-every huge), alternated.

    python bench/multiworker.py [--quick] [--rounds N] [--steps N]

The JSON line has `ms_per_step` for both and `added_ms_per_step` (mean, 95% CI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile

from _common import mean_ci

NO_EXCHANGE = 10**12  # --sync-every: only the boundary before step 0 exchanges


def _ports() -> list[int]:
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_job(steps: int, sync_every: int) -> float:
    """Seconds per step of the chief over `steps` steps (start-up excluded)."""
    ports = _ports()
    with tempfile.TemporaryDirectory() as folder:
        procs = []
        for i in range(2):
            tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                         "task": {"type": "worker", "index": i}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": "",
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "lrctl.service.apps.multi_worker", "--steps", str(steps),
                 "--sync-every", str(sync_every)],
                env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(err[-3000:])
    match = re.search(r"(\d+) steps in ([\d.]+) s", outputs[0])
    assert match, outputs[0][-2000:]
    return float(match.group(2)) / int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 30 steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    rounds, steps = (1, 30) if args.quick else (args.rounds, args.steps)
    exchange, none = [], []
    for _ in range(rounds):
        exchange.append(run_job(steps, 1))
        none.append(run_job(steps, NO_EXCHANGE))
    added = [(a - b) * 1e3 for a, b in zip(exchange, none, strict=True)]
    print(json.dumps({
        "bench": "multiworker", "workers": 2, "steps": steps, "rounds": rounds,
        "ms_per_step": {"exchange_every_step": mean_ci([s * 1e3 for s in exchange]),
                        "no_exchange": mean_ci([s * 1e3 for s in none])},
        "added_ms_per_step": mean_ci(added),
        "ratio": round(sum(exchange) / sum(none), 3),
    }))


if __name__ == "__main__":
    main()
