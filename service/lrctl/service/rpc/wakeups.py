"""From the controller's publishes to the server's event loop: waking waiters and watchers
without a thread each and without polling.

The controller calls one listener per server after each publish, on the publishing thread
under its lock, and a step publishes often (hundreds of times a second while changes come and
go). The listener only keeps the latest snapshot and the changes that ended, and schedules one
hand-off to the loop unless one is scheduled already: however many calls wait or watch, a
burst of publishes costs one `call_soon_threadsafe`. On the loop the hand-off resolves the
waiters of the changes that ended, wakes every waiter on a phase change (STOPPED answers them
UNAVAILABLE), and wakes only the watchers whose condition may now hold: all of them when the
version, phase or epoch moved; those whose step trigger was reached; those whose interval has
passed and who wait for anything new. A watcher within its interval sleeps on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator

from lrctl.service.control.changes import Change, Phase, Snapshot
from lrctl.service.control.controller import Controller


class ChangeWaiter:
    """One call waiting for a change to end; registered for the whole wait (`Wakeups.waiting`)."""

    __slots__ = ("change_id", "record", "woken")

    def __init__(self, change_id: int) -> None:
        self.change_id = change_id
        #: The change's final record, once the loop has heard it ended (kept: a later wake for
        #: another reason must not lose it).
        self.record: Change | None = None
        self.woken = asyncio.Event()  # set at its end, on a phase change, and at shutdown


class Wakeups:
    """The loop's side of one server's listener. Create it on the loop; `attach` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # -- shared with the publishing threads, under `_lock` (held for a few assignments) --
        self._lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._latest: Snapshot | None = None
        self._ended: list[Change] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._bound: Controller | None = None
        # -- the loop's own ----------------------------------------------------------------
        #: The controller and the latest snapshot handed to the loop (None: none bound yet).
        self.controller: Controller | None = None
        self.snapshot: Snapshot | None = None
        self.closed = False
        self._waiters: dict[int, set[ChangeWaiter]] = {}
        self._watchers: set[asyncio.Future[None]] = set()  # woken when version/phase/epoch move
        self._any: set[asyncio.Future[None]] = set()  # woken by the next publish at all
        self._steps: list[tuple[int, int, asyncio.Future[None]]] = []  # heap: woken at a step
        self._order = itertools.count()

    # -- any thread -----------------------------------------------------------------------------
    def attach(self, controller: Controller) -> None:
        """Listen to `controller` (once bound; from the binding thread or the loop)."""
        unsubscribe = controller.listen(self._on_publish)
        with self._lock:
            closed = self._closed
            if not closed:
                self._unsubscribe, self._bound = unsubscribe, controller
        if closed:
            unsubscribe()
            return
        self._on_publish(controller.snapshot(), ())  # the state when bound, before any publish

    def _on_publish(self, snapshot: Snapshot, ended: tuple[Change, ...]) -> None:
        # The controller's listener: its lock is held, so only record and schedule.
        with self._lock:
            if self._closed:
                return
            if self._latest is None or snapshot.seq >= self._latest.seq:
                self._latest = snapshot  # `attach`'s first snapshot may race a newer publish
            self._ended.extend(ended)
            if not self._scheduled:
                self._scheduled = True
                if asyncio._get_running_loop() is self._loop:
                    # A submit on the loop itself: no wake-up of the loop through its self-pipe.
                    self._loop.call_soon(self._deliver)
                else:
                    self._loop.call_soon_threadsafe(self._deliver)

    # -- the loop -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop listening and wake everyone (the server is stopping)."""
        with self._lock:
            self._closed = True
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        self.closed = True
        self._wake_waiters()
        self._wake(self._watchers)

    def _deliver(self) -> None:
        with self._lock:
            snapshot, ended, controller = self._latest, self._ended, self._bound
            self._ended, self._scheduled = [], False
        if snapshot is None or self.closed:
            return
        self.controller = controller
        previous, self.snapshot = self.snapshot, snapshot
        for change in ended:
            for waiter in self._waiters.get(change.id, ()):
                waiter.record = change
                waiter.woken.set()
        if previous is None or snapshot.phase is not previous.phase or snapshot.phase is Phase.STOPPED:
            self._wake_waiters()
        if previous is None or (snapshot.version, snapshot.phase, snapshot.epoch) != (
                previous.version, previous.phase, previous.epoch):
            self._wake(self._watchers)
        else:
            self._wake(self._any)
        steps = self._steps
        while steps and steps[0][0] <= snapshot.step:
            _wake(heapq.heappop(steps)[2])

    def _wake_waiters(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.woken.set()

    def _wake(self, futures: set[asyncio.Future[None]]) -> None:
        for future in futures:
            _wake(future)

    @contextlib.contextmanager
    def waiting(self, change_id: int) -> Iterator[ChangeWaiter]:
        """Register a waiter for `change_id` for the duration of the block, then read the
        change's current record (no `await` between): an ending after the read reaches the
        loop only after the registration, so it cannot be missed."""
        waiter = ChangeWaiter(change_id)
        self._waiters.setdefault(change_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters[change_id]
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[change_id]

    @property
    def waiter_count(self) -> int:
        return sum(map(len, self._waiters.values()))

    async def sleep(self, waiter: ChangeWaiter, timeout: float) -> None:
        """Until `waiter` is woken (cleared first) or `timeout` seconds pass."""
        waiter.woken.clear()
        if self.closed:
            return
        timer = self._loop.call_later(max(timeout, 0.0), waiter.woken.set)
        try:
            await waiter.woken.wait()
        finally:
            timer.cancel()

    async def next_update(self, *, any_publish: bool = False, at_step: int | None = None,
                          until: float | None = None) -> None:
        """Return once the version, phase or epoch moved (or the controller is bound), or the
        server stops; and, if asked, at the next publish at all (`any_publish`), at the first
        publish at or past step `at_step`, or at loop time `until`."""
        if self.closed:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._watchers.add(future)
        if any_publish:
            self._any.add(future)
        if at_step is not None:
            if len(self._steps) > 2 * len(self._watchers) + 64:  # drop the triggers of woken ones
                self._steps = [entry for entry in self._steps if not entry[2].done()]
                heapq.heapify(self._steps)
            heapq.heappush(self._steps, (at_step, next(self._order), future))
        timer = self._loop.call_at(until, _wake, future) if until is not None else None
        try:
            await future
        finally:
            self._watchers.discard(future)
            self._any.discard(future)
            if timer is not None:
                timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
