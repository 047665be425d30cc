"""LoadCheckpoint's path confinement (control/checkpoint_paths.py): which weights file a path
names, and every way out of --checkpoint-root refused. No TensorFlow: the files are stand-ins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lrctl.service.control.checkpoint_paths import LATEST, resolve
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)


def _checkpoint(folder: Path, step: int, *, control: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"ckpt-{step}.weights.h5"
    weights.write_bytes(b"h5")
    if control:
        (folder / f"ckpt-{step}.control.json").write_text(json.dumps({"step": step}))
    return weights


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    _checkpoint(root / "run-a", 10)
    _checkpoint(root / "run-a", 20)
    (tmp_path / "outside").mkdir()
    _checkpoint(tmp_path / "outside", 5)
    return root


def test_a_folder_names_its_pointed_checkpoint_else_its_newest(root: Path) -> None:
    assert resolve("run-a", root) == root / "run-a" / "ckpt-20.weights.h5"
    (root / "run-a" / LATEST).write_text(json.dumps(
        {"step": 10, "weights": "ckpt-10.weights.h5", "control": "ckpt-10.control.json"}))
    assert resolve("run-a", root) == root / "run-a" / "ckpt-10.weights.h5"  # the pointer wins
    (root / "run-a" / LATEST).write_text("{torn")
    assert resolve("run-a/", root) == root / "run-a" / "ckpt-20.weights.h5"
    _checkpoint(root / "run-a", 30, control=False)  # half a checkpoint is not one
    assert resolve(str(root / "run-a"), root) == root / "run-a" / "ckpt-20.weights.h5"


def test_a_weights_file_names_itself(root: Path) -> None:
    assert resolve("run-a/ckpt-10.weights.h5", root) == root / "run-a" / "ckpt-10.weights.h5"
    assert resolve(str(root / "run-a" / "ckpt-10.weights.h5"), root) == root / "run-a" / "ckpt-10.weights.h5"
    assert resolve("./run-a/../run-a/ckpt-20.weights.h5", root) == root / "run-a" / "ckpt-20.weights.h5"


@pytest.mark.parametrize("path", ["../outside", "../outside/ckpt-5.weights.h5", "run-a/../../outside",
                                  "..", "/", "../outside/nothing-here"])
def test_dot_dot_out_of_the_root_is_refused(root: Path, path: str) -> None:
    with pytest.raises(PermissionDeniedError, match="outside the trainer's --checkpoint-root"):
        resolve(path, root)


def test_an_absolute_path_outside_is_refused(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PermissionDeniedError):
        resolve(str(tmp_path / "outside" / "ckpt-5.weights.h5"), root)
    with pytest.raises(PermissionDeniedError):  # a sibling whose name starts like the root's
        resolve(str(tmp_path / "root-other"), root)


def test_a_symbolic_link_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink(tmp_path / "outside" / "ckpt-5.weights.h5", root / "run-a" / "ckpt-7.weights.h5")
    (root / "run-a" / "ckpt-7.control.json").write_text("{}")
    for path in ("escape", "escape/ckpt-5.weights.h5", "run-a/ckpt-7.weights.h5"):
        with pytest.raises(PermissionDeniedError):
            resolve(path, root)
    # A folder whose pointer names a linked file is refused too.
    (root / "run-a" / LATEST).write_text(json.dumps(
        {"step": 7, "weights": "ckpt-7.weights.h5", "control": "ckpt-7.control.json"}))
    with pytest.raises(PermissionDeniedError):
        resolve("run-a", root)
    # A link that stays inside the root is followed.
    os.symlink(root / "run-a", root / "alias")
    (root / "run-a" / LATEST).unlink()
    assert resolve("alias/ckpt-10.weights.h5", root) == root / "run-a" / "ckpt-10.weights.h5"


def test_a_root_that_is_itself_a_link_works(root: Path, tmp_path: Path) -> None:
    os.symlink(root, tmp_path / "link-to-root")
    assert resolve("run-a", tmp_path / "link-to-root") == root / "run-a" / "ckpt-20.weights.h5"


def test_missing_checkpoints_are_not_found(root: Path) -> None:
    for path in ("nothing", "run-a/ckpt-99.weights.h5"):
        with pytest.raises(NotFoundError) as caught:
            resolve(path, root)
        assert caught.value.resource_type == "lrctl.v1.Checkpoint"
    (root / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no complete checkpoint"):
        resolve("empty", root)
    _checkpoint(root / "half", 3, control=False)
    with pytest.raises(NotFoundError, match="ckpt-3.control.json"):
        resolve("half/ckpt-3.weights.h5", root)


def test_bad_paths_and_no_root(root: Path) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        resolve("", root)
    assert caught.value.field == "path"
    with pytest.raises(InvalidArgumentError):
        resolve("run-a/ckpt-10.control.json", root)  # not a weights file
    with pytest.raises(InvalidArgumentError):
        resolve("a\0b", root)
    with pytest.raises(FailedPreconditionError, match="without --checkpoint-root"):
        resolve("run-a", None)


def test_the_trainer_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lrctl.service.apps import trainer_args

    assert trainer_args.parse(["--demo", "--checkpoint-root", str(tmp_path)]).checkpoint_root == str(tmp_path)
    assert trainer_args.parse(["--demo"]).checkpoint_root is None
    with pytest.raises(SystemExit):
        trainer_args.parse(["--demo", "--checkpoint-root", str(tmp_path / "missing")])
    assert "--checkpoint-root must be an existing folder" in capsys.readouterr().err


def test_a_path_longer_than_1_kib_is_refused_without_quoting_it(root: Path) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        resolve("a/" * 600, root)
    assert refused.value.field == "path" and "1200 bytes" in str(refused.value) and "a/a/" not in str(refused.value)


def test_the_path_bound_is_exact(root: Path) -> None:
    """1,024 bytes pass the bound (and are then judged as a path: nothing there); 1,025 do not."""
    with pytest.raises(NotFoundError):
        resolve("a/" * 511 + "bc", root)  # 1,024 bytes
    with pytest.raises(InvalidArgumentError, match="at most 1024 bytes"):
        resolve("a/" * 511 + "bcd", root)  # 1,025 bytes
