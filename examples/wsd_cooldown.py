"""Warmup-stable-decay, the decay on demand: hold the learning rate, then cool it down.

    python examples/wsd_cooldown.py --target 127.0.0.1:50051 --stable-lr 0.01 \\
        --cooldown-after-steps 20000 --decay-steps 2000 --floor 1e-5

The stable phase is a constant learning rate (`--stable-lr` pins one; without it the current
one is kept). The cooldown starts at once, or with `--cooldown-after-steps S` at step S exactly
(`apply_at_step`): a `piecewise_linear` schedule from the learning rate in effect down to
`--floor` over `--decay-steps`, swapped in with the restart origin so that its step 0 is the
step where the cooldown begins, whatever the global step. It is sent with `expected_version`:
if someone changes the learning rate first, it re-reads the state and tries again from the new
value. `--follow` then watches until the floor is reached (or `--max-seconds` pass).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lrctl.client import (
    DEFAULT_TARGET,
    DeadlineExceeded,
    FailedPrecondition,
    LrctlError,
    TrainingControlClient,
    VersionConflict,
    pb,
    schedules,
)

ATTEMPTS = 5
WAIT_FOR_STEP = 24 * 3600.0  # seconds: how long to wait for --cooldown-after-steps


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the trainer, host:port")
    parser.add_argument("--stable-lr", type=float, help="pin this LR for the stable phase first")
    parser.add_argument("--cooldown-after-steps", type=int,
                        help="start the cooldown at this global step (default: now)")
    parser.add_argument("--decay-steps", type=int, default=1000, help="length of the cooldown")
    parser.add_argument("--floor", type=float, default=0.0, help="the LR at the end of it")
    parser.add_argument("--follow", action="store_true", help="watch until the floor is reached")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.add_argument("--max-seconds", type=float, help="stop following after this long")
    return parser.parse_args(argv)


def cooldown(start_lr: float, decay_steps: int, floor: float) -> pb.Schedule:
    """The decay phase: linear from `start_lr` to `floor` over `decay_steps`, then `floor`."""
    return schedules.PiecewiseLinear([(0, start_lr), (decay_steps, floor)])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _main(args)
    except LrctlError as e:  # e.g. the trainer is unreachable: one line, not a traceback
        print(f"wsd_cooldown: {e}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    with TrainingControlClient(args.target) as client:
        if args.stable_lr is not None:
            pinned = client.set_learning_rate(args.stable_lr, wait=True, reason="wsd: stable phase")
            print(f"v{pinned.version} step {pinned.applied_step}: stable lr {args.stable_lr:g}")
        change = _start_cooldown(client, args)
        if change is None:
            print(f"gave up after {ATTEMPTS} version conflicts")
            return 1
        print(f"v{change.version} step {change.applied_step}: cooldown "
              f"{schedules.describe_schedule(change.schedule)}")
        if args.follow:
            _follow(client, change.applied_step + args.decay_steps, args)
    return 0


def _start_cooldown(client: TrainingControlClient, args: argparse.Namespace) -> pb.Change | None:
    for _ in range(ATTEMPTS):
        state = client.get_state(view="basic")
        schedule = cooldown(state.learning_rate, args.decay_steps, args.floor)
        at = args.cooldown_after_steps
        if at is not None and state.step >= at:
            at = None  # already past it: start now
        try:
            # Waits until the change lands: the next step, or step `at` exactly.
            change = client.swap_schedule(
                schedule, origin="restart", apply_at_step=at, expected_version=state.version,
                wait=True, timeout=None if at is None else WAIT_FOR_STEP,
                reason=f"wsd: cooldown to {args.floor:g} over {args.decay_steps} steps")
        except VersionConflict:
            continue  # changed since we read it: decay from the new learning rate
        except FailedPrecondition:
            if at is None:
                raise
            continue  # step `at` passed while the request travelled: start now
        if change.status == pb.CHANGE_STATUS_APPLIED:
            return change
        if change.status != pb.CHANGE_STATUS_ABORTED:  # ABORTED: changed before the boundary
            raise RuntimeError(f"cooldown not applied: {change.status} {change.error}")
    return None


def _follow(client: TrainingControlClient, end_step: int, args: argparse.Namespace) -> None:
    try:
        for state in client.watch(args.interval, timeout=args.max_seconds, view="basic"):
            print(f"step {state.step}: lr {state.learning_rate:.6g}")
            if state.step >= end_step:
                print("cooldown complete")
                return
    except DeadlineExceeded:
        print("stopped following: --max-seconds")


if __name__ == "__main__":
    raise SystemExit(main())
