"""One member of a population-based-training population: a small CNN on synthetic images,
SGD with momentum, trained by `model.fit` with lrctl's server embedded (as `lrctl-trainer`).

    python examples/pbt_trainer.py --learning-rate 0.05 --momentum 0.9 --steps 400 \\
        --eval-every 50 --checkpoint-dir /tmp/pbt/m0 --checkpoint-root /tmp/pbt --seed 0

Every `--eval-every` steps is one Keras epoch, which ends with the loss on a fixed
evaluation set (the same batches for every member and every start): `val_loss` in the
state's `epoch_metrics`, the figure a PBT controller ranks members by. Batch `i` of the
training stream is the same in every process that reaches step `i`, so a member resumed
from a checkpoint sees what it would have seen had it not stopped.

Two ways to drive it:
- live (`examples/pbt_live.py`): one process for the whole run; the controller pauses it
  at round boundaries and exploits/explores through lrctl (LoadCheckpoint,
  SetLearningRate, SetOptimizerParameters);
- restart (as Ray Tune does): one process per round, `--steps` the round's end; the next
  round starts a new process from its own last checkpoint, or, for an exploited member,
  from a better member's (`--start-from DIR`), with new hyperparameters on the command line.

On stderr, besides the usual logs: `control server on port N` once serving, and one
`PBT {json}` line per event (`imported`, `ready`, `first_step_begin`, `first_step_end`, `eval`,
`last_step_end`, `exit`), each with `time.time()`, so a driver can tell start-up, trace and
shutdown time from training time.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any heavy import: the start-up cost includes TensorFlow's

import argparse  # the imports after the clock above, on purpose
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE = (16, 16, 3)
CLASSES = 10
BATCH = 32
TRAIN_EXAMPLES = 8192
EVAL_BATCHES = 8
DATA_SEED = 1234  # one task for the whole population; members differ by their init and config


def event(name: str, **fields: Any) -> None:
    """One `PBT {json}` line on stderr: what a driver times the member by."""
    print("PBT " + json.dumps({"event": name, "time": time.time(), **fields}), file=sys.stderr, flush=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--momentum", type=float, required=True,
                        help="SGD momentum, > 0 so that the optimizer has momentum slots to tune")
    parser.add_argument("--steps", type=int, required=True,
                        help="stop once the run has this many optimizer steps (a resume counts its own)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps per epoch, each ending with an evaluation")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--checkpoint-root", help="the folder LoadCheckpoint may load from (live PBT)")
    parser.add_argument("--start-from", metavar="DIR",
                        help="restart PBT's exploit: replace --checkpoint-dir's checkpoints with "
                        "DIR's newest one (a better member's) and resume from it with this "
                        "command line's hyperparameters")
    parser.add_argument("--seed", type=int, default=0, help="the member's weight initialisation")
    parser.add_argument("--run-id")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--wait-for-stdin", action="store_true",
                        help="once serving, read a line from stdin before training: a driver queues "
                        "the changes that must land at exact steps (the first round's pause) first")
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every (rounds end at an evaluation)")
    if not 0 < args.momentum < 1:
        parser.error("--momentum must be in (0, 1)")
    return args


def _copy_newest(source: str, destination: str) -> None:
    """Make `destination` hold only `source`'s newest checkpoint (its pointer and pair): what
    restart PBT's exploit does before the process resumes."""
    with open(os.path.join(source, "latest.json"), encoding="utf-8") as f:
        pointer = json.load(f)
    shutil.rmtree(destination, ignore_errors=True)
    os.makedirs(destination)
    for name in (pointer["weights"], pointer["control"], "latest.json"):
        shutil.copy2(os.path.join(source, name), os.path.join(destination, name))


def _data(start_step: int) -> tuple[Any, Any]:
    """The training stream from batch `start_step` on (endless, the same batches at the same
    steps in every process) and the fixed evaluation set."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(DATA_SEED)
    # A fixed random conv "teacher" labels random images: learnable, not trivially.
    x = rng.normal(size=(TRAIN_EXAMPLES + EVAL_BATCHES * BATCH, *IMAGE)).astype("float32")
    teacher = rng.normal(size=(4 * 4 * IMAGE[2], CLASSES)).astype("float32")
    pooled = x.reshape(len(x), 4, 4, 4, 4, IMAGE[2]).mean(axis=(2, 4)).reshape(len(x), -1)
    y = np.argmax(pooled @ teacher + 0.5 * rng.normal(size=(len(x), CLASSES)), axis=1).astype("int32")
    train_x, train_y = tf.constant(x[:TRAIN_EXAMPLES]), tf.constant(y[:TRAIN_EXAMPLES])
    batches = TRAIN_EXAMPLES // BATCH

    def batch(i: Any) -> tuple[Any, Any]:
        rows = tf.range(BATCH, dtype=tf.int64) + (i % batches) * BATCH
        images = tf.gather(train_x, rows)
        flip = tf.cast(i // batches % 2, tf.bool)  # a different view on each pass over the data
        return tf.where(flip, tf.reverse(images, axis=[2]), images), tf.gather(train_y, rows)

    train = (tf.data.Dataset.counter(start_step).map(batch, num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
    evaluation = tf.data.Dataset.from_tensor_slices(
        (x[TRAIN_EXAMPLES:], y[TRAIN_EXAMPLES:])).batch(BATCH).cache()
    return train, evaluation


def _model(args: argparse.Namespace) -> Any:
    import keras

    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([
        keras.Input(IMAGE),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(CLASSES),
    ], name="pbt_cnn")
    model.compile(optimizer=keras.optimizers.SGD(args.learning_rate, momentum=args.momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _timing_callback(steps_at_start: int, last_step: int) -> Any:
    import keras

    class Timing(keras.callbacks.Callback):
        """Marks the first step (its end includes the trace and the pipeline's warm-up), each
        evaluation, and the last step. Not async: Keras waits for the step before calling it."""

        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            if self.batches == 0:
                event("first_step_begin", step=steps_at_start)

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.batches += 1
            if self.batches == 1:
                event("first_step_end", step=steps_at_start + 1)

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            step = steps_at_start + self.batches
            event("eval", step=step, val_loss=float((logs or {}).get("val_loss", float("nan"))))
            if step >= last_step:
                event("last_step_end", step=step)

    return Timing()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.start_from:
        _copy_newest(args.start_from, args.checkpoint_dir)
    from lrctl.service import Checkpointer, TrainingControl, serve
    from lrctl.service.control.changes import ChangeRequest, SetParameters
    from lrctl.service.schedules import specs

    event("imported", started=STARTED)
    model = _model(args)
    control = TrainingControl(model.optimizer, run_id=args.run_id, checkpoint_root=args.checkpoint_root,
                              initial_schedule=specs.as_spec(args.learning_rate))
    checkpoints = Checkpointer(control, model, args.checkpoint_dir)
    if checkpoints.restore() is not None:
        # A restart takes the checkpoint's weights, slots and step, and this command line's
        # hyperparameters (the new config, as Ray Tune restarts an exploited trial with). The
        # checkpoint carries its own learning rate and momentum: replace them with a local
        # change, versioned and recorded, applied at the first step boundary.
        control.controller.submit(ChangeRequest(
            SetParameters((("momentum", args.momentum),)), reason="restart: this config's momentum"))
        model.optimizer.learning_rate = args.learning_rate
    step = control.step
    train, evaluation = _data(step)
    try:
        with serve(control.controller, args.listen) as (_, port):
            print(f"control server on port {port}", file=sys.stderr, flush=True)
            event("ready", step=step)
            if args.wait_for_stdin:
                sys.stdin.readline()
            if step < args.steps:
                model.fit(train, epochs=args.steps // args.eval_every, initial_epoch=step // args.eval_every,
                          steps_per_epoch=args.eval_every, validation_data=evaluation, verbose=0, shuffle=False,
                          callbacks=[control.callback, checkpoints.callback,
                                     _timing_callback(step, args.steps)])
                checkpoints.save()
    finally:
        checkpoints.close()
    event("exit", step=control.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
