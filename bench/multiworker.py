"""What keeping every worker on the chief's schedule costs: the multi-worker demo
(lrctl.service.apps.multi_worker, two processes on 127.0.0.1) with an exchange at every step
boundary against one with none after the first (--sync-every huge), alternated.

    python bench/multiworker.py [--baseline REF] [--quick] [--rounds N] [--steps N]

Each job's figure is its steady state (bench/_mw_worker.py: the chief's mean time between
step boundaries after the first 50, so start-up and tracing are left out), with the time
inside each step boundary and each exchange boundary, the chief process's CPU time per step
(its threads, the collectives' included) and, where the exchange is pipelined, the time spent
waiting for the collective in flight. `--baseline REF` also runs REF's implementation (`git archive`,
bench/_baseline.py) with an exchange at every boundary, in the same rounds; the arms take
turns in an order that reverses each round (A B C, C B A, ...), so drift hits all alike.
The last line is JSON: `ms_per_step` per arm and `added_ms_per_step` (each arm minus the
round's no-exchange job), means with 95% CIs over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from _baseline import materialize, working_tree
from _common import HERE, mean_ci

NO_EXCHANGE = 10**12  # --sync-every: only the boundary before step 0 exchanges
WORKER = os.path.join(HERE, "_mw_worker.py")


def _ports() -> list[int]:
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_job(steps: int, sync_every: int, lrctl_root: str | None = None) -> dict[str, Any]:
    """The chief's steady-state figures over a job of `steps` steps; `lrctl_root`: a source
    tree whose lrctl the workers import (None: this venv's)."""
    ports = _ports()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if lrctl_root is not None:
        paths = [os.path.join(lrctl_root, "service"), os.path.join(lrctl_root, "client")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as folder:
        procs = []
        for i in range(2):
            tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                         "task": {"type": "worker", "index": i}}
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, "--steps", str(steps), "--sync-every", str(sync_every)],
                env={**env, "TF_CONFIG": json.dumps(tf_config)}, cwd=folder,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(err[-3000:])
    figures: dict[str, Any] = json.loads(outputs[0][0].strip().splitlines()[-1])
    expected = os.path.join(lrctl_root, "service") if lrctl_root else None
    if expected is not None and not figures["lrctl"].startswith(expected):
        raise SystemExit(f"the baseline job imported {figures['lrctl']}, not {expected}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REF", help="also run REF's implementation (git ref)")
    parser.add_argument("--quick", action="store_true", help="1 round of 120 steps")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    rounds, steps = (1, 120) if args.quick else (args.rounds, args.steps)
    arms: dict[str, tuple[int, str | None]] = {"exchange_every_step": (1, None),
                                               "no_exchange": (NO_EXCHANGE, None)}
    source: dict[str, Any] = {"new": {"ref": "working tree", **working_tree()}}
    if args.baseline:
        sha, root = materialize(args.baseline)
        arms["baseline_exchange_every_step"] = (1, root)
        source["baseline"] = {"ref": args.baseline, "sha": sha}
    jobs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for r in range(rounds):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            sync_every, root = arms[name]
            jobs[name].append(run_job(steps, sync_every, root))
            print(f"round {r} {name}: {jobs[name][-1]}", file=sys.stderr, flush=True)
    per_step = {name: [j["ms_per_step"] for j in done] for name, done in jobs.items()}
    none = per_step["no_exchange"]
    result = {
        "bench": "multiworker", "workers": 2, "steps": steps, "rounds": rounds, "source": source,
        "ms_per_step": {name: mean_ci(values) for name, values in per_step.items()},
        "median_ms_per_step": {name: mean_ci([j["median_ms_per_step"] for j in done])
                               for name, done in jobs.items()},
        "added_ms_per_step": {name: mean_ci([a - b for a, b in zip(values, none, strict=True)])
                              for name, values in per_step.items() if name != "no_exchange"},
        "ratio": round(sum(per_step["exchange_every_step"]) / sum(none), 3),
        "added_fraction_of_step": {name: round(sum(values) / sum(none) - 1, 4)
                                   for name, values in per_step.items() if name != "no_exchange"},
        **{figure: {name: mean_ci([j[figure] for j in done]) for name, done in jobs.items()}
           for figure in ("ms_in_step_boundary", "ms_in_exchange_boundary", "cpu_ms_per_step")},
        "ms_waiting_for_collective": mean_ci([j["ms_waiting_for_collective"]
                                              for j in jobs["exchange_every_step"]]),
        "jobs": jobs,
    }
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
