"""`pytest --quick` runs only conftest.QUICK, and a quick file that imports TensorFlow or Keras
fails the run instead of slowing it down (a real pytest run on a copy of the conftest)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import conftest

HERE = Path(__file__).resolve().parent


def _quick_run(tmp_path: Path, heavy_import: str) -> subprocess.CompletedProcess[str]:
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(HERE / "conftest.py", tests / "conftest.py")
    for name in conftest.QUICK:
        (tests / name).write_text("def test_quick() -> None:\n    pass\n")
    (tests / conftest.QUICK[0]).write_text(
        f"def test_quick() -> None:\n    {heavy_import}\n")
    (tests / "test_slow.py").write_text("def test_slow() -> None:\n    raise AssertionError\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--quick", str(tests)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_quick_run_skips_the_other_files_and_refuses_tensorflow(tmp_path: Path) -> None:
    # One run (a pytest start costs seconds): the first quick file imports Keras, the rest pass.
    result = _quick_run(tmp_path, "import keras  # noqa: F401")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "take its file out of conftest.QUICK" in result.stdout
    # Every quick file ran, test_slow.py was not even collected.
    assert f"1 failed, {len(conftest.QUICK) - 1} passed" in result.stdout, output
    assert "test_slow" not in output
