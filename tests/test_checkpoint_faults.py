"""Issue 16, items 3-6: checkpoints fail safe. Each fault is injected into real files (a
damaged pointer, a truncated checkpoint) or into a real trainer process (tests/faultfs: a full
or read-only disk), and the run must resume from a valid checkpoint with a warning, refuse in
one line (exit 3), or go on training and say so: never start over silently, never crash."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tiny
from live import state_until
from test_trainer import LIMIT, TRAINER, _Trainer

from lrctl.client import TrainingControlClient, pb
from lrctl.service.control.disk import CheckpointError
from lrctl.service.training.checkpoint_files import LATEST
from lrctl.service.training.checkpoints import Checkpointer
from lrctl.service.training.integration import TrainingControl

ROOT = Path(__file__).resolve().parent.parent
FAULTFS = ROOT / "tests" / "faultfs"


# --- the library, in process: real training, real files ---------------------------------------


def _checkpointer(directory: Path, every: int = 4, keep: int = 3) -> tuple[Any, TrainingControl, Checkpointer]:
    model = tiny.make_model(0.01)
    control = TrainingControl(model.optimizer)
    return model, control, Checkpointer(control, model, directory, every=every, keep=keep)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the checkpoints of 12 steps: ckpt-4, ckpt-8 and ckpt-12 (the newest)."""
    directory = tmp_path_factory.mktemp("trained")
    model, control, checkpoints = _checkpointer(directory)
    assert checkpoints.restore() is None
    tiny.fit(model, control, 13, checkpoints.callback)  # boundaries 4, 8, 12
    assert checkpoints.last_step == 12
    return directory


def _copy(trained: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(trained, directory)
    return directory


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("pointer", "said"), [
    (None, "latest.json is missing"),
    ("null", "latest.json holds null, not a checkpoint pointer"),
    ("[]", "latest.json holds [], not a checkpoint pointer"),
    ('"ckpt-12"', 'latest.json holds "ckpt-12", not a checkpoint pointer'),
])
def test_a_missing_or_wrong_pointer_falls_back_to_the_newest_checkpoint_with_a_warning(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, pointer: str | None, said: str,
) -> None:
    directory = _copy(trained, tmp_path)
    if pointer is None:
        (directory / LATEST).unlink()
    else:
        (directory / LATEST).write_text(pointer)
    lineage = json.loads((trained / LATEST).read_text())["lineage"]
    model, control, checkpoints = _checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="lrctl.checkpoint"):
        state = checkpoints.restore()
    assert state is not None and control.step == 12 and checkpoints.lineage == lineage
    assert f"{said}; resuming from ckpt-12 (step 12) instead" in caplog.text
    tiny.fit(model, control, 5, checkpoints.callback)  # the run goes on from step 12
    assert control.step == 17 and checkpoints.last_step == 16
    assert json.loads((directory / LATEST).read_text())["lineage"] == lineage


@pytest.mark.parametrize("damaged", ["ckpt-12.weights.h5", "ckpt-12.control.json"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_which_is_never_pruned(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damaged: str,
) -> None:
    directory = _copy(trained, tmp_path)
    _truncate(directory / damaged)
    model, control, checkpoints = _checkpointer(directory, keep=1)
    with caplog.at_level(logging.WARNING, logger="lrctl.checkpoint"):
        assert checkpoints.restore() is not None
    assert control.step == 8
    assert re.search(rf"{re.escape(damaged)} is not .*; resuming from ckpt-8 \(step 8\) instead", caplog.text)
    tiny.fit(model, control, 9, checkpoints.callback)  # checkpoints at 12 (replacing the damaged one), 16
    # keep=1: the newest, and the one recovery used; the lineage's older ones are pruned.
    assert _files(directory) == {LATEST, "ckpt-8.weights.h5", "ckpt-8.control.json",
                                 "ckpt-16.weights.h5", "ckpt-16.control.json", "lrctl-wal.jsonl"}


def test_nothing_valid_raises_one_line_naming_the_folder_and_files(trained: Path, tmp_path: Path) -> None:
    directory = _copy(trained, tmp_path)
    for name in ("ckpt-4.weights.h5", "ckpt-8.control.json", "ckpt-12.weights.h5"):
        _truncate(directory / name)
    _, control, checkpoints = _checkpointer(directory)
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore()
    message = str(info.value)
    assert "\n" not in message and f"no checkpoint in {directory} can be resumed from" in message
    for name in ("ckpt-4.weights.h5", "ckpt-8.control.json", "ckpt-12.weights.h5"):
        assert f"{name} is not" in message
    assert control.step == 0


def test_a_fresh_run_in_an_old_folder_prunes_only_its_own_checkpoints(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Pruning used to keep the highest step numbers: the old run's, deleting the new run's.
    It also counted a weights file without its control file as a checkpoint."""
    directory = _copy(trained, tmp_path)
    shutil.copy(directory / "ckpt-12.weights.h5", directory / "ckpt-100.weights.h5")  # a stray
    old = _files(directory)
    model, control, checkpoints = _checkpointer(directory, every=3, keep=2)
    with caplog.at_level(logging.WARNING, logger="lrctl.checkpoint"):
        assert checkpoints.restore(fresh=True) is None
    assert control.step == 0 and "ckpt-100.weights.h5" in caplog.text
    tiny.fit(model, control, 11, checkpoints.callback)  # its checkpoints at 3, 6, 9 (none is 4, 8 or 12)
    assert _files(directory) == old | {"ckpt-6.weights.h5", "ckpt-6.control.json",
                                       "ckpt-9.weights.h5", "ckpt-9.control.json"}
    pointer = json.loads((directory / LATEST).read_text())
    assert pointer["step"] == 9 and pointer["lineage"] == checkpoints.lineage
    assert checkpoints.lineage != json.loads((trained / LATEST).read_text())["lineage"]


# --- lrctl-trainer: exit codes, a full and a read-only disk -----------------------------------


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRAINER, "--listen", "127.0.0.1:0", "--verbose", "0", *args], env=env,
                          capture_output=True, check=False, text=True, timeout=LIMIT)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line the trainer says when it refuses (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lrctl-trainer: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def demo_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's checkpoints at steps 10 and 15 (the final one), as lrctl-trainer wrote them."""
    directory = tmp_path_factory.mktemp("demo") / "ckpt"
    env = _env()
    result = _run("--demo", "--checkpoint-dir", str(directory), "--checkpoint-every", "5",
                  "--steps", "15", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((directory / LATEST).read_text())["step"] == 15
    return directory


def _env(fault_dir: Path | None = None, trigger: Path | None = None) -> dict[str, str]:
    """What the subprocess_env fixture gives (a module-scoped fixture cannot use it), and the
    fault injector when asked."""
    env = dict(os.environ)
    paths = [str(ROOT / "client"), str(ROOT / "service")]
    if fault_dir is not None and trigger is not None:
        paths.insert(0, str(FAULTFS))
        env.update(LRCTL_FAULT_DIR=str(fault_dir), LRCTL_FAULT_TRIGGER=str(trigger))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("LRCTL_TARGET", None)
    return env


def test_trainer_resumes_past_a_null_pointer_with_a_warning(demo_checkpoints: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoints, directory)
    (directory / LATEST).write_text("null")
    result = _run("--demo", "--checkpoint-dir", str(directory), "--steps", "17", env=_env())
    assert result.returncode == 0, result.stderr
    assert "latest.json holds null, not a checkpoint pointer; resuming from ckpt-15 (step 15)" in result.stderr
    assert "resumed from the checkpoint at step 15 " in result.stderr
    assert json.loads((directory / LATEST).read_text())["step"] == 17


def test_trainer_refuses_a_folder_with_nothing_valid_in_one_line(demo_checkpoints: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoints, directory)
    for path in directory.glob("ckpt-*.weights.h5"):
        _truncate(path)
    result = _run("--demo", "--checkpoint-dir", str(directory), env=_env())
    assert result.returncode == 3
    line = _error_line(result)
    assert f"no checkpoint in {directory} can be resumed from" in line
    assert "ckpt-10.weights.h5 is not" in line and "ckpt-15.weights.h5 is not" in line


def test_trainer_starts_over_in_a_folder_with_checkpoints_only_with_fresh(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / LATEST).write_text("[]")
    (directory / "ckpt-40.weights.h5").write_bytes(b"left over")  # no control file: not a checkpoint
    result = _run("--demo", "--checkpoint-dir", str(directory), env=_env())
    assert result.returncode == 3
    line = _error_line(result)
    assert str(directory) in line and "Pass --fresh" in line and "another --checkpoint-dir" in line

    again = _run("--demo", "--checkpoint-dir", str(directory), "--fresh", "--steps", "3", env=_env())
    assert again.returncode == 0, again.stderr
    assert json.loads((directory / LATEST).read_text())["step"] == 3
    assert (directory / "ckpt-40.weights.h5").read_bytes() == b"left over"


def test_trainer_refuses_a_read_only_checkpoint_folder_or_journal_location(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    trigger = tmp_path / "fault"
    trigger.write_text("readonly")
    env = _env(directory, trigger)
    result = _run("--demo", "--checkpoint-dir", str(directory), env=env)
    assert result.returncode == 3
    assert _error_line(result) == (f"lrctl-trainer: error: --checkpoint-dir: {directory} is not "
                                   "writable: Read-only file system")
    assert list(directory.iterdir()) == []
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc: its read-only root is the journal location this test uses")
    result = _run("--demo", "--journal", "/proc/lrctl/journal.jsonl", env=_env())
    assert result.returncode == 3
    assert _error_line(result).startswith("lrctl-trainer: error: --journal: /proc/lrctl is not writable")


def _failures_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=LIMIT) as response:
        text = response.read().decode()
    match = re.search(r"^lrctl_checkpoint_failures_total (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def _complete(directory: Path) -> dict[str, Any]:
    """The pointer, after checking that it names a complete checkpoint."""
    pointer = json.loads((directory / LATEST).read_text())
    assert (directory / pointer["weights"]).is_file() and (directory / pointer["control"]).is_file()
    assert json.loads((directory / pointer["control"]).read_text())["lineage"] == pointer["lineage"]
    return pointer


def test_a_full_disk_never_stops_training_is_reported_and_checkpoints_resume_once_space_is_back(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "ckpt"
    trigger = tmp_path / "fault"
    run = _Trainer("--demo", "--checkpoint-dir", str(directory), "--checkpoint-every", "20",
                   "--metrics-listen", "127.0.0.1:0", env=_env(directory, trigger))
    try:
        match = re.search(r"metrics on http://[^:]+:(\d+)/metrics", run.stderr)
        assert match, run.stderr
        metrics_port = int(match.group(1))
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            good = state_until(client, lambda s: s.HasField("checkpoint_step"))
            assert good.checkpoint_failures == 0 and _failures_metric(metrics_port) == 0

            # statvfs says the disk is full: the write is refused before h5py starts. A checkpoint
            # already past that check when the trigger appears fails at its next open instead
            # (no "MiB free"), so wait for the first one the check itself refused.
            trigger.write_text("full")
            full = state_until(client, lambda s: "MiB free" in s.checkpoint_error)
            assert "No space left on device" in full.checkpoint_error and full.checkpoint_failures >= 1
            pointer = _complete(directory)
            assert pointer["step"] == full.checkpoint_step

            # Writes fail part-way (the weights are written, the control file is not).
            trigger.write_text("write-fails")
            failing = state_until(client, lambda s: s.checkpoint_failures > full.checkpoint_failures)
            assert "No space left on device" in failing.checkpoint_error
            assert _complete(directory) == pointer  # never a pointer to a partial checkpoint
            assert failing.phase == pb.PHASE_TRAINING
            state_until(client, lambda s: s.step > full.step)  # training goes on (the state's step lags)
            assert _failures_metric(metrics_port) >= failing.checkpoint_failures

            trigger.unlink()  # space is back: the next interval writes a checkpoint
            back = state_until(client, lambda s: s.checkpoint_error == ""
                               and s.checkpoint_step > pointer["step"])
            assert back.checkpoint_failures >= failing.checkpoint_failures
            assert _complete(directory)["step"] >= back.checkpoint_step > pointer["step"]
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr
    finally:
        run.process.kill()
    assert "Traceback" not in run.stderr, run.stderr
    assert "failure(s) so far" in run.stderr
    names = _files(directory)
    assert not [n for n in names if n.startswith(".tmp-")], names
    stems = {n.split(".")[0] for n in names if n.startswith("ckpt-")}
    assert names == {LATEST, "lrctl-journal.jsonl", "lrctl-wal.jsonl", *(f"{s}.weights.h5" for s in stems),
                     *(f"{s}.control.json" for s in stems)}  # complete pairs only
    assert len(stems) == 2  # --keep-checkpoints' default
