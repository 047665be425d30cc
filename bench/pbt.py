"""Live PBT (lrctl) against restart PBT (Ray Tune's way), in one run, on the same budget.

    python bench/pbt.py [--population 4 --rounds 4 --interval 50 --seed 0] [--quick] [--out FILE]

Both runs use `examples/pbt_live.py`'s harness: the same population, number of optimizer
steps, ranking, exploit and explore rules and seed. Restart runs first, then live; a member
is a `examples/pbt_trainer.py` process (a small CNN on synthetic images).

Figures per run, from each process's event lines (wall clock, one machine):
- `wall_s`: first process started to last process exited;
- `startup_s`: process start to serving (Python and TensorFlow import, model build, restore,
  data pipeline built), summed over every process started;
- `trace_s`: the first step's time beyond a steady step (graph trace and the pipeline's
  warm-up), summed likewise;
- `shutdown_s`: last step to process exit (final checkpoint, interpreter exit), summed;
- `not_training_s`: member-seconds not spent training: for each member, `wall_s` minus its
  training time (its steps and evaluations; a paused or restarting member is not training);
- `best_loss`: the best member's evaluation loss at the last step.

The last line is JSON; a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import pbt_live
from _common import emit


def _event(member: pbt_live.Member, name: str, **fields: Any) -> float:
    return float(member.wait_for(name, **fields)["time"])


def costs(outcome: pbt_live.Outcome, interval: int, rounds: int) -> dict[str, Any]:
    """The cost split of one run (see the module's docstring)."""
    startup, trace, shutdown, step_s = [], [], [], []
    training: dict[int, float] = {}
    timeline = []
    origin = min(m.spawned for m in outcome.incarnations)
    for member in outcome.incarnations:
        begin = _event(member, "first_step_begin")
        first_end = _event(member, "first_step_end")
        first_eval_step = (int(member.wait_for("first_step_begin")["step"]) // interval + 1) * interval
        first_eval = _event(member, "eval", step=first_eval_step)
        steps = first_eval_step - int(member.wait_for("first_step_begin")["step"])
        step = (first_eval - first_end) / max(1, steps - 1)  # a steady step (its eval amortised)
        step_s.append(step)
        startup.append(_event(member, "ready") - member.spawned)
        trace.append(max(0.0, first_end - begin - step))
        assert member.exited is not None
        shutdown.append(member.exited - _event(member, "last_step_end"))
        last = _event(member, "last_step_end")
        spans = last - begin - trace[-1]
        if outcome.mode == "live":  # minus the paused stretches: round end to resume
            spans -= sum(outcome.resumed[(member.index, r)] - _event(member, "eval", step=r * interval)
                         for r in range(1, rounds))
        training[member.index] = training.get(member.index, 0.0) + spans
        # Seconds from the run's first spawn: what the sums above are made of, for a reader to check.
        timeline.append({"member": member.index, "spawned": round(member.spawned - origin, 2),
                         **{e["event"] + (f"@{e['step']}" if e["event"] == "eval" else ""):
                            round(e["time"] - origin, 2) for e in member.events
                            if e["event"] in ("ready", "first_step_end", "eval", "last_step_end")},
                         "exited": round(member.exited - origin, 2)})
    restarts = len(outcome.incarnations)
    return {
        "wall_s": round(outcome.wall_s, 2),
        "processes": restarts,
        "startup_s": round(sum(startup), 2),
        "trace_s": round(sum(trace), 2),
        "shutdown_s": round(sum(shutdown), 2),
        "per_process": {"startup_s": round(statistics.median(startup), 2),
                        "trace_s": round(statistics.median(trace), 2),
                        "shutdown_s": round(statistics.median(shutdown), 2)},
        "step_ms": round(statistics.median(step_s) * 1e3, 1),
        "not_training_s": round(sum(outcome.wall_s - t for t in training.values()), 2),
        "training_s": round(sum(training.values()), 2),
        "best_loss": round(outcome.best_loss, 4),
        "final_losses": [round(x, 4) for x in outcome.final_losses],
        "exploits": [[[e.loser, e.donor] for e in plan] for plan in outcome.rounds],
        "timeline": timeline,
    }


def machine() -> dict[str, Any]:
    import grpc
    import keras
    import tensorflow as tf

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2), "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__,
            "grpcio": grpc.__version__}


def table(result: dict[str, Any]) -> str:
    rows = [("wall time (s)", "wall_s"), ("processes started", "processes"),
            ("start-up, summed (s)", "startup_s"), ("trace + warm-up, summed (s)", "trace_s"),
            ("shutdown, summed (s)", "shutdown_s"), ("member-s not training", "not_training_s"),
            ("member-s training", "training_s"), ("best member's final loss", "best_loss")]
    lines = ["| | restart PBT | live PBT (lrctl) |", "|---|---|---|"]
    lines += [f"| {label} | {result['restart'][key]} | {result['live'][key]} |" for label, key in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--interval", type=int, default=50, help="steps per round")
    parser.add_argument("--quantile", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 members, 2 rounds of 10 steps (CI)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.population, args.rounds, args.interval = 2, 2, 10
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result: dict[str, Any] = {"config": {k: getattr(args, k) for k in
                                         ("population", "rounds", "interval", "quantile", "seed", "quick")},
                              "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="lrctl-pbt-") as work:
        for mode, run in (("restart", pbt_live.run_restart), ("live", pbt_live.run_live)):
            root = Path(work) / mode
            root.mkdir()
            outcome = run(args.population, args.rounds, args.interval, args.seed, args.quantile, root, env=env)
            result[mode] = costs(outcome, args.interval, args.rounds)
    result["restart_over_live_wall"] = round(result["restart"]["wall_s"] / result["live"]["wall_s"], 2)
    result["same_exploits"] = result["restart"]["exploits"] == result["live"]["exploits"]
    print(table(result), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    emit(result)


if __name__ == "__main__":
    main()
