"""Memory and start-up: the trainer's peak RSS with lrctl against plain `fit`, and the
`lrctl state` CLI's wall time and peak RSS against `python -c 'import tensorflow'`.

    python bench/footprint.py [--steps 300] [--repeats 3] [--quick]

Each trainer variant runs in a fresh process (best of --repeats: allocator noise) and reports
its own peak RSS (`ru_maxrss`). `lrctl state` runs against a live trainer (bench/_common.py's
child); its peak RSS comes from `wait4`. `cli_imports_tensorflow` says whether the CLI
process loaded TensorFlow (a client-only install cannot). The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import BATCH, TrainerProcess, emit


def _child(variant: str, steps: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from _common import seed_data, seed_model

    model = seed_model()
    x, y = seed_data(steps)
    callbacks: list[Any] = []
    if variant == "lrctl":
        from lrctl.service import TrainingControl
        from lrctl.service.rpc.server import serve

        control = TrainingControl(model.optimizer)
        with serve(control.controller, "127.0.0.1:0"):
            model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[control.callback])
    else:
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=callbacks)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _peak_mib(variant: str, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(steps)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one process."""
    begin = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - begin
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode})")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps per epoch (2 epochs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small run (CI)")
    parser.add_argument("--child", choices=("plain", "lrctl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.steps)
        return
    if args.quick:
        args.steps, args.repeats = min(args.steps, 20), 1
    peaks = {v: min(_peak_mib(v, args.steps) for _ in range(args.repeats)) for v in ("plain", "lrctl")}
    cli = os.path.join(os.path.dirname(sys.executable), "lrctl")
    probe = ("import runpy, sys; sys.argv = ['lrctl'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('lrctl.client.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('TF', 'tensorflow' in sys.modules)")
    state_runs, tf_runs = [], []
    with TrainerProcess() as trainer:
        for _ in range(args.repeats):
            state_runs.append(_timed([cli, "state", "--target", trainer.target]))
            tf_runs.append(_timed([sys.executable, "-c", "import tensorflow"]))
        probe_out = _timed([sys.executable, "-c", probe, "state", "--target", trainer.target])[2]
    emit({
        "trainer_peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()},
        "trainer_rss_added_mib": round(peaks["lrctl"] - peaks["plain"], 1),
        "trainer_rss_ratio": round(peaks["lrctl"] / peaks["plain"], 3),
        "lrctl_state_wall_s": round(min(r[0] for r in state_runs), 3),
        "lrctl_state_peak_rss_mib": round(min(r[1] for r in state_runs), 1),
        "import_tensorflow_wall_s": round(min(r[0] for r in tf_runs), 3),
        "import_tensorflow_peak_rss_mib": round(min(r[1] for r in tf_runs), 1),
        "cli_imports_tensorflow": "TF True" in probe_out,
        "config": {"steps": args.steps, "repeats": args.repeats, "quick": args.quick, "cpus": os.cpu_count()},
    })


if __name__ == "__main__":
    main()
