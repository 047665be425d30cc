"""WatchState's updates on the event loop: an async generator, woken by the server's `Wakeups`
(no thread per watcher, no polling).

The rules: the current state at once; then the latest one at most every `min_interval`
while anything new is published, and at once after a version or phase change; `every_steps`
sends at once when the step is that far past the last one sent, `on_epoch` when the epoch
changes; `changes_only` drops the time-based updates; the stream ends after an ended phase.
A slow consumer skips intermediate states (each send waits for the stream's flow control).
One difference: time-based updates come at most every MIN_TIMED_INTERVAL, whatever smaller
`min_interval` a watcher asks for (the trainer publishes its step ten times a second; faster
publishes come from changes being submitted, and hundreds of watchers each sending the whole
state at each of those would starve the server). Changes, phases and the triggers still send
at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

from lrctl.service.control.changes import ENDED_PHASES, Snapshot
from lrctl.service.rpc.wakeups import Wakeups

#: Seconds between two time-based updates of one stream, at least.
MIN_TIMED_INTERVAL = 0.1


async def updates(wakeups: Wakeups, read: Callable[[], Snapshot], min_interval: float, *,
                  every_steps: int = 0, on_epoch: bool = False,
                  changes_only: bool = False) -> AsyncIterator[Snapshot]:
    """Snapshots for a watcher; `read` returns the controller's current one."""
    loop = asyncio.get_running_loop()
    sent: Snapshot | None = None
    sent_at = -math.inf
    min_interval = max(min_interval, MIN_TIMED_INTERVAL)
    while not wakeups.closed:
        snap = read()
        urgent = sent is None or snap.version != sent.version or snap.phase != sent.phase
        if sent is not None and not urgent:
            urgent = (on_epoch and snap.epoch != sent.epoch) or (
                every_steps > 0 and snap.step - sent.step >= every_steps)
        since = loop.time() - sent_at
        if urgent or not (changes_only or snap.seq == sent.seq or since < min_interval):  # type: ignore[union-attr]
            sent, sent_at = snap, loop.time()
            yield snap
            if snap.phase in ENDED_PHASES:
                return
            continue
        assert sent is not None
        # Asleep until something may be worth sending: a version, phase or epoch move (always),
        # the step trigger, and for time-based updates the end of the interval, then anything new.
        timed = not changes_only
        await wakeups.next_update(
            any_publish=timed and since >= min_interval,
            at_step=sent.step + every_steps if every_steps > 0 else None,
            until=sent_at + min_interval if timed and since < min_interval else None)
