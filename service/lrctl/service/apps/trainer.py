"""`lrctl-trainer`'s run: load the model, serve while TensorFlow loads, resume, train until
the goal or a signal, checkpoint. Its command line is `trainer_args` (checked before any of this)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrctl.service.apps import trainer_args
from lrctl.service.apps.trainer_args import StartError, UsageError

if TYPE_CHECKING:
    import argparse

    import keras

    from lrctl.service.control.guardrails import Guardrails
    from lrctl.service.rpc.journal import Journal
    from lrctl.service.rpc.slot import ControllerSlot
    from lrctl.service.schedules.specs import ScheduleSpec
    from lrctl.service.training.checkpoints import Checkpointer
    from lrctl.service.training.integration import TrainingControl

logger = logging.getLogger("lrctl.trainer")
UNTIL_STOPPED_EPOCHS = 1_000_000
CHECKPOINT_POINTER = "latest.json"  # checkpoints.LATEST, whose module loads Keras
EXIT_USAGE = 2
EXIT_START = 3


def _summary(error: BaseException) -> str:
    """`Type: message (file:line)` of where a user's code failed, on one line."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    # The first frame is ours (where it was caught); importlib's frames say nothing.
    frames = [f for f in traceback.extract_tb(error.__traceback__)[1:]
              if not f.filename.startswith(("<", os.path.dirname(importlib.__file__)))]
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text


def _load(target: str) -> tuple[keras.Model, Any]:
    import keras

    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"--model must be MODULE:FUNCTION, e.g. my_pkg.train:build. Received: {target}")
    sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory resolve
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- whatever the user's module raises, say it in one line
        raise UsageError(f"--model {target}: cannot import {module_name}: {_summary(e)}") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise UsageError(f"--model {target}: {module_name} has no function {function_name}")
    try:
        built = build()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model {target}: {function_name}() raised {_summary(e)}") from None
    if not (isinstance(built, (tuple, list)) and len(built) == 2):
        raise UsageError(f"--model {target}: {function_name}() must return (model, data). "
                         f"Received: {type(built).__name__}")
    model, data = built
    if not isinstance(model, keras.Model) or getattr(model, "optimizer", None) is None:
        raise UsageError(f"--model {target}: {function_name}() must return a compiled keras.Model "
                         f"first (call model.compile). Received: {type(model).__name__}")
    if isinstance(data, tuple) and len(data) != 2:
        raise UsageError(f"--model {target}: data must be a tf.data.Dataset or an (x, y) tuple. "
                         f"Received: a tuple of {len(data)}")
    return model, data


def _stop_callbacks(control: TrainingControl, stop: threading.Event,
                    steps: int | None) -> list[keras.callbacks.Callback]:
    """Callbacks that end `fit` on SIGINT/SIGTERM (`stop`) and after `--steps` steps. Defined
    here, not at module level, because subclassing Keras's Callback imports TensorFlow."""
    import keras

    from lrctl.service.control.changes import Phase

    class StopOnSignal(keras.callbacks.Callback):
        """Ends `fit` at the next step boundary once a signal arrived (the running batch
        finishes first). A batch-begin hook only, so `fit` keeps its asynchronous batch ends."""

        def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            if stop.is_set() and not self.model.stop_training:
                control.controller.set_phase(Phase.STOPPING)
                self.model.stop_training = True

    class StopAtStep(keras.callbacks.Callback):
        """Ends `fit` once `steps` optimizer steps have completed (`--steps`)."""

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            if steps is not None and control.reached(steps):
                self.model.stop_training = True

    return [StopOnSignal()] if steps is None else [StopOnSignal(), StopAtStep()]


def _use_devices(no_memory_growth: bool) -> None:
    """GPU memory growth (unless turned off) and a log line naming the devices training uses.
    Before any model is built: growth cannot be set once a GPU is initialised."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, not no_memory_growth)
        except RuntimeError as e:  # already initialised (e.g. by the user's module)
            logger.warning("cannot set memory growth on %s: %s", gpu.name, e)
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    growth = "" if not gpus else (", memory growth off" if no_memory_growth else ", memory growth on")
    logger.info("training on %s%s", ", ".join(d.name for d in devices), growth)


def _metrics(args: argparse.Namespace, slot: ControllerSlot, stack: contextlib.ExitStack) -> list[Any]:
    """Start the metrics endpoint (`--metrics-listen`) before the server, so that its RPC
    counter sees every call; `stack` stops it. Returns the gRPC interceptors to add."""
    interceptors: list[Any] = []
    if args.metrics_listen:
        if args.metrics_listen.startswith(("unix:", "unix-abstract:")):
            raise UsageError("--metrics-listen must be HOST:PORT")
        try:
            from lrctl.service.observability.metrics import TrainingMetrics, split_address
        except ModuleNotFoundError as e:
            raise UsageError(f"{e.name} is not installed; --metrics-listen needs the service "
                             'extra: pip install "lrctl[service]"') from None
        metrics = TrainingMetrics(slot)  # the state's gauges once the controller is bound
        host, port = split_address(args.metrics_listen)
        try:
            bound = stack.enter_context(metrics.serving(host, port))
        except OSError as e:
            raise StartError(f"cannot serve metrics on {args.metrics_listen}: {e}") from None
        logger.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
        interceptors.append(metrics.interceptor)
    return interceptors


def _tensorboard(args: argparse.Namespace, control: TrainingControl, stack: contextlib.ExitStack,
                 callbacks: list[Any]) -> None:
    """Add the TensorBoard callback (`--tensorboard-dir`); `stack` closes it."""
    if args.tensorboard_dir:
        if args.tensorboard_every < 1:
            raise UsageError("--tensorboard-every must be at least 1")
        from lrctl.service.observability.tensorboard import TensorBoardLogger

        board = TensorBoardLogger(control, args.tensorboard_dir, every=args.tensorboard_every)
        stack.callback(board.close)
        callbacks.append(board)  # after control.callback: it sees the changes applied


def _check_locations(args: argparse.Namespace) -> None:
    """Refuse a checkpoint folder or journal location that cannot be written (read-only, full)
    before training starts, not at the first checkpoint hours later."""
    from lrctl.service.control.disk import CheckpointError, check_writable

    folders = {"--checkpoint-dir": args.checkpoint_dir,
               "--journal": os.path.dirname(os.path.abspath(args.journal)) if args.journal else None}
    for flag, folder in folders.items():
        if folder:
            try:
                check_writable(folder)
            except CheckpointError as e:
                raise StartError(f"{flag}: {e}") from None


def _pointer_run_id(directory: str | None) -> str | None:
    """The run id in `directory`'s checkpoint pointer ("" if unreadable), else in its
    write-ahead log's last record (a run killed before its first checkpoint), or None when
    there is nothing to resume. Plain JSON, read before TensorFlow loads."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, CHECKPOINT_POINTER), encoding="utf-8") as f:
            return str(json.load(f).get("run_id") or "")
    except FileNotFoundError:
        from lrctl.service.control import wal  # pure Python

        records, _, _ = wal.read_clean(os.path.join(directory, wal.WAL_NAME))
        return str(records[-1].get("run_id") or "") if records else None
    except (OSError, ValueError, AttributeError):
        return ""  # the restore says what is wrong with it


def _train(args: argparse.Namespace, initial: ScheduleSpec | None,
           security: dict[str, Any], limits: Guardrails) -> None:
    from lrctl.service.rpc.journal import JOURNAL_NAME, Journal
    from lrctl.service.rpc.server import BindError, serve
    from lrctl.service.rpc.slot import ControllerSlot

    # Served before TensorFlow loads and the model is built (seconds): health and the state say
    # STARTING, so a starting trainer is told from a dead one. Its run id and incarnation are
    # known from now on: the one given, else the checkpoint's it resumes, else a new one.
    _check_locations(args)
    resumes = None if args.fresh else _pointer_run_id(args.checkpoint_dir)
    slot = ControllerSlot(run_id=args.run_id or resumes or uuid.uuid4().hex[:12],
                          incarnation=uuid.uuid4().hex[:12])
    # The journal lives beside the checkpoints unless told otherwise: it outlives restarts too.
    journal_path = args.journal or (os.path.join(args.checkpoint_dir, JOURNAL_NAME)
                                    if args.checkpoint_dir else None)
    journal = Journal(journal_path) if journal_path else None
    observers = contextlib.ExitStack()  # metrics and TensorBoard, stopped after serve()
    try:
        interceptors = _metrics(args, slot, observers)
        with observers, serve(slot, args.listen, journal=journal,
                              extra_interceptors=interceptors, **security) as (_, port):
            logger.info("run %s: control server on port %d; stop with Ctrl-C or SIGTERM",
                        slot.run_id, port)
            control = _fit(args, initial, limits, slot, journal, observers,
                           run_id=args.run_id or (slot.run_id if resumes is None else None))
    except BindError as e:  # e.g. another trainer on the port: one line, not a traceback
        raise StartError(str(e)) from None
    finally:
        if journal is not None:
            journal.close()
    if control is not None:
        snap = control.controller.snapshot()
        logger.info("run %s %s at step %d, lr %.6g, version %d", snap.run_id, snap.phase.value,
                    snap.step, snap.learning_rate, snap.version)


def _fit(args: argparse.Namespace, initial: ScheduleSpec | None, limits: Guardrails,
         slot: ControllerSlot, journal: Journal | None, observers: contextlib.ExitStack,
         run_id: str | None) -> TrainingControl | None:
    """Load TensorFlow, build the model, resume, bind the controller into `slot` and train.
    `run_id`: None lets a resumed checkpoint's name the run. Returns the control, or None when
    the goal (`--steps`, `--epochs`) was reached already: nothing trained, nothing saved."""
    from lrctl.service.apps import demo
    from lrctl.service.training.integration import TrainingControl

    _use_devices(args.no_memory_growth)
    model, data = demo.build() if args.demo else _load(args.model)
    try:
        control = TrainingControl(model.optimizer, run_id=run_id, guardrails=limits,
                                  revert_on_nan=args.revert_on_nan or None, initial_schedule=initial,
                                  incarnation=slot.incarnation, model=model,
                                  checkpoint_root=getattr(args, "checkpoint_root", None))
    except (TypeError, ValueError) as e:  # e.g. a custom schedule lrctl cannot express
        raise UsageError(" ".join(str(e).split())) from None

    # Signal handlers only set a flag: the training thread acts on it at the next boundary,
    # so a stop never lands in the middle of a step (or of a lock held by that thread).
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        control.controller.shut_down()  # one attribute store: new changes get UNAVAILABLE

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    checkpoints: Checkpointer | None = None
    try:
        fit_args = _fit_args(args, data, [control.callback, *_stop_callbacks(control, stop, args.steps)])
        if args.checkpoint_dir:
            checkpoints = _resume(args, control, model, journal)
            fit_args["callbacks"].append(checkpoints.callback)
        # --steps and --epochs are the run's totals: a resume trains what is left, from the
        # epoch after the last one completed (so the state's epoch goes on), or nothing.
        done, step = control.controller.epochs_done, control.step
        if control.controller.stopped_step is not None:  # StopTraining: the run is over
            logger.info("run %s: stopped for good by StopTraining at step %d; nothing to train",
                        control.controller.snapshot().run_id, control.controller.stopped_step)
            return None
        if args.steps is not None and step >= args.steps:
            logger.info("run %s: already at step %d, the --steps %d asked for; nothing to train",
                        control.controller.snapshot().run_id, step, args.steps)
            return None
        if args.epochs and done >= args.epochs:
            logger.info("run %s: already %d epochs done, the --epochs %d asked for; nothing to train",
                        control.controller.snapshot().run_id, done, args.epochs)
            return None
        fit_args["initial_epoch"] = done
        _tensorboard(args, control, observers, fit_args["callbacks"])
        slot.bind(control.controller)  # from now on the server answers for the run
        try:
            model.fit(**fit_args)
            # The final checkpoint, server still up (a StopTraining wrote it at its boundary).
            if checkpoints is not None and control.controller.stopped_step is None:
                checkpoints.save()
        except BaseException:
            # Keras calls no callback when `fit` raises: the run ends FAILED here, at once
            # (pending changes cancelled, waiters answered, readiness NOT_SERVING).
            control.end(failed=True)
            raise
        finally:
            # `fit` leaves its tf.data iterator in a reference cycle (a generator and a
            # traceback). Whenever the cyclic GC frees it, its destructor waits for
            # tf.data's autotuning thread to wake up, which a long run has put to sleep
            # for up to 60 s: SIGTERM took 52-59 s to exit. Frozen, the cycle is never
            # collected, and the process exits without destroying the iterator.
            gc.freeze()
    finally:
        # Training is over: a second Ctrl-C or SIGTERM during shutdown ends the process.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if checkpoints is not None:
            checkpoints.close()
    return control


def _fit_args(args: argparse.Namespace, data: Any, callbacks: list[Any]) -> dict[str, Any]:
    """`model.fit`'s arguments but `initial_epoch`: the data, the epochs and the callbacks."""
    import tensorflow as tf

    from lrctl.service.apps import demo

    fit_args: dict[str, Any] = {"epochs": args.epochs or UNTIL_STOPPED_EPOCHS, "verbose": args.verbose,
                                "callbacks": callbacks}
    if isinstance(data, tuple):
        fit_args.update(x=data[0], y=data[1])
    else:
        fit_args.update(x=data, shuffle=False)  # a dataset shuffles itself; Keras warns otherwise
        if isinstance(data, tf.data.Dataset) and data.cardinality() == tf.data.INFINITE_CARDINALITY:
            fit_args["steps_per_epoch"] = demo.STEPS_PER_EPOCH
    return fit_args


def _resume(args: argparse.Namespace, control: TrainingControl, model: keras.Model,
            journal: Journal | None) -> Checkpointer:
    """The Checkpointer of `--checkpoint-dir`, after resuming from its newest checkpoint (the
    journal records a resume); a folder that cannot be resumed from is a start error."""
    from lrctl.service.control.disk import CheckpointError
    from lrctl.service.training.checkpoints import Checkpointer

    try:
        checkpoints = Checkpointer(control, model, args.checkpoint_dir, every=args.checkpoint_every,
                                   keep=args.keep_checkpoints)
        resumed = checkpoints.restore(fresh=args.fresh)
    except CheckpointError as e:
        raise StartError(f"{e}. Pass --fresh to start a new run there (its files are left "
                         "alone), or choose another --checkpoint-dir") from None
    except OSError as e:
        raise StartError(f"cannot resume from {args.checkpoint_dir}: {e}") from None
    if resumed is not None and journal is not None:
        snap = control.controller.snapshot()
        journal.record(event="resumed", checkpoint=args.checkpoint_dir, step=snap.step,
                       version=snap.version, run_id=snap.run_id,
                       checkpoint_run_id=resumed.get("run_id"), replayed=checkpoints.replayed,
                       note="changes acknowledged after this step were replayed from the "
                       "write-ahead log")
    return checkpoints


def main(argv: Sequence[str] | None = None) -> int:
    args = trainer_args.parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        initial = trainer_args.initial_schedule(args)
        security = trainer_args.security(args)
        trainer_args.require_service()
        _train(args, initial, security, trainer_args.guardrails(args))
    except UsageError as e:
        print(f"lrctl-trainer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StartError as e:
        print(f"lrctl-trainer: error: {e}", file=sys.stderr)
        return EXIT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
