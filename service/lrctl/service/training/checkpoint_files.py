"""The files of a checkpoint folder, apart from what writes them: the atomic JSON write, the
`latest.json` pointer, and validating the checkpoints found (`scan`). No Keras.

    ckpt-N.weights.h5     model.save_weights (the optimizer's state included)
    ckpt-N.control.json   Controller.export_state(), the run's lineage and when it was saved
    latest.json           {"step": N, "weights": ..., "control": ..., "lineage": ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import h5py

from lrctl.service.control.checkpoint_paths import (  # re-exported: checkpoints.py, tests
    LATEST,
    NAME,
    one_line,
    read_pointer,
)
from lrctl.service.control.disk import fsync_path, remove, write_bytes
from lrctl.service.control.persistence import STATE_FORMAT

#: Temporary files start with this, then the writer's pid: `{TMP}{pid}-{name}`.
TMP = ".tmp-"
#: What `Controller.import_state` reads from a control file.
_STATE_KEYS = ("format", "step", "version", "schedule", "next_id", "pending", "finished", "history")


def write_json(path: str, data: Any) -> None:
    """Write `data` as JSON to `path` atomically: a temporary file, fsync, rename, fsync the
    folder. A reader sees the old file or the new one, never part of one. Raises OSError
    (and leaves no temporary file) if the disk refuses."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP}{os.getpid()}-{os.path.basename(path)}")
    try:
        write_bytes(tmp, json.dumps(data, allow_nan=True).encode())
        os.replace(tmp, path)
    except OSError:
        remove(tmp)
        raise
    fsync_path(folder)


def latest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pointer to the newest complete checkpoint in `directory`, or None if there is no
    valid pointer (`Checkpointer.restore` then looks for the newest valid checkpoint)."""
    return read_pointer(os.fspath(directory))[0]


@dataclasses.dataclass(frozen=True)
class Found:
    """A complete pair of checkpoint files, validated."""

    stem: str  #: "ckpt-N"
    step: int
    state: dict[str, Any] | None  #: the control state; None if invalid
    problem: str  #: what is wrong ("" if valid)
    saved: float  #: when it was saved: the control file's "saved_time", else the files' mtime

    @property
    def lineage(self) -> str:
        return str((self.state or {}).get("lineage", ""))


def _read_state(path: str) -> tuple[dict[str, Any] | None, str]:
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        return None, f"{name} cannot be read ({e.strerror or e})"
    except ValueError as e:
        return None, f"{name} is not valid JSON ({one_line(e)})"
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        return None, f"{name} is not an lrctl control state of format {STATE_FORMAT}"
    missing = [k for k in _STATE_KEYS if k not in data]
    if missing:
        return None, f"{name} lacks {', '.join(missing)}"
    return data, ""


def _check_weights(path: str) -> str:
    """"" if `path` is a readable HDF5 file, else what is wrong. Opening checks the file's
    end against its superblock (a truncated file fails); visiting every object reads all the
    metadata (not the data: it has no checksums to check)."""
    try:
        with h5py.File(path, "r") as f:
            f.visit(lambda _: None)
    except Exception as e:  # noqa: BLE001 -- any failure to read it makes it unusable
        return f"{os.path.basename(path)} is not a readable HDF5 file ({one_line(e)[:160]})"
    return ""



def scan(directory: str) -> tuple[dict[str, Found], list[str]]:
    """The complete pairs of checkpoint files, validated, and the files that are none."""
    names = os.listdir(directory)
    halves: dict[str, set[str]] = {}
    for name in names:
        if m := NAME.match(name):
            halves.setdefault(f"ckpt-{m.group(1)}", set()).add(name)
    found: dict[str, Found] = {}
    strays: list[str] = []
    for stem, present in halves.items():
        if len(present) < 2:
            strays.extend(present)  # e.g. a weights file with no control file
            continue
        weights, control = (os.path.join(directory, stem + s)
                            for s in (".weights.h5", ".control.json"))
        state, problem = _read_state(control)
        problem = problem or _check_weights(weights)
        try:
            saved = float((state or {}).get("saved_time") or max(
                os.path.getmtime(weights), os.path.getmtime(control)))
        except (OSError, TypeError, ValueError):
            saved = 0.0
        found[stem] = Found(stem, int(stem.removeprefix("ckpt-")), state if not problem else None,
                             problem, saved)
    return found, strays


__all__ = ["LATEST", "NAME", "TMP", "Found", "latest", "one_line", "read_pointer", "scan", "write_json"]
