"""The bench scripts' --quick paths run and report correct results: JSON keys present, no
change lost or applied twice, no retrace on change. Never speed: CI machines are noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorflow")

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_quick(script: str, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, str(BENCH / script), "--quick", *extra], check=False,
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_overhead_quick() -> None:
    result = run_quick("overhead.py", "--variants", "plain", "lrctl_full", "--steps", "10")
    assert {"ratio", "added_us_per_step"} <= result.keys()
    assert {"median", "mean", "ci95"} <= result["added_us_per_step"].keys()


def test_swap_quick_applies_without_retrace() -> None:
    result = run_quick("swap.py", "--changes", "6", "--retrace-changes", "1")
    assert {"retraces", "ms_per_change"} <= result.keys()
    assert result["retraces"] == 0
    assert result["applied"] == result["changes"] == 6


def test_latency_quick() -> None:
    result = run_quick("latency.py", "--calls", "50", "--writes", "5", "--watches", "3")
    assert {"get_state_p50_ratio", "get_state", "echo", "set_learning_rate", "set_learning_rate_wait",
            "watch_delivery"} <= result.keys()
    assert {"p50_ms", "p99_ms"} <= result["get_state"].keys()
    assert result["watch_delivery"]["n"] == 3


def _head_or_skip() -> str:
    """This checkout's commit: the --baseline tests run it as the previous implementation too
    (the old API's calls against it), since older commits may be missing from a shallow clone."""
    out = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "HEAD"], check=False,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.strip()


def test_latency_quick_against_a_baseline() -> None:
    sha = _head_or_skip()
    result = run_quick("latency.py", "--baseline", "HEAD")
    new, old = result["sides"]["new"], result["sides"]["baseline"]
    # The baseline child imported the materialized tree's lrctl, not this checkout's.
    assert f"lrctl-bench/{sha}/service/lrctl/service/" in old["source"]["lrctl"]
    assert "lrctl-bench" not in new["source"]["lrctl"]
    for side, waits in ((new, ("wait_change", "wait_until_applied")),
                        (old, ("wait_until_applied", "poll_list_changes"))):
        assert side["get_state"]["n"] == side["echo"]["n"] > 0
        assert side["get_state_over_echo"]["median"] > 0
        for name in waits:  # every timed change applied, after its wait began
            assert side[name]["n"] + side["late"][name] == 4
            assert side[name]["median_ms"] > 0
    # BASIC leaves the recent changes out; the baseline's view-less GetState has them.
    assert new["response_bytes"] < old["response_bytes"]
    assert {"get_state", "get_state_over_echo", "wait_change_over_wait_until_applied",
            "wait_change_over_poll_list_changes"} <= result["new_over_baseline"].keys()
    assert "get_state_basic_over_echo" in result
    # Issue 20: SetLearningRate against the echo, and the waiting submit against a step.
    for side in (new, old):
        assert side["set_learning_rate"]["n"] == side["echo_set"]["n"] == side["set_wait"]["n"] > 0
        assert side["set_learning_rate_over_echo"]["median"] > 0
        assert side["step_ms"]["median"] > 0 and side["set_wait_over_step_plus_echo"]["median"] > 0
    assert {"set_learning_rate", "set_wait"} <= result["new_over_baseline"].keys()


def test_swap_quick_against_a_baseline() -> None:
    sha = _head_or_skip()
    result = run_quick("swap.py", "--baseline", "HEAD")
    new, old = result["sides"]["new"], result["sides"]["baseline"]
    assert f"lrctl-bench/{sha}/service/lrctl/service/" in old["source"]["lrctl"]
    assert "lrctl-bench" not in new["source"]["lrctl"]
    for side in (new, old):  # every change applied at its boundary (the worker checks), no retrace
        assert side["ms_per_change"]["n"] == 12 and side["retraces"] == 0
        assert set(side["ms_per_change_by_kind"]) == {"set", "scale", "swap"}
    assert result["new_over_baseline"]["ms_per_change"]["n"] == 2
    assert {"target_median_lt_1_ms", "target_p90_lt_1_5_ms"} <= result.keys()


def test_load_quick_against_a_baseline() -> None:
    _head_or_skip()
    result = run_quick("load.py", "--baseline", "HEAD", "--phase-s", "0.3")
    for side in result["sides"].values():
        assert set(side["steps_per_s"]) == {"none", "busy", "reads_100", "reads_1000"}
        assert side["steps_per_s"]["none"]["median"] > 0
        assert {"ratio_busy", "ratio_reads_100", "ratio_reads_1000", "reads_100_over_busy"} <= side.keys()
        for phase in ("reads_100", "reads_1000"):
            assert side["reads"][phase]["sent"] > 0
            assert side["reads"][phase]["codes"].get("OK", 0) > 0
    assert result["sides"]["new"]["state_bytes"] < result["sides"]["baseline"]["state_bytes"]
    assert {"ratio_busy", "ratio_reads_100", "ratio_reads_1000"} <= result["new_over_baseline"].keys()
    assert isinstance(result["target_reads_100_ge_busy"], bool)


def test_load_quick_loses_and_duplicates_nothing() -> None:
    result = run_quick("load.py", "--clients", "4", "--phase-s", "0.5", "--max-calls", "100")
    assert {"lost", "duplicated", "ratio_100", "codes"} <= result.keys()
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["out_of_order"] == 0
    assert result["retry_mismatch"] == 0
    assert result["accepted"] > 0


def test_footprint_quick() -> None:
    result = run_quick("footprint.py", "--steps", "5")
    assert {"trainer_peak_rss_mib", "lrctl_state_wall_s", "lrctl_state_peak_rss_mib",
            "import_tensorflow_wall_s"} <= result.keys()
    assert result["cli_imports_tensorflow"] is False


def test_multiworker_quick() -> None:
    result = run_quick("multiworker.py")
    assert {"ms_per_step", "added_ms_per_step", "ratio"} <= result.keys()
    assert result["workers"] == 2 and result["rounds"] == 1


def test_collective_floor_quick() -> None:
    """Two processes run lrctl's exchange launcher back to back; each checks every sum."""
    result = run_quick("collective_floor.py")
    assert result["exchanges"] == 10 and len(result["workers"]) == 2
    for worker in result["workers"]:
        assert worker["launch_ms"] > 0 and worker["cpu_ms_per_exchange"] > 0
