"""The run's measurements (ListMeasurements): the batch and epoch logs the trainer recorded, the
last `MAX_MEASUREMENTS`, so that a population-based training controller that reconnects reads
the evaluations it missed instead of only the latest state.

What is recorded: every epoch's end-of-epoch logs (`val_*` included); a batch's logs at most
once per `interval` seconds, and the first logs taken after each applied change (so every
change is followed by a measurement of its effect, however fast the steps).

Sequence numbers count from 1 and increase by one per measurement, also across a restart (the
counter rides in the checkpoint's control state), so the ring is indexed by arithmetic: the
measurement numbered `s` sits at slot `s % capacity` while `s` is among the kept ones, and a
page costs O(page size). Not thread-safe: the controller holds its lock around every call.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping

from lrctl.service.control.limits import MAX_MEASUREMENTS

#: Seconds between two batch measurements, at least (an applied change or an epoch end records
#: at once).
BATCH_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One set of logs: `metrics` taken after `step` steps, in `epoch`, at `time` (epoch
    seconds); `epoch_end`: an epoch's end-of-epoch logs rather than a batch's."""

    sequence: int
    step: int
    epoch: int
    metrics: Mapping[str, float]
    epoch_end: bool
    time: float


@dataclasses.dataclass(frozen=True)
class Page:
    items: list[Measurement]
    #: The sequence the next page continues after (the last one examined, or where the reader
    #: stood if nothing newer is kept yet).
    after_sequence: int
    #: Whether measurements between the reader's position and the first item were dropped.
    truncated: bool


class Measurements:
    """A bounded ring of the newest `capacity` measurements."""

    def __init__(self, capacity: int = MAX_MEASUREMENTS, interval: float = BATCH_INTERVAL) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self.capacity = capacity
        self.interval = interval
        self._slots: list[Measurement | None] = [None] * capacity
        #: The newest sequence number handed out (0: none).
        self.last_sequence = 0
        #: The oldest sequence number kept (last_sequence + 1 when none is kept).
        self.oldest_sequence = 1
        #: The counter a restart resumed from: the measurements numbered up to it were the
        #: previous process's (some after the checkpoint may have been handed out and lost).
        self.resumed_sequence = 0
        #: The highest step of a measurement no longer kept (-1: none dropped).
        self.dropped_step = -1
        self._last_batch = -math.inf  # monotonic seconds of the last batch measurement
        self._covered_change = -1  # the change step the last batch measurement came after

    def __len__(self) -> int:
        return self.last_sequence - self.oldest_sequence + 1

    def resume(self, sequence: int, step: int) -> None:
        """A restart from a checkpoint whose counter was `sequence`, at `step`: numbering goes
        on after it; the measurements before it are not kept here."""
        if sequence <= self.last_sequence:
            return
        self._slots = [None] * self.capacity
        self.last_sequence = self.resumed_sequence = sequence
        self.oldest_sequence = sequence + 1
        self.dropped_step = max(self.dropped_step, step)

    def batch(self, *, step: int, epoch: int, metrics: Mapping[str, float], time: float,
              now: float, changed_step: int) -> Measurement | None:
        """A batch's logs, taken after `step` steps: recorded if `interval` seconds have passed
        (`now`: monotonic) since the last batch measurement, or if they are the first taken
        after the change applied at `changed_step`. Returns the measurement, or None."""
        after_change = changed_step > self._covered_change and step > changed_step
        if not metrics or (not after_change and now - self._last_batch < self.interval):
            return None
        self._last_batch = now
        self._covered_change = max(self._covered_change, changed_step) if step > changed_step \
            else self._covered_change
        return self._add(step, epoch, metrics, False, time)

    def epoch_end(self, *, step: int, epoch: int, metrics: Mapping[str, float], time: float) -> Measurement:
        """An epoch's end-of-epoch logs: always recorded."""
        return self._add(step, epoch, metrics, True, time)

    def _add(self, step: int, epoch: int, metrics: Mapping[str, float], epoch_end: bool,
             time: float) -> Measurement:
        sequence = self.last_sequence + 1
        measurement = Measurement(sequence, step, epoch, dict(metrics), epoch_end, time)
        slot = sequence % self.capacity
        if len(self) == self.capacity:
            dropped = self._slots[slot]
            assert dropped is not None and dropped.sequence == self.oldest_sequence
            self.dropped_step = max(self.dropped_step, dropped.step)
            self.oldest_sequence += 1
        self._slots[slot] = measurement
        self.last_sequence = sequence
        return measurement

    def _at(self, sequence: int) -> Measurement:
        measurement = self._slots[sequence % self.capacity]
        assert measurement is not None and measurement.sequence == sequence
        return measurement

    def position(self, after_sequence: int, *, same_process: bool) -> int:
        """Where a reader's token (`after_sequence`, issued by this process or not) stands
        here. A token of an earlier process that went past the checkpoint this one resumed
        from saw measurements this process numbers anew: it goes on from the checkpoint's."""
        if not same_process and after_sequence > self.resumed_sequence:
            return self.resumed_sequence
        return min(after_sequence, self.last_sequence)

    def page(self, after_sequence: int | None, start_step: int, size: int) -> Page:
        """Up to `size` measurements numbered after `after_sequence` (None: from the oldest
        kept at or after `start_step`, found by bisection: steps only grow within a run) with
        `step >= start_step`, oldest first. Examines at most `size` measurements past the
        starting point, so a filter that matches nothing still costs O(size)."""
        if after_sequence is None:
            first = self._first_at_or_after(start_step)
            reader = first - 1
            truncated = self.dropped_step >= start_step  # some dropped one may have qualified
        else:
            reader = after_sequence
            first = max(reader + 1, self.oldest_sequence)
            truncated = first > reader + 1 and self.dropped_step >= start_step
        items: list[Measurement] = []
        last = min(self.last_sequence, first + size - 1)
        for sequence in range(first, last + 1):
            measurement = self._at(sequence)
            if measurement.step >= start_step:
                items.append(measurement)
        return Page(items, max(reader, last), truncated)

    def _first_at_or_after(self, start_step: int) -> int:
        """The first kept sequence whose step is >= start_step (last_sequence + 1: none)."""
        lo, hi = self.oldest_sequence, self.last_sequence + 1
        return lo + bisect.bisect_left(range(lo, hi), start_step, key=lambda s: self._at(s).step)


__all__ = ["BATCH_INTERVAL", "Measurement", "Measurements", "Page"]
