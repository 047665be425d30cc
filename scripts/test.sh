#!/usr/bin/env bash
# Set up everything from the repo, then run every check CI runs: stubs are fresh, buf lint,
# ruff, mypy, and the test suite (real TensorFlow, real gRPC servers on 127.0.0.1); 20 to
# 25 minutes on 2 cores.
#
# --quick: the same setup (less npm), then only the TensorFlow-free unit tests
# (tests/conftest.py's QUICK), for the edit-test loop: 10 to 15 s of tests once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2 PIP_DISABLE_PIP_VERSION_CHECK=1

quick=false
case "${1:-}" in
  --quick) quick=true ;;
  "") ;;
  *) echo "usage: bash scripts/test.sh [--quick]" >&2; exit 2 ;;
esac

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[service,dev]"
if $quick; then
  echo "== pytest --quick"; exec .venv/bin/python -m pytest -p no:cacheprovider --quick
fi
npm ci --no-audit --no-fund --loglevel=error   # buf, pinned in package-lock.json

echo "== generated stubs are fresh"; .venv/bin/python scripts/gen_protos.py --check
echo "== buf lint";                 node_modules/.bin/buf lint
echo "== ruff";                     .venv/bin/ruff check .
echo "== mypy";                     .venv/bin/mypy
echo "== pytest";                   .venv/bin/python -m pytest -p no:cacheprovider
