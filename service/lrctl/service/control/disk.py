"""Disk checks and writes for checkpoints and journals: pure `os`, so `lrctl-trainer` can refuse
an unusable folder before TensorFlow loads."""

from __future__ import annotations

import contextlib
import os

_TMP = ".tmp-"
#: Free space a checkpoint folder must have at start-up (a run that cannot write even one
#: small checkpoint is refused before it trains for hours).
MIN_FREE_BYTES = 16 * 2**20


class CheckpointError(Exception):
    """A checkpoint folder cannot be used: nothing in it can be resumed from, or it cannot be
    written. The message is one line naming the folder and the files."""


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # cleanup after a failure: the failure is reported
            os.remove(path)


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged writer may still use on `directory`'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_writable(directory: str | os.PathLike[str], *, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse a folder that cannot take a checkpoint (or a journal): create it if missing,
    write, fsync and remove a probe file, and ask for `min_free` bytes free. Raises
    CheckpointError with one line naming the folder."""
    directory = os.fspath(directory)
    probe = os.path.join(directory, f"{_TMP}{os.getpid()}-probe")
    try:
        os.makedirs(directory, exist_ok=True)
        write_bytes(probe, b"lrctl")
        os.remove(probe)
        free = free_bytes(directory)
    except OSError as e:
        remove(probe)
        raise CheckpointError(f"{directory} is not writable: {e.strerror or e}") from None
    if free < min_free:
        raise CheckpointError(f"{directory} has {free / 2**20:.1f} MiB free; at least "
                              f"{min_free / 2**20:.0f} MiB are needed")
