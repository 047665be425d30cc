"""lrctl's own logging hygiene: client strings cut to one short line, and a rate limit on
gRPC's logs. Pure Python."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

#: Seconds: at most one record per logging call site in this window.
LOG_INTERVAL = 60.0


def short(text: str, limit: int = 80) -> str:
    """`text` on one line and at most `limit` characters, for logging client-supplied strings
    (a `reason` could otherwise flood the log or forge extra log lines)."""
    flat = text.replace("\r", " ").replace("\n", " ")
    return flat if len(flat) <= limit else flat[: max(limit - 1, 0)] + "…"


class RateLimitFilter(logging.Filter):
    """Lets through at most one record per `interval` seconds from each logging call site.

    gRPC logs a full traceback for every request it cannot deserialize: a client sending
    garbage in a loop would otherwise fill the disk. The first record passes; later ones in
    the window are counted and the next record to pass says how many were dropped.
    """

    def __init__(self, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # (logger, file, line) -> (when one last passed, how many dropped since). Call sites
        # are finitely many, so this stays small whatever the messages say.
        self._sites: dict[tuple[str, str, int], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.pathname, record.lineno)
        now = self._clock()
        with self._lock:
            passed_at, dropped = self._sites.get(key, (-math.inf, 0))
            if now - passed_at < self.interval:
                self._sites[key] = (passed_at, dropped + 1)
                return False
            self._sites[key] = (now, 0)
        if dropped:
            record.msg = (f"{record.getMessage()} [{dropped} more like this in the last "
                          f"{now - passed_at:.0f} s were not logged]")
            record.args = None
        return True


def rate_limit_logs(logger_names: tuple[str, ...], interval: float = LOG_INTERVAL) -> None:
    """Install one RateLimitFilter on each named logger, once per process."""
    shared: RateLimitFilter | None = None
    for name in logger_names:
        target = logging.getLogger(name)
        if any(isinstance(f, RateLimitFilter) for f in target.filters):
            continue
        shared = shared or RateLimitFilter(interval)
        target.addFilter(shared)
