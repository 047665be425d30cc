"""The checked-in generated code matches protos/, and the protos pass buf lint."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEN_DIR = "client/lrctl/v1"
BUF = ROOT / "node_modules" / ".bin" / "buf"

needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None
    or (
        shutil.which("protoc-gen-mypy") is None
        and not (Path(sys.executable).parent / "protoc-gen-mypy").exists()
    ),
    reason="grpcio-tools / mypy-protobuf not installed (pip install -e .[dev])",
)


def _gen(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/gen_protos.py", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_grpc_tools
def test_generated_code_matches_protos() -> None:
    result = _gen("--check", "--no-git")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_grpc_tools
@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout"
)
def test_generated_code_is_committed() -> None:
    # Regenerate + `git diff --exit-code` + no untracked files in client/lrctl/v1.
    tracked = subprocess.run(
        ["git", "ls-files", "--", GEN_DIR], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    if not tracked.strip():
        pytest.skip(f"{GEN_DIR} is not in git yet (nothing committed or staged)")
    result = _gen("--check")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not BUF.exists(), reason="buf not installed (run `npm ci`)")
def test_buf_lint() -> None:
    for command in (["lint"], ["format", "--diff", "--exit-code"]):
        result = subprocess.run(
            [str(BUF), *command], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"buf {' '.join(command)}:\n{result.stdout}{result.stderr}"
