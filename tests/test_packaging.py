"""The client installs without TensorFlow: `pip install .` (no extras) must not pull it in."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from import_probe import probe

REPO = Path(__file__).resolve().parents[1]


def test_pip_install_without_extras_does_not_install_tensorflow(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), str(REPO)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"lrctl", "grpcio", "protobuf"} <= names
    assert not {n for n in names if n.startswith(("tensorflow", "keras", "tf-", "jax"))}, names


def test_the_wheel_installs_only_under_the_lrctl_namespace(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("lrctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "lrctl" in top_level
    assert all(t == "lrctl" or (t.startswith("lrctl-") and t.endswith(".dist-info")) for t in top_level)
    for module in ("lrctl/v1/training_control_pb2.pyi", "lrctl/client/cli.py", "lrctl/service/schedules/engine.py",
                   "lrctl/client/py.typed", "lrctl/service/py.typed"):
        assert module in names
    assert "lrctl/__init__.py" not in names  # a namespace package: client and service merge


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
def test_the_import_probe_detects_keras(subprocess_env: dict[str, str]) -> None:
    # Proves test_client_import's check can fail: the same probe sees Keras once it is imported.
    result = probe("import keras", subprocess_env)
    heavy = result["heavy"]
    assert isinstance(heavy, list)
    assert "keras" in heavy
