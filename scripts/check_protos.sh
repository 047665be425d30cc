#!/usr/bin/env bash
# Fail (exit 1) if client/lrctl/v1 is not what protos/ generates, or is not committed.
# Usage: scripts/check_protos.sh   (uses $PYTHON, else .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gen_protos.py --check
