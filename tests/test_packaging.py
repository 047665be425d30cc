"""The client installs without TensorFlow: `pip install .` (no extras) must not pull it in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
