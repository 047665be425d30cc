"""Population-based training, the learning-rate half: one controller, several trainers.

    python examples/pbt_lite.py --target host-a:50051 --target host-b:50051 \\
        --target host-c:50051 --ready-steps 1000 --rounds 10 --interval 600

Each round it reads every trainer's state, ranks them by the loss in `state.metrics`, and
perturbs each trainer worse than the best: its learning rate becomes the best one's times a
factor drawn from {0.8, 1.25} (explore), sent with `expected_version` so that a trainer
changed in the meantime is left alone this round. A trainer takes part once it has run
`--ready-steps` steps since it was last perturbed.

PBT's exploit step also copies the best trainer's weights into the worse ones. lrctl changes
learning rates only: copy weights with checkpoints (the best trainer saves one, the others
restore it, e.g. with `tf.train.Checkpoint` or `BackupAndRestore`), then perturb with this.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence

from lrctl.client import LrctlError, TrainingControlClient, VersionConflict, pb

FACTORS = (0.8, 1.25)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True,
                        help="a trainer, host:port; give it 2 or more times")
    parser.add_argument("--metric", default="loss", help="the metric to rank by (lower is better)")
    parser.add_argument("--ready-steps", type=int, default=100,
                        help="steps a trainer runs between perturbations")
    parser.add_argument("--rounds", type=int, default=1, help="rounds to run")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between rounds")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="give up waiting for trainers to be ready after this long")
    parser.add_argument("--seed", type=int, help="seed for the perturbation factors")
    args = parser.parse_args(argv)
    if len(args.target) < 2:
        parser.error("give --target at least twice")
    return args


def _loss(state: pb.TrainingState, metric: str) -> float:
    value = state.metrics.get(metric, math.inf)
    return value if math.isfinite(value) else math.inf  # a diverged trainer ranks last


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _main(args)
    except LrctlError as e:  # e.g. the trainer is unreachable: one line, not a traceback
        print(f"pbt_lite: {e}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    clients = [TrainingControlClient(target) for target in args.target]
    last_step = dict.fromkeys(args.target, 0)  # the step of each trainer's last perturbation
    try:
        for round_ in range(1, args.rounds + 1):
            states = _wait_ready(clients, last_step, args)
            ranked = sorted(zip(clients, states, strict=True),
                            key=lambda pair: _loss(pair[1], args.metric))
            best_client, best = ranked[0]
            print(f"round {round_}: best {best_client.target} {args.metric} "
                  f"{_loss(best, args.metric):.4g} lr {best.learning_rate:g}")
            for client, state in ranked[1:]:
                if _loss(state, args.metric) <= _loss(best, args.metric):
                    continue  # tied with the best
                lr = best.learning_rate * rng.choice(FACTORS)
                reason = (f"pbt round {round_}: {args.metric} {_loss(state, args.metric):.4g} "
                          f"worse than {best_client.target}'s {_loss(best, args.metric):.4g}")
                try:
                    change = client.set_learning_rate(lr, expected_version=state.version, wait=True,
                                                      reason=reason)
                except VersionConflict:
                    print(f"  {client.target}: changed meanwhile, skipped this round")
                    continue
                if change.status == pb.CHANGE_STATUS_APPLIED:
                    last_step[client.target] = change.applied_step
                    print(f"  {client.target}: lr {state.learning_rate:g} -> {lr:g} "
                          f"at step {change.applied_step}")
            if round_ < args.rounds:
                time.sleep(args.interval)
    finally:
        for client in clients:
            client.close()
    return 0


def _wait_ready(clients: list[TrainingControlClient], last_step: dict[str, int],
                args: argparse.Namespace) -> list[pb.TrainingState]:
    """Every trainer's state, once each is training with `--ready-steps` steps behind it."""
    deadline = time.monotonic() + args.max_seconds
    while True:
        states = [client.get_state(view="basic") for client in clients]
        if all(s.phase == pb.PHASE_TRAINING and args.metric in s.metrics
               and s.step - last_step[c.target] >= args.ready_steps
               for c, s in zip(clients, states, strict=True)):
            return states
        if time.monotonic() > deadline:
            raise SystemExit("trainers not ready before --max-seconds")
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
