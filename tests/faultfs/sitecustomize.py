"""Fault injection into a real `lrctl-trainer` process (tests/test_checkpoint_faults.py).

Python imports `sitecustomize` at start-up when this folder is on PYTHONPATH. It makes file
system calls under LRCTL_FAULT_DIR fail for as long as the file LRCTL_FAULT_TRIGGER exists,
with the fault its content names:

- "readonly": opening a file for writing, or making a folder, fails with EROFS;
- "full": statvfs reports no free space, and opening a file for writing fails with ENOSPC;
- "write-fails": opening a file for writing fails with ENOSPC (statvfs tells the truth, so
  a write starts, h5py's weights included, and fails part-way).

Only Python-level calls are intercepted (h5py opens files in C); that is what the checkpoint
code's checks and writes go through.
"""

from __future__ import annotations

import builtins
import errno
import os

_DIR = os.path.abspath(os.environ.get("LRCTL_FAULT_DIR", "/nonexistent-lrctl-fault-dir"))
_TRIGGER = os.environ.get("LRCTL_FAULT_TRIGGER", "")
_open, _os_open, _mkdir, _statvfs = builtins.open, os.open, os.mkdir, os.statvfs


def _fault(path: object) -> str:
    if not _TRIGGER or not isinstance(path, (str, bytes, os.PathLike)):
        return ""  # a file descriptor
    full = os.path.abspath(os.fsdecode(path))
    if full != _DIR and not full.startswith(_DIR + os.sep):
        return ""
    try:
        with _open(_TRIGGER, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _raise(fault: str, path: object) -> None:
    code = errno.EROFS if fault == "readonly" else errno.ENOSPC
    raise OSError(code, os.strerror(code), os.fsdecode(path))  # type: ignore[arg-type]


def open(file, mode="r", *args, **kwargs):  # builtins.open's stand-in
    fault = _fault(file)
    if fault and any(c in mode for c in "wax+"):
        _raise(fault, file)
    return _open(file, mode, *args, **kwargs)


def os_open(path, flags, *args, **kwargs):
    fault = _fault(path)
    if fault and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        _raise(fault, path)
    return _os_open(path, flags, *args, **kwargs)


def mkdir(path, *args, **kwargs):
    if _fault(path) == "readonly":
        _raise("readonly", path)
    return _mkdir(path, *args, **kwargs)


def statvfs(path):
    st = _statvfs(path)
    if _fault(path) == "full":
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files,
                                  st.f_ffree, st.f_favail, st.f_flag, st.f_namemax))
    return st


builtins.open = open
os.open, os.mkdir, os.statvfs = os_open, mkdir, statvfs
