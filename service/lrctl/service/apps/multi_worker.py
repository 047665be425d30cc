"""The demo model on tf.distribute.MultiWorkerMirroredStrategy, one process per worker, with
the learning rate controlled through the chief. Start one per worker with its TF_CONFIG:

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]},
                "task": {"type": "worker", "index": 0}}' \\
        python -m lrctl.service.multi_worker --listen 127.0.0.1:50051 --checkpoint-dir ckpts
    (the same with "index": 1 in a second shell)
    lrctl --target 127.0.0.1:50051 set 0.01      # every worker switches at the same step

Only the chief (worker 0, or the `chief` task) serves the API; every worker takes its schedule
at each step boundary (lrctl.service.training.exchange: the chief decides one exchange ahead, the
collective runs while the next step trains). SIGINT or SIGTERM on any worker stops all of them
after the same step (one step after the exchange that carried the vote). With --checkpoint-dir, the chief saves there every
--checkpoint-every steps and every worker resumes from it (a shared volume in a cluster), so
a job restarted after a worker failure resumes with the same schedule, LR and version.

A custom loop, because Keras 3's `fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585): its symbolic build reduces the first batch, which fails there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lrctl.service import TrainingControl
from lrctl.service.apps import demo
from lrctl.service.rpc.auth import is_loopback, read_secret, server_credentials
from lrctl.service.rpc.server import serve
from lrctl.service.training.checkpoints import Checkpointer


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="the chief's control address")
    parser.add_argument("--token-file", metavar="PATH",
                        help="bearer token of the write role (default: $LRCTL_TOKEN); needed "
                             "to listen beyond loopback")
    parser.add_argument("--tls-cert", metavar="PATH", help="the chief serves TLS with this PEM certificate")
    parser.add_argument("--tls-key", metavar="PATH", help="... and this PEM private key")
    parser.add_argument("--steps", type=int, default=0, help="steps to run; 0: until a signal")
    parser.add_argument("--checkpoint-dir", help="the chief's checkpoints; every worker resumes from it")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--sync-every", type=int, default=1,
                        help="steps between schedule exchanges (changes land at those boundaries)")
    parser.add_argument("--port-file", help="the chief writes its control port here once serving")
    parser.add_argument("--log", help="append one JSON line per step: step, version, lr used")
    parser.add_argument("--weights-out", help="write the final weights here (.npz)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    token = read_secret(args.token_file) if args.token_file else os.environ.get("LRCTL_TOKEN", "").strip()
    if not token and not is_loopback(args.listen):
        print(f"refusing to listen on {args.listen} without a token: give --token-file PATH "
              "(or set LRCTL_TOKEN)", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():  # lrctl's variables too: every replica reads its own copy
        model, data = demo.build()
        optimizer = model.optimizer
        control = TrainingControl(optimizer, strategy=strategy, sync_every=args.sync_every)
        optimizer.build(model.trainable_variables)
    checkpoints = Checkpointer(control, model, args.checkpoint_dir) if args.checkpoint_dir else None
    if checkpoints is not None:
        checkpoints.restore()  # every worker, from the chief's folder: they resume alike
    batches = iter(strategy.experimental_distribute_dataset(data))
    loss_fn = keras.losses.get(model.loss)  # per sample; the step averages it

    @tf.function
    def train_step(batch: Any) -> tuple[Any, Any]:
        def replica_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            lr = optimizer.learning_rate  # the schedule at this step: what apply() will use
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
                scaled = loss / strategy.num_replicas_in_sync
            optimizer.apply(tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
            return loss, lr
        return strategy.run(replica_step, args=batch)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: control.request_stop())
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(args.log, "a", buffering=1, encoding="utf-8")) if args.log else None
        if control.is_chief:
            _, port = stack.enter_context(
                serve(control.controller, args.listen, write_tokens=[token] if token else [],
                      credentials=server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None))
            print(f"control server on port {port}", file=sys.stderr, flush=True)
            if args.port_file:
                _write_atomically(args.port_file, str(port))
        started, first_step = time.perf_counter(), control.step
        with control.training():
            control.step_boundary()  # the first exchange (blocking): changes queued before it land
            step = first_step  # one optimizer step per batch: counted here, not read each time
            while not control.should_stop and (args.steps == 0 or step < args.steps):
                loss, lr = (strategy.experimental_local_results(t)[0] for t in train_step(next(batches)))
                if log is not None:
                    log.write(json.dumps({"step": step, "version": control.schedule.read()[1],
                                          "lr": float(lr)}) + "\n")
                step += 1
                control.step_boundary({"loss": loss})
                if checkpoints is not None and control.is_chief and step % args.checkpoint_every == 0:
                    checkpoints.save()
        if args.weights_out:
            np.savez(args.weights_out, *model.get_weights())
    print(f"worker {control.workers.index if control.workers else 0} stopped at step "
          f"{control.step}, version {control.schedule.read()[1]}: {control.step - first_step} "
          f"steps in {time.perf_counter() - started:.3f} s", file=sys.stderr, flush=True)
    return 0


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
