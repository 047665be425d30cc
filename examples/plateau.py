"""A remote ReduceLROnPlateau: halve a running trainer's learning rate when its loss stalls.

    python examples/plateau.py --target 127.0.0.1:50051 --patience 20 --min-delta 1e-4

It follows the loss through `WatchState` (`client.watch()`). When the loss has not improved on
its best by more than `--min-delta` for `--patience` updates, it sends
`scale_learning_rate(--factor, expected_version=...)`: the change applies only if nobody else
changed the learning rate since the state it judged. On a `VersionConflict` (or a change
aborted at the step boundary for the same reason) it re-reads the state and starts counting
again. It stops at `--min-lr`, after `--max-changes`, `--max-updates` or `--max-seconds`, or
when training ends.

Unlike Keras's callback, patience counts watch updates (at most one per `--interval`
seconds), not epochs. An update whose metrics were cleared because a change applied after they
were taken (the state's `metrics` is empty until a batch after the change has finished) is
not counted. It uses the asyncio client, `lrctl.client.aio.TrainingControlClient`, as an
orchestrator in kopf or FastAPI would: one event loop, no threads.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence

from lrctl.client import (
    DEFAULT_TARGET,
    DeadlineExceeded,
    LrctlError,
    VersionConflict,
    pb,
)
from lrctl.client.aio import TrainingControlClient


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the trainer, host:port")
    parser.add_argument("--metric", default="loss", help="the metric to watch (lower is better)")
    parser.add_argument("--factor", type=float, default=0.5, help="scale on a plateau")
    parser.add_argument("--patience", type=int, default=10,
                        help="updates without improvement before scaling")
    parser.add_argument("--min-delta", type=float, default=1e-4,
                        help="an improvement smaller than this does not count")
    parser.add_argument("--min-lr", type=float, default=1e-6,
                        help="never scale below this learning rate; stop when reached")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.add_argument("--max-changes", type=int, help="stop after this many changes")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates")
    parser.add_argument("--max-seconds", type=float, help="stop after this long")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return asyncio.run(_main(args))
    except LrctlError as e:  # e.g. the trainer is unreachable: one line, not a traceback
        print(f"plateau: {e}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace) -> int:
    best, stalled, changes, updates = math.inf, 0, 0, 0
    async with TrainingControlClient(args.target) as client:
        try:
            async with client.watch(args.interval, timeout=args.max_seconds, view="basic") as watch:
                async for state in watch:
                    updates += 1
                    if state.phase != pb.PHASE_TRAINING:
                        if state.phase in (pb.PHASE_FINISHED, pb.PHASE_FAILED):
                            print(f"training ended at step {state.step}")
                            break
                        continue  # not started yet
                    if state.learning_rate <= args.min_lr:
                        print(f"lr {state.learning_rate:g} reached --min-lr {args.min_lr:g}")
                        break
                    loss = state.metrics.get(args.metric)
                    if loss is not None and math.isfinite(loss):
                        if loss < best - args.min_delta:
                            best, stalled = loss, 0
                        else:
                            stalled += 1
                    if stalled >= args.patience:
                        stalled = 0
                        if await _reduce(client, state, args):
                            changes += 1
                    if args.max_changes is not None and changes >= args.max_changes:
                        break
                    if args.max_updates is not None and updates >= args.max_updates:
                        break
        except DeadlineExceeded:
            pass  # --max-seconds: the watch's deadline
    print(f"done: {changes} change(s) in {updates} update(s)")
    return 0


async def _reduce(client: TrainingControlClient, state: pb.TrainingState,
                  args: argparse.Namespace) -> bool:
    """Scale by `args.factor` if `state` is still current; False if someone else got there."""
    factor = max(args.factor, args.min_lr / state.learning_rate)
    reason = (f"plateau: {args.metric} {state.metrics[args.metric]:.4g} did not improve by "
              f"{args.min_delta:g} for {args.patience} updates")
    try:
        change = await client.scale_learning_rate(factor, expected_version=state.version, wait=True,
                                                  reason=reason)
    except VersionConflict:
        change = None
    if change is None or change.status != pb.CHANGE_STATUS_APPLIED:
        fresh = await client.get_state(view="basic")  # re-read: the next plateau is judged on the new state
        print(f"version {state.version} is stale (now {fresh.version}); not scaling")
        return False
    print(f"{time.strftime('%H:%M:%S')} v{change.version} step {change.applied_step}: "
          f"lr {state.learning_rate:g} -> {change.learning_rate_after:g} ({reason})")
    return True


if __name__ == "__main__":
    raise SystemExit(main())
