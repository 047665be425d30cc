#!/usr/bin/env bash
# One full run of every issue-#9 benchmark, one after the other on an otherwise idle machine.
# Each script's JSON line goes to bench/results/NAME.json, the machine to machine.json.
#   bash bench/run_all.sh            (about 30 to 45 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=bench/results
mkdir -p "$out"
"$py" - > "$out/machine.json" <<'PY'
import json, os, platform, sys, time
import grpc, keras, tensorflow as tf
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": os.cpu_count(),
                  "memory_gib": round(mem, 1), "cpu": platform.processor() or platform.machine(),
                  "python": sys.version.split()[0], "tensorflow": tf.__version__,
                  "keras": keras.__version__, "grpcio": grpc.__version__}))
PY
for bench in overhead swap latency load footprint multiworker; do
    echo "== $bench" >&2
    "$py" "bench/$bench.py" | tail -n 1 > "$out/$bench.json"
done
