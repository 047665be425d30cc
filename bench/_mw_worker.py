"""One worker of the multi-worker demo (lrctl.service.apps.multi_worker, run as is) that also
reports its steady state, for bench/multiworker.py: the time between its step boundaries after
the first WARMUP (tracing, the first collectives), its CPU time per step (all its threads: the
collectives' included), the time inside each step boundary and each exchange boundary
(`WorkerSync.boundary`), and, where the exchange is pipelined, the time spent waiting for the
collective launched one boundary before. Works with any lrctl that has these names, so the
same child measures a baseline tree (its service/ first on PYTHONPATH). Last stdout line: JSON."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import lrctl.service
from lrctl.service.apps import multi_worker
from lrctl.service.training import exchange
from lrctl.service.training.integration import TrainingControl

WARMUP = 50

boundaries: list[float] = []  # perf_counter after each step_boundary
cpu: list[float] = []  # this process's CPU time (all its threads) after each step_boundary
in_step_boundary: list[float] = []  # seconds inside step_boundary (the exchange, publishing)
in_boundary: list[float] = []  # seconds inside WorkerSync.boundary
waited: list[float] = []  # seconds waiting for an exchange in flight (pipelined only)


def timed(original: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)
    return wrapper


def main() -> int:
    original = TrainingControl.step_boundary

    def step_boundary(self: TrainingControl, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        ended = original(self, *args, **kwargs)
        boundaries.append(time.perf_counter())
        cpu.append(time.process_time())
        in_step_boundary.append(boundaries[-1] - started)
        return ended

    TrainingControl.step_boundary = step_boundary  # type: ignore[method-assign]
    sync = exchange.WorkerSync
    sync.boundary = timed(sync.boundary, in_boundary)  # type: ignore[method-assign]
    launched = getattr(exchange, "Launched", None)
    if launched is not None:
        launched.result = timed(launched.result, waited)
    rc = multi_worker.main(sys.argv[1:])
    steady = boundaries[WARMUP:]
    gaps = [b - a for a, b in itertools.pairwise(steady)]

    def ms(xs: list[float]) -> float | None:
        return round(1e3 * statistics.fmean(xs), 4) if xs else None

    print(json.dumps({
        "lrctl": lrctl.service.__file__, "steady_steps": len(gaps),
        "ms_per_step": ms(gaps), "median_ms_per_step": round(1e3 * statistics.median(gaps), 4),
        "cpu_ms_per_step": round(1e3 * (cpu[-1] - cpu[WARMUP]) / len(gaps), 4) if gaps else None,
        "ms_in_step_boundary": ms(in_step_boundary[WARMUP:]),
        "ms_in_exchange_boundary": ms(in_boundary[WARMUP:]), "ms_waiting_for_collective": ms(waited[WARMUP:]),
    }), flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
