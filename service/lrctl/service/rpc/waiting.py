"""Calls that wait for a change to end (`wait_until_applied`, WaitChange): at most `max_waiters`
at once (one budget for both), each a suspended coroutine that the server's `Wakeups` resolves
when its change ends, and that answers just before its call's deadline, never after."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator

from grpc import aio

from lrctl.service.control.changes import Change, ChangeStatus, Phase
from lrctl.service.control.controller import Controller
from lrctl.service.errors import ResourceExhaustedError, UnavailableError, WaitTimeoutError
from lrctl.service.rpc.budgets import Budget
from lrctl.service.rpc.wakeups import Wakeups

#: Seconds one call may wait for its change to apply (SetLearningRate/SwapSchedule: then
#: DEADLINE_EXCEEDED; it stays pending), and the longest WaitChange timeout.
MAX_WAIT = 600.0
_WAIT_MARGIN = 0.05  # answer DEADLINE_EXCEEDED ourselves, with a message, just before the deadline


class WaitingCalls:
    """The waiting calls of one server, on its loop (the budget's count needs no lock)."""

    def __init__(self, wakeups: Wakeups, max_waiters: int) -> None:
        self._wakeups = wakeups
        self._budget = Budget("max_waiters", max_waiters)

    @property
    def count(self) -> int:
        """Calls waiting for a change now (one int: any thread may read it)."""
        return self._budget.taken

    @property
    def cap(self) -> int:
        return self._budget.cap

    @contextlib.contextmanager
    def slot(self, refusal: str) -> Iterator[None]:
        """Hold one of the budget's slots for the block; ResourceExhaustedError(`refusal`) when
        none is free."""
        if not self._budget.take():
            raise ResourceExhaustedError(refusal)
        try:
            yield
        finally:
            self._budget.give_back()

    async def wait(self, controller: Controller, change: Change, context: aio.ServicerContext,
                   timeout: float = MAX_WAIT, *, give_up: bool = True) -> Change:
        """`change`'s final record; UnavailableError when the run stops first. At `timeout`
        seconds, or just before the call's deadline: WaitTimeoutError if `give_up`, else the
        change as it is then (pending). Call it holding a `slot`."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + min(timeout, math.inf if remaining is None else remaining - _WAIT_MARGIN)
        with self._wakeups.waiting(change.id) as waiter:
            # Read it again once the waiter is registered: it may have ended before (a submit
            # returns from an executor thread), and then no wakeup would ever come.
            current = controller.get_change(change.id)
            if current.status is not ChangeStatus.PENDING:
                return current
            while waiter.record is None:
                if controller.snapshot().phase is Phase.STOPPED:
                    raise UnavailableError(
                        f"the trainer stopped before change {change.description!r} was due; it "
                        "stays pending in the checkpoint and applies after the restart: wait "
                        "for it then (retry with the same request_id)")
                if self._wakeups.closed:
                    raise UnavailableError("the server is stopping; retry once it is back")
                left = deadline - loop.time()
                if left <= 0:
                    if give_up:
                        raise WaitTimeoutError(
                            f"change {change.description!r} was not applied in time; it stays pending")
                    return controller.get_change(change.id)
                await self._wakeups.sleep(waiter, left)
            return waiter.record
