"""The checked-in generated code matches protos/, the protos pass buf lint, and they break
nothing a client of the last release relies on (buf breaking)."""

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


#: The last released API (commit 48d26fa), as a buf image (no source info), built with:
#:   git show 48d26fa:protos/lrctl/v1/training_control.proto > DIR/lrctl/v1/training_control.proto
#:   node_modules/.bin/buf build DIR --exclude-source-info -o tests/data/lrctl_v1_release.binpb
RELEASE_IMAGE = ROOT / "tests" / "data" / "lrctl_v1_release.binpb"


def _breaking(protos: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), "breaking", str(protos), "--against", str(RELEASE_IMAGE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not BUF.exists(), reason="buf not installed (run `npm ci`)")
def test_buf_breaking_against_the_last_release(tmp_path: Path) -> None:
    """Everything since the release is additive (buf's FILE rules, buf.yaml): Change.name,
    GetChange and WaitChange with their messages, ListChangesRequest.filter, the StateView
    enum and GetStateRequest.view / WatchStateRequest.view. A release's client keeps working;
    the check itself fails on a removed field (so it can fail)."""
    result = _breaking(ROOT / "protos")
    assert result.returncode == 0, f"buf breaking:\n{result.stdout}{result.stderr}"
    broken = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", broken)
    proto = broken / "lrctl" / "v1" / "training_control.proto"
    text = proto.read_text()
    assert "\n  int32 page_size = 1;\n" in text
    proto.write_text(text.replace("\n  int32 page_size = 1;\n", "\n"))
    result = _breaking(broken)
    assert result.returncode != 0 and '"page_size" on message "ListChangesRequest"' in result.stdout
