#!/usr/bin/env python3
"""Generate the checked-in Python gRPC code from protos/ (the one protoc invocation).

    python scripts/gen_protos.py           # regenerate client/lrctl/v1 in place
    python scripts/gen_protos.py --check   # fail if the checked-in code is stale
    python scripts/gen_protos.py --check --no-git   # compare with the working tree only

Output is deterministic for the pinned grpcio-tools and mypy-protobuf (see
pyproject.toml [dev]); bumping either means regenerating and committing.

--check regenerates into a temporary directory and compares it with the working
tree (catches stale, missing and leftover files without touching anything), then,
inside a git checkout, runs `git diff --exit-code -- client/lrctl/v1` and fails on
untracked files there (catches generated code that was never committed).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"
GEN_PACKAGE = Path("lrctl") / "v1"
GEN_DIR = OUT_ROOT / GEN_PACKAGE
# Files in GEN_DIR that protoc does not write but that belong to the package.
STATIC_FILES = {"__init__.py": "", "py.typed": ""}
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """Locate a protoc plugin next to this interpreter first, then on PATH.

    Preferring the interpreter's own bin/ makes the pinned mypy-protobuf from the
    active venv win over any other copy on PATH.
    """
    exe_dir = Path(sys.executable).parent
    candidate = exe_dir / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_protos: protoc plugin `{name}` not found; install mypy-protobuf")
    return found


def _proto_files() -> list[str]:
    # Sorted, relative to -I protos: the relative path becomes the module path.
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_root: Path) -> None:
    """Run protoc once over every .proto file, writing under out_root."""
    try:
        from grpc_tools import protoc  # dev-only dependency
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit("gen_protos: grpcio-tools is not installed (pip install -e .[dev])") from exc

    import grpc_tools

    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt_include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--mypy_out=quiet:{out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out=quiet:{out_root}",
        *_proto_files(),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"gen_protos: protoc failed with exit code {rc}")
    gen_dir = out_root / GEN_PACKAGE
    for name, content in STATIC_FILES.items():
        path = gen_dir / name
        if not path.exists():
            path.write_text(content)


def _owned_files(gen_dir: Path) -> set[str]:
    """Files in gen_dir that the generator owns (generated or static)."""
    if not gen_dir.is_dir():
        return set()
    return {
        p.name
        for p in gen_dir.iterdir()
        if p.is_file() and (p.name in STATIC_FILES or p.name.endswith(GENERATED_SUFFIXES))
    }


def regenerate_in_place() -> None:
    GEN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        fresh_dir = tmp_root / GEN_PACKAGE
        fresh = _owned_files(fresh_dir)
        # Remove leftovers from protos that no longer exist.
        for name in sorted(_owned_files(GEN_DIR) - fresh - set(STATIC_FILES)):
            (GEN_DIR / name).unlink()
            print(f"removed stale {GEN_DIR.relative_to(ROOT) / name}")
        for name in sorted(fresh):
            if name in STATIC_FILES and (GEN_DIR / name).exists():
                continue
            shutil.copyfile(fresh_dir / name, GEN_DIR / name)
    print(f"generated {GEN_DIR.relative_to(ROOT)}")


def check(*, use_git: bool = True) -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        generate(tmp_root)
        fresh_dir = tmp_root / GEN_PACKAGE
        fresh, current = _owned_files(fresh_dir), _owned_files(GEN_DIR)
        rel = GEN_DIR.relative_to(ROOT)
        problems += [f"missing: {rel / n}" for n in sorted(fresh - current)]
        problems += [f"stale (no .proto): {rel / n}" for n in sorted(current - fresh)]
        for name in sorted(fresh & current - set(STATIC_FILES)):
            if not filecmp.cmp(fresh_dir / name, GEN_DIR / name, shallow=False):
                problems.append(f"out of date: {rel / name}")
    if problems:
        print("gen_protos: generated code does not match protos/:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("run: python scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("gen_protos: working tree matches protos/")
    return _git_check() if use_git else 0


def _git_check() -> int:
    """Fail if the (fresh) generated code differs from what git has recorded."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        print("gen_protos: not a git checkout; skipped git diff")
        return 0
    rel = GEN_DIR.relative_to(ROOT).as_posix()
    env = {**os.environ, "GIT_PAGER": "cat"}
    diff = subprocess.run([git, "diff", "--exit-code", "--", rel], cwd=ROOT, env=env, check=False)
    untracked = subprocess.run(
        [git, "ls-files", "--others", "--exclude-standard", "--", rel],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if untracked:
        print("gen_protos: generated files not added to git:", file=sys.stderr)
        for name in untracked:
            print(f"  {name}", file=sys.stderr)
    if diff.returncode != 0 or untracked:
        return 1
    print("gen_protos: git has the generated code")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if client/lrctl/v1 is stale or not committed",
    )
    parser.add_argument(
        "--no-git",
        action="store_true",
        help="with --check: only compare with the working tree, skip git diff",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(use_git=not args.no_git)
    regenerate_in_place()
    return 0


if __name__ == "__main__":
    sys.exit(main())
