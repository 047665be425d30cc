"""Which checkpoint a LoadCheckpoint request names, confined to the trainer's --checkpoint-root.
Pure: the file names of a checkpoint folder and its `latest.json` pointer (the writer is
`training/checkpoints.py`), paths and symbolic links; no HDF5, no TensorFlow.

    ckpt-N.weights.h5     the weights and the optimizer's variables
    ckpt-N.control.json   the controller's exported state (run id, step, history, ...)
    latest.json           {"step": N, "weights": ..., "control": ..., "lineage": ...}

Confinement is checked before existence, on the path with every symbolic link and ".."
resolved, so a request can neither read outside the root nor learn what exists there.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from lrctl.service.control.limits import MAX_PATH_BYTES
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)

LATEST = "latest.json"
NAME = re.compile(r"^ckpt-(\d+)\.(weights\.h5|control\.json)$")
WEIGHTS_SUFFIX = ".weights.h5"
CONTROL_SUFFIX = ".control.json"
_RESOURCE = "lrctl.v1.Checkpoint"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_pointer(directory: str) -> tuple[dict[str, Any] | None, str]:
    """The pointer and "", or None and what is wrong with it ("" if there is none)."""
    try:
        with open(os.path.join(directory, LATEST), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"{LATEST} cannot be read ({e.strerror or e})"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return None, f"{LATEST} is not valid JSON ({one_line(e)})"
    if not isinstance(data, dict):
        return None, f"{LATEST} holds {one_line(json.dumps(data))[:40]}, not a checkpoint pointer"
    for key, pattern in (("weights", "weights.h5"), ("control", "control.json")):
        name = data.get(key)
        m = NAME.match(name) if isinstance(name, str) else None
        if m is None or m.group(2) != pattern:
            return None, f"{LATEST} has no valid {key!r} file name (got {one_line(repr(name))[:60]})"
    return data, ""


def control_file(weights: pathlib.Path) -> pathlib.Path:
    """`ckpt-N.control.json` beside `ckpt-N.weights.h5`."""
    return weights.with_name(weights.name.removesuffix(WEIGHTS_SUFFIX) + CONTROL_SUFFIX)


def resolve(path: str, root: pathlib.Path | None) -> pathlib.Path:
    """The weights file (`ckpt-N.weights.h5`, its control file beside it) that `path` names:
    a checkpoint folder's newest complete checkpoint, or the weights file itself. Relative
    paths are taken under `root`. Raises InvalidArgumentError (`path` empty or not a
    checkpoint's name), FailedPreconditionError (no root), PermissionDeniedError (outside the
    root once links and ".." are resolved), NotFoundError (no such checkpoint)."""
    if not path:
        raise InvalidArgumentError("path", "must name a checkpoint folder or a ckpt-N.weights.h5 "
                                           "file under the trainer's --checkpoint-root", repr(path))
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgumentError("path", f"must be at most {MAX_PATH_BYTES} bytes",
                                   f"{len(path.encode())} bytes")
    if "\0" in path:
        raise InvalidArgumentError("path", "must not contain NUL characters", repr(path)[:200])
    if root is None:
        raise FailedPreconditionError(
            "the trainer was started without --checkpoint-root; start it with --checkpoint-root "
            "DIR to load checkpoints from under DIR", field="path", kind="CHECKPOINT_ROOT")
    real_root = pathlib.Path(os.path.realpath(root))
    real = _confined(pathlib.Path(os.path.realpath(real_root / path)), real_root, path)
    if real.is_dir():
        weights = _newest(real, path)
    elif real.is_file():
        if not _is_weights(real.name):
            raise InvalidArgumentError("path", "must name a checkpoint folder or a ckpt-N.weights.h5 "
                                               "file", repr(path)[:200])
        weights = real
    else:
        raise _not_found(f"no checkpoint at {path!r} under the checkpoint root")
    control = control_file(weights)
    # Either file may itself be a link: both must stay inside the root too.
    _confined(pathlib.Path(os.path.realpath(weights)), real_root, path)
    if not _confined(pathlib.Path(os.path.realpath(control)), real_root, path).is_file():
        raise _not_found(f"the checkpoint {path!r} has no {control.name} beside {weights.name}")
    return weights


def _confined(real: pathlib.Path, real_root: pathlib.Path, path: str) -> pathlib.Path:
    if real != real_root and real_root not in real.parents:
        raise PermissionDeniedError(f"the checkpoint path {path[:200]!r} lies outside the trainer's "
                                    "--checkpoint-root (after resolving symbolic links and '..')")
    return real


def _is_weights(name: str) -> bool:
    m = NAME.match(name)
    return m is not None and m.group(2) == "weights.h5"


def _newest(folder: pathlib.Path, path: str) -> pathlib.Path:
    """The checkpoint `latest.json` names if both its files are there, else the complete pair
    with the highest step (a folder whose pointer a kill left behind still loads)."""
    pointer, _ = read_pointer(os.fspath(folder))
    if pointer is not None:
        weights = folder / pointer["weights"]
        if weights.is_file() and (folder / pointer["control"]).is_file():
            return weights
    try:
        names = set(os.listdir(folder))
    except OSError as e:
        raise _not_found(f"the checkpoint folder {path!r} cannot be read ({e.strerror or e})") from None
    steps = [int(m.group(1)) for name in names if (m := NAME.match(name)) and m.group(2) == "weights.h5"
             and f"ckpt-{m.group(1)}{CONTROL_SUFFIX}" in names]
    if not steps:
        raise _not_found(f"the folder {path!r} holds no complete checkpoint (ckpt-N.weights.h5 "
                         "with its ckpt-N.control.json)")
    return folder / f"ckpt-{max(steps)}{WEIGHTS_SUFFIX}"


def _not_found(message: str) -> NotFoundError:
    error = NotFoundError(message)
    error.resource_type = _RESOURCE
    return error


__all__ = ["LATEST", "NAME", "control_file", "one_line", "read_pointer", "resolve"]
