#!/usr/bin/env bash
# The main job: the demo trainer plus a short scripted control session, on the embedded
# defaults. The trainer listens on a Unix socket in a fresh temporary directory, so the demo
# talks only to the trainer it started, whatever else holds 127.0.0.1:50051 or $LRCTL_TARGET,
# and each change is fenced by the trainer's own run id (--expected-run-id) too. Uses
# .venv, else lrctl-trainer from PATH, else sets up .venv (needs python3 >= 3.10 and the
# package registry).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/lrctl-trainer ]]; then
  export PATH="$PWD/.venv/bin:$PATH"
elif ! command -v lrctl-trainer >/dev/null; then
  echo "== setting up .venv (first run only, about a minute)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e ".[service]"
  export PATH="$PWD/.venv/bin:$PATH"
fi
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS=ignore

run_dir=$(mktemp -d)
RUN_ID="lrctl-demo-$$-$RANDOM"
export LRCTL_TARGET="unix:$run_dir/lrctl.sock"
echo "== starting the demo trainer (SGD at lr 0.001), run $RUN_ID"
echo "   its control server: LRCTL_TARGET=$LRCTL_TARGET (e.g. for lrctl in another terminal)"
# TensorFlow's start-up chatter (CPU features, no CUDA) is filtered out; lrctl's lines stay.
lrctl-trainer --demo --listen "$LRCTL_TARGET" --run-id "$RUN_ID" --verbose 0 \
  2> >(grep --line-buffered -v -E '^(I0000|E0000|W0000|WARNING: All log messages)|rebuild TensorFlow' >&2) &
trainer=$!
watcher=""
trap 'kill $watcher $trainer 2>/dev/null || true; rm -rf "$run_dir"' EXIT
until lrctl health --service lrctl.v1.TrainingControlService >/dev/null 2>&1; do  # training
  kill -0 $trainer 2>/dev/null || { echo "the demo trainer exited before training" >&2; exit 1; }
  sleep 0.5
done
fence=(--expected-run-id "$RUN_ID")

step() { echo; echo "== $*"; }
step "state at the start"
lrctl state
lrctl watch --min-interval 1 &   # one line a second: step, lr, loss
watcher=$!
sleep 3

step "pin a 50x higher learning rate: watch the loss fall"
lrctl set 0.05 "${fence[@]}" --reason "demo: speed up"
sleep 4

step "swap in the seed article's ExponentialDecay(0.005, decay_rate=0.8, staircase); it restarts at its own step 0"
lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 1000 --decay-rate 0.8 --staircase \
  "${fence[@]}" --reason "demo: seed article"
sleep 3

step "halve whatever the schedule gives"
lrctl scale 0.5 "${fence[@]}" --reason "demo: halve"
sleep 2

step "bad input is refused with the field named; training goes on unchanged"
lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 0 --decay-rate 0.8 "${fence[@]}" || true
lrctl set 0.1 --expected-version 0 "${fence[@]}" || true
sleep 2

step "state at the end"
kill $watcher 2>/dev/null || true
lrctl state

step "stopping the trainer (SIGTERM finishes the current step, then exits)"
kill -TERM $trainer
wait $trainer
