"""Training throughput over a sliding window of wall-clock time.

An orchestrator compares runs by steps per second, so the figure must be steady: measured
between two publications 0.1 s apart it swings with every validation pass and every GC pause.
Over the last `WINDOW` seconds it is the rate a person would read off a clock."""

from __future__ import annotations

from collections import deque

#: Seconds of history the rate is measured over, once the run is that old.
WINDOW = 10.0
#: The shortest span a rate is reported for: the first figure comes this soon after the start.
MIN_SPAN = 0.05
#: Samples are kept this far apart, so the history stays ~20 entries however often we publish.
_SPACING = WINDOW / 20


class Throughput:
    """Steps per second over the last `WINDOW` seconds. Not thread-safe: the caller locks."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, float]] = deque()  # (step, time), oldest first

    def observe(self, step: int, now: float) -> float | None:
        """Record that training was at `step` at `now`; the rate up to here, or None while too
        little time has passed to measure one."""
        samples = self._samples
        if samples and (step < samples[-1][0] or now < samples[-1][1]):
            samples.clear()  # a restore went back, or the clock did: start over
        if not samples or now - samples[-1][1] >= _SPACING:
            samples.append((step, now))
        # Keep one sample at or before the window's start, so the span covers the whole window.
        while len(samples) > 1 and samples[1][1] <= now - WINDOW:
            samples.popleft()
        first_step, first_time = samples[0]
        span = now - first_time
        return (step - first_step) / span if span >= MIN_SPAN else None
