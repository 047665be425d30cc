"""`lrctl-trainer`: trains a Keras model with the lrctl server embedded.

    lrctl-trainer --demo                        # the built-in demo, until SIGINT/SIGTERM
    lrctl-trainer --model my_pkg.train:build --steps 10000 --listen 0.0.0.0:50051

`--model MODULE:FUNCTION` names a function taking no arguments that returns
`(model, data)`: a compiled Keras model and what `model.fit` takes as `x` (a
`tf.data.Dataset` of `(x, y)` batches, or an `(x, y)` tuple of arrays). An endless
dataset is trained in epochs of 100 steps. The optimizer's learning rate may be a float
or any Keras built-in schedule; lrctl takes it over at the first step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from lrctl.service import demo, specs
from lrctl.service.controller import Phase
from lrctl.service.integration import TrainingControl
from lrctl.service.server import DEFAULT_ADDRESS, serve

logger = logging.getLogger("lrctl.trainer")
UNTIL_STOPPED_EPOCHS = 1_000_000


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lrctl-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--demo", action="store_true", help="train the built-in demo task")
    task.add_argument("--model", metavar="MODULE:FUNCTION", help="train your own model (see above)")
    parser.add_argument("--listen", default=DEFAULT_ADDRESS,
                        help=f"address of the control server (default {DEFAULT_ADDRESS}; port 0 picks one)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    length.add_argument("--epochs", type=int, help="stop after this many epochs")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--learning-rate", type=float, help="initial learning rate (overrides the model's)")
    start.add_argument("--schedule", metavar="JSON",
                       help="initial schedule as keras.optimizers.schedules.serialize() JSON")
    parser.add_argument("--run-id", help="name reported in the state (default: random)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity")
    return parser.parse_args(argv)


def _load(target: str) -> tuple[keras.Model, Any]:
    module_name, _, function_name = target.partition(":")
    if not function_name:
        raise SystemExit(f"lrctl-trainer: error: --model must be MODULE:FUNCTION. Received: {target}")
    sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory resolve
    built = getattr(importlib.import_module(module_name), function_name)()
    return built[0], built[1]


class _StopOnSignal(keras.callbacks.Callback):
    """Ends `fit` at the next step boundary once SIGINT/SIGTERM arrived (the running batch
    finishes first). A batch-begin hook only, so `fit` keeps its asynchronous batch ends."""

    def __init__(self, control: TrainingControl, stop: threading.Event) -> None:
        super().__init__()
        self._control, self._stop = control, stop

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._stop.is_set() and not self.model.stop_training:
            self._control.controller.set_phase(Phase.STOPPING)
            self.model.stop_training = True


class _StopAtStep(keras.callbacks.Callback):
    """Ends `fit` once `steps` optimizer steps have completed (`--steps`)."""

    def __init__(self, control: TrainingControl, steps: int) -> None:
        super().__init__()
        self._control, self._steps = control, steps

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._control.reached(self._steps):
            self.model.stop_training = True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    model, data = demo.build() if args.demo else _load(args.model)
    control = TrainingControl(model.optimizer, run_id=args.run_id)
    if args.learning_rate is not None or args.schedule:
        initial = args.learning_rate if args.learning_rate is not None else json.loads(args.schedule)
        try:
            control.schedule.load(specs.ActiveSchedule(specs.as_spec(initial)), version=0)
        except ValueError as e:
            raise SystemExit(f"lrctl-trainer: error: {e}") from None

    # Signal handlers only set a flag: the training thread acts on it at the next boundary,
    # so a stop never lands in the middle of a step (or of a lock held by that thread).
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    callbacks = [control.callback, _StopOnSignal(control, stop)]
    if args.steps is not None:
        callbacks.append(_StopAtStep(control, args.steps))
    fit_args: dict[str, Any] = {"epochs": args.epochs or UNTIL_STOPPED_EPOCHS, "verbose": args.verbose,
                                "callbacks": callbacks}
    if isinstance(data, tuple):
        fit_args.update(x=data[0], y=data[1])
    else:
        fit_args.update(x=data, shuffle=False)  # a dataset shuffles itself; Keras warns otherwise
        if isinstance(data, tf.data.Dataset) and data.cardinality() == tf.data.INFINITE_CARDINALITY:
            fit_args["steps_per_epoch"] = demo.STEPS_PER_EPOCH

    with serve(control.controller, args.listen) as (_, port):
        logger.info("run %s: control server on port %d; stop with Ctrl-C or SIGTERM",
                    control.controller.snapshot().run_id, port)
        try:
            model.fit(**fit_args)
        except BaseException:
            control.end(failed=True)
            raise
    snap = control.controller.snapshot()
    logger.info("run %s %s at step %d, lr %.6g, version %d", snap.run_id, snap.phase.value,
                snap.step, snap.learning_rate, snap.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
