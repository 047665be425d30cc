"""A stand-in orchestrator for the benchmarks, in its own process as it would be in real use:
it scales the learning rate by 1.0 every 50 steps and waits for each change to apply.

    python bench/orchestrator.py PORT     # runs until killed or the server goes away
"""

from __future__ import annotations

import sys

from lrctl.client import LrctlError, TrainingControlClient


def main(port: int) -> None:
    with TrainingControlClient(f"127.0.0.1:{port}") as client:
        try:
            while True:
                step = client.get_state().step
                # The benchmarked model trains only during its own rounds: wait as needed.
                client.scale_learning_rate(1.0, apply_at_step=step + 50, wait=True, timeout=3600)
        except LrctlError:  # the server shut down: the benchmark is over
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
