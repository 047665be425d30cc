"""The seed article's `tf.GradientTape` loop ("How do I reset the learning rate in TensorFlow
2?"), with its learning rate controlled remotely instead of by editing the loop.

    python examples/custom_loop.py --listen 127.0.0.1:50051 --steps 100000
    lrctl --target 127.0.0.1:50051 set 0.01            # the article's reset, from outside
    lrctl --target 127.0.0.1:50051 swap exponential-decay --initial-learning-rate 0.005 \\
        --decay-steps 5 --decay-rate 0.8 --staircase    # its schedule swap, restarting at 0.005

The article resets the LR with `optimizer.learning_rate.assign(0.01)` and swaps schedules with
`optimizer.learning_rate = new_schedule`, both written into the loop in advance. Here the loop
only calls `control.step_boundary()` between steps; any client changes the LR while it runs,
without retracing `train_step`. `--steps 0` runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import keras
import tensorflow as tf

from lrctl.service import TrainingControl, serve


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="control server address (port 0: pick a free one)")
    parser.add_argument("--steps", type=int, default=1000,
                        help="steps to run; 0: until SIGINT/SIGTERM")
    parser.add_argument("--learning-rate", type=float, default=0.001, help="Adam's initial LR")
    parser.add_argument("--log-every", type=int, default=100, help="print the loss every N steps")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    # The article's model, optimizer, loss and data.
    model = keras.Sequential([keras.Input((784,)),
                              keras.layers.Dense(10, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate)
    loss_fn = keras.losses.CategoricalCrossentropy()
    x = tf.random.normal((32, 784))
    y = tf.one_hot(tf.random.uniform((32,), minval=0, maxval=9, dtype=tf.int32), depth=10)

    control = TrainingControl(optimizer)  # before the first step

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss

    stop = threading.Event()  # a signal ends the loop between two steps
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    with serve(control.controller, args.listen) as (_, port), control.training():
        print(f"control server on port {port}", file=sys.stderr, flush=True)
        step = 0
        while not stop.is_set() and (args.steps == 0 or step < args.steps):
            loss = train_step(x, y)
            step += 1
            for change in control.step_boundary({"loss": loss}):
                print(f"step {change.applied_step}: {change.description} -> lr "
                      f"{change.learning_rate_after:.6g} ({change.request.reason})", flush=True)
            if args.log_every and step % args.log_every == 0:
                print(f"step {step}: loss {float(loss):.4f}, "
                      f"lr {float(optimizer.learning_rate):.6g}", flush=True)
    print(f"finished at step {step}, lr {float(optimizer.learning_rate):.6g}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
