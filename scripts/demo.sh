#!/usr/bin/env bash
# The main job: the demo trainer plus a short scripted control session, on the embedded
# defaults. Sets up .venv on first use (needs python3 >= 3.10 and the package registry).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${LRCTL_DEMO_PORT:-50051}"
export LRCTL_TARGET="127.0.0.1:$PORT"

if [[ ! -x .venv/bin/lrctl-trainer ]]; then
  echo "== setting up .venv (first run only, about a minute)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[service]"
fi
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS=ignore

echo "== starting the demo trainer (SGD at lr 0.001) with its control server on $LRCTL_TARGET"
# TensorFlow's start-up chatter (CPU features, no CUDA) is filtered out; lrctl's lines stay.
lrctl-trainer --demo --listen "$LRCTL_TARGET" --verbose 0 \
  2> >(grep --line-buffered -v -E '^(I0000|E0000|W0000|WARNING: All log messages)|rebuild TensorFlow' >&2) &
trainer=$!
watcher=""
trap 'kill $watcher $trainer 2>/dev/null || true' EXIT
until lrctl health >/dev/null 2>&1; do
  kill -0 $trainer 2>/dev/null || { echo "the trainer exited early" >&2; exit 1; }
  sleep 0.5
done

step() { echo; echo "== $*"; }
step "state at the start"
lrctl state
lrctl watch --min-interval 1 &   # one line a second: step, lr, loss
watcher=$!
sleep 3

step "pin a 50x higher learning rate: watch the loss fall"
lrctl set 0.05 --reason "demo: speed up"
sleep 4

step "swap in the seed article's ExponentialDecay(0.005, decay_rate=0.8, staircase); it restarts at its own step 0"
lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 1000 --decay-rate 0.8 --staircase \
  --reason "demo: seed article"
sleep 3

step "halve whatever the schedule gives"
lrctl scale 0.5 --reason "demo: halve"
sleep 2

step "bad input is refused with the field named; training goes on unchanged"
lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 0 --decay-rate 0.8 || true
lrctl set 0.1 --expected-version 0 || true
sleep 2

step "state at the end"
kill $watcher 2>/dev/null || true
lrctl state

step "stopping the trainer (SIGTERM finishes the current step, then exits)"
kill -TERM $trainer
wait $trainer
