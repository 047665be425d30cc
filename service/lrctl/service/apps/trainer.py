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
import contextlib
import gc
import importlib
import importlib.util
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

# Pure Python. TensorFlow, Keras and the server load only after the command line is checked:
# `--help` and usage errors answer at once, and a client-only install gets a clear message.
from lrctl.service.schedules import specs

if TYPE_CHECKING:
    import keras

    from lrctl.service.control.guardrails import Guardrails
    from lrctl.service.rpc.journal import Journal
    from lrctl.service.rpc.slot import ControllerSlot
    from lrctl.service.training.checkpoints import Checkpointer
    from lrctl.service.training.integration import TrainingControl

logger = logging.getLogger("lrctl.trainer")
UNTIL_STOPPED_EPOCHS = 1_000_000
DEFAULT_ADDRESS = "127.0.0.1:50051"  # server.DEFAULT_ADDRESS, which needs the [service] extra
DEFAULT_MAX_LR = 10.0  # above any learning rate a sane run uses: a typo guard
DEFAULT_RATE = 600.0  # changes a minute: far above any controller's need, far below a flood
CHECKPOINT_POINTER = "latest.json"  # checkpoint.LATEST, whose module loads Keras
EXIT_USAGE = 2
EXIT_START = 3
# What `pip install "lrctl[service]"` adds to the client's dependencies.
SERVICE_MODULES = ("tensorflow", "keras", "grpc_reflection")


class _UsageError(Exception):
    """A bad --model, --schedule or install: one line on stderr and exit code 2."""


class _StartError(Exception):
    """The server could not start (its port is taken): one line on stderr and exit code 3."""


def _listen_address(text: str) -> str:
    """`--listen`: HOST:PORT (an IPv6 host in brackets) or unix:PATH. Without this, gRPC
    fails only at bind time, and with a message that does not say what is wrong."""
    if text.startswith(("unix:", "unix-abstract:")):
        return text
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (port 0 picks a free one), e.g. 0.0.0.0:50051, or unix:PATH; got {text!r}"
        )
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"the port must be from 0 to 65535; got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"put an IPv6 host in brackets, e.g. [::1]:50051; got {text!r}")
    return text


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lrctl-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--demo", action="store_true", help="train the built-in demo task")
    task.add_argument("--model", metavar="MODULE:FUNCTION", help="train your own model (see above)")
    parser.add_argument("--listen", default=DEFAULT_ADDRESS, type=_listen_address,
                        help=f"address of the control server (default {DEFAULT_ADDRESS}; port 0 picks one)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int,
                        help="stop once the run has this many optimizer steps (a resume counts its own)")
    length.add_argument("--epochs", type=int,
                        help="stop once the run has this many epochs (a resume counts its own)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--learning-rate", type=float, help="initial learning rate (overrides the model's)")
    start.add_argument("--schedule", metavar="JSON",
                       help="initial schedule as keras.optimizers.schedules.serialize() JSON")
    parser.add_argument("--run-id", help="name reported in the state (default: random)")
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity")

    security = parser.add_argument_group(
        "security", "Tokens come from files or the environment, never from the command line (ps "
        "shows it). Listening beyond loopback needs a token, mutual TLS, or --insecure.")
    security.add_argument("--token-file", metavar="PATH",
                          help="token of the write role (default: $LRCTL_TOKEN)")
    security.add_argument("--read-token-file", metavar="PATH",
                          help="token of the read role: state, watch, history (default: $LRCTL_READ_TOKEN)")
    security.add_argument("--tls-cert", metavar="PATH", help="serve TLS with this PEM certificate")
    security.add_argument("--tls-key", metavar="PATH", help="... and this PEM private key")
    security.add_argument("--tls-client-ca", metavar="PATH",
                          help="mutual TLS: clients must present a certificate signed by this CA")
    security.add_argument("--insecure", action="store_true",
                          help="allow a non-loopback --listen without a token or mutual TLS")
    security.add_argument("--health-listen", metavar="HOST:PORT", type=_listen_address,
                          help="also serve the standard health service alone, plaintext, here: "
                          "for Kubernetes' native gRPC probes, which cannot speak TLS "
                          "(default: off)")
    security.add_argument("--journal", metavar="PATH",
                          help="append every change attempt to this JSON-lines audit journal "
                          "(default: DIR/lrctl-journal.jsonl with --checkpoint-dir, else none)")

    limits = parser.add_argument_group("guardrails", "Limits on what any client may ask for.")
    limits.add_argument("--min-learning-rate", type=float, default=0.0, metavar="LR",
                        help="the smallest learning rate a change may give (default 0)")
    limits.add_argument("--max-learning-rate", type=float, default=DEFAULT_MAX_LR, metavar="LR",
                        help=f"the largest learning rate a change may give (default {DEFAULT_MAX_LR:g})")
    limits.add_argument("--max-change-factor", type=float, metavar="N",
                        help="refuse a change that multiplies or divides the learning rate by more "
                        "than N, unless the request sets force (default: no limit)")
    limits.add_argument("--max-changes-per-minute", type=float, default=DEFAULT_RATE, metavar="N",
                        help=f"accept at most N changes a minute (default {DEFAULT_RATE:g})")
    limits.add_argument("--revert-on-nan", type=int, default=0, metavar="K",
                        help="if the loss turns NaN/Inf within K steps of a change, restore the "
                        "weights, optimizer slots and schedule from before it (default 0: off; "
                        "costs a host copy of the weights and slots while watching)")

    # -- metrics and TensorBoard (issue #8, items 4-5) --
    observe = parser.add_argument_group("metrics and TensorBoard")
    observe.add_argument("--metrics-listen", metavar="HOST:PORT", type=_listen_address,
                         help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
                         "(port 0 picks one; default: off)")
    observe.add_argument("--tensorboard-dir", metavar="DIR",
                         help="write the learning rate and every applied change as TensorBoard "
                         "summaries into DIR (default: off)")
    observe.add_argument("--tensorboard-every", type=int, default=1, metavar="N",
                         help="write the learning rate every N steps (default 1)")
    # -- end of metrics and TensorBoard --

    # -- checkpoints, shutdown and devices (issue #8, items 1-3) --
    durability = parser.add_argument_group(
        "checkpoints and devices", "Resume after a kill or a preemption: weights, optimizer and "
        "lrctl's state (schedule, version, history, pending changes, dedup ids). SIGTERM/SIGINT "
        "refuse new changes (UNAVAILABLE), finish the step, cancel pending changes, checkpoint "
        "and exit 0.")
    durability.add_argument("--checkpoint-dir", metavar="DIR",
                            help="checkpoint into DIR, and resume from its newest checkpoint at start")
    durability.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                            help="also checkpoint every STEPS optimizer steps (default: only on exit)")
    durability.add_argument("--fresh", action="store_true",
                            help="start a new run in --checkpoint-dir even though it holds "
                            "checkpoints (they are left alone); without it, a folder whose "
                            "checkpoints cannot be resumed from is refused")
    durability.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                            help="keep this run's N newest checkpoints (and the one it resumed "
                            "from) (default 2)")
    durability.add_argument("--no-memory-growth", action="store_true",
                            help="let TensorFlow take all GPU memory at start (default: grow as "
                            "needed, so another process can share the GPU)")
    args = parser.parse_args(argv)
    if args.checkpoint_every is not None and (args.checkpoint_every <= 0 or not args.checkpoint_dir):
        parser.error("--checkpoint-every needs --checkpoint-dir and a number of steps > 0")
    if args.fresh and not args.checkpoint_dir:
        parser.error("--fresh needs --checkpoint-dir")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep-checkpoints must be at least 1; got {args.keep_checkpoints}")
    # -- end of checkpoints, shutdown and devices --
    return args


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """serve()'s token and TLS arguments, or a usage error; checked before TensorFlow loads."""
    from lrctl.service.rpc import auth

    def token(path: str | None, variable: str) -> list[str]:
        try:
            value = auth.read_secret(path) if path else os.environ.get(variable, "").strip()
        except (OSError, ValueError) as e:
            raise _UsageError(f"cannot read the token file: {e}") from None
        return [value] if value else []

    write, read = token(args.token_file, "LRCTL_TOKEN"), token(args.read_token_file, "LRCTL_READ_TOKEN")
    if read and not write:
        raise _UsageError("a read token needs a write token too (--token-file or LRCTL_TOKEN)")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise _UsageError("--tls-cert and --tls-key go together, and --tls-client-ca needs both")
    credentials = None
    if args.tls_cert:
        try:
            credentials = auth.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        except OSError as e:
            raise _UsageError(f"cannot read a TLS file: {e}") from None
    if auth.exposed(args.listen, tokens=bool(write), credentials=credentials, insecure=args.insecure):
        raise _UsageError(
            f"refusing to listen on {args.listen} without authentication: anyone who can reach it "
            "could change the learning rate (TLS alone does not say who may connect). Give "
            "--token-file PATH (or set LRCTL_TOKEN), or mutual TLS (--tls-client-ca with "
            "--tls-cert/--tls-key), or --insecure to accept the risk.")
    return {"write_tokens": write, "read_tokens": read, "credentials": credentials,
            "insecure": args.insecure, "health_address": args.health_listen}


def _guardrails(args: argparse.Namespace) -> Guardrails:
    from lrctl.service.control.guardrails import Guardrails  # numpy: the [service] extra

    try:
        return Guardrails(min_learning_rate=args.min_learning_rate,
                          max_learning_rate=args.max_learning_rate,
                          max_change_factor=args.max_change_factor,
                          max_changes_per_minute=args.max_changes_per_minute or None)
    except ValueError as e:
        raise _UsageError(str(e)) from None


def _initial_schedule(args: argparse.Namespace) -> specs.ScheduleSpec | None:
    """`--learning-rate` or `--schedule`, checked before TensorFlow loads (specs is pure Python)."""
    if args.learning_rate is not None:
        flag, value = "--learning-rate", args.learning_rate
    elif args.schedule is not None:
        flag = "--schedule"
        try:
            value = json.loads(args.schedule)
        except json.JSONDecodeError as e:
            raise _UsageError(f"--schedule is not valid JSON ({e}). Received: {args.schedule}") from None
        if not isinstance(value, dict) or not isinstance(value.get("config", {}), dict):
            raise _UsageError(
                '--schedule must be a JSON object {"class_name": ..., "config": {...}}, as '
                f"keras.optimizers.schedules.serialize() returns. Received: {args.schedule}"
            )
    else:
        return None
    try:
        return specs.as_spec(value)
    except ValueError as e:  # InvalidArgumentError, worded like Keras's own errors
        raise _UsageError(f"{flag}: {e}") from None


def _require_service() -> None:
    """On a client-only install (`pip install lrctl`), say what to install, not a traceback.
    Found, not imported: TensorFlow loads for seconds, and the port is checked first."""
    for name in SERVICE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise _UsageError(
                f"{name} is not installed; the trainer needs the service extra: "
                'pip install "lrctl[service]"'
            )


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
        raise _UsageError(f"--model must be MODULE:FUNCTION, e.g. my_pkg.train:build. Received: {target}")
    sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory resolve
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- whatever the user's module raises, say it in one line
        raise _UsageError(f"--model {target}: cannot import {module_name}: {_summary(e)}") from None
    build = getattr(module, function_name, None)
    if not callable(build):
        raise _UsageError(f"--model {target}: {module_name} has no function {function_name}")
    try:
        built = build()
    except Exception as e:  # noqa: BLE001
        raise _UsageError(f"--model {target}: {function_name}() raised {_summary(e)}") from None
    if not (isinstance(built, (tuple, list)) and len(built) == 2):
        raise _UsageError(f"--model {target}: {function_name}() must return (model, data). "
                          f"Received: {type(built).__name__}")
    model, data = built
    if not isinstance(model, keras.Model) or getattr(model, "optimizer", None) is None:
        raise _UsageError(f"--model {target}: {function_name}() must return a compiled keras.Model "
                          f"first (call model.compile). Received: {type(model).__name__}")
    if isinstance(data, tuple) and len(data) != 2:
        raise _UsageError(f"--model {target}: data must be a tf.data.Dataset or an (x, y) tuple. "
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


# -- metrics and TensorBoard (issue #8, items 4-5) --
def _metrics(args: argparse.Namespace, slot: ControllerSlot, stack: contextlib.ExitStack) -> list[Any]:
    """Start the metrics endpoint (`--metrics-listen`) before the server, so that its RPC
    counter sees every call; `stack` stops it. Returns the gRPC interceptors to add."""
    interceptors: list[Any] = []
    if args.metrics_listen:
        if args.metrics_listen.startswith(("unix:", "unix-abstract:")):
            raise _UsageError("--metrics-listen must be HOST:PORT")
        try:
            from lrctl.service.observability.metrics import TrainingMetrics, split_address
        except ModuleNotFoundError as e:
            raise _UsageError(f"{e.name} is not installed; --metrics-listen needs the service "
                              'extra: pip install "lrctl[service]"') from None
        metrics = TrainingMetrics(slot)  # the state's gauges once the controller is bound
        host, port = split_address(args.metrics_listen)
        try:
            bound = stack.enter_context(metrics.serving(host, port))
        except OSError as e:
            raise _StartError(f"cannot serve metrics on {args.metrics_listen}: {e}") from None
        logger.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
        interceptors.append(metrics.interceptor)
    return interceptors


def _tensorboard(args: argparse.Namespace, control: TrainingControl, stack: contextlib.ExitStack,
                 callbacks: list[Any]) -> None:
    """Add the TensorBoard callback (`--tensorboard-dir`); `stack` closes it."""
    if args.tensorboard_dir:
        if args.tensorboard_every < 1:
            raise _UsageError("--tensorboard-every must be at least 1")
        from lrctl.service.observability.tensorboard import TensorBoardLogger

        board = TensorBoardLogger(control, args.tensorboard_dir, every=args.tensorboard_every)
        stack.callback(board.close)
        callbacks.append(board)  # after control.callback: it sees the changes applied
# -- end of metrics and TensorBoard --


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
                raise _StartError(f"{flag}: {e}") from None


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


def _train(args: argparse.Namespace, initial: specs.ScheduleSpec | None,
           security: dict[str, Any], limits: Guardrails) -> None:
    from lrctl.service.rpc.journal import Journal
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
    journal_path = args.journal or (os.path.join(args.checkpoint_dir, "lrctl-journal.jsonl")
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
        raise _StartError(str(e)) from None
    finally:
        if journal is not None:
            journal.close()
    if control is not None:
        snap = control.controller.snapshot()
        logger.info("run %s %s at step %d, lr %.6g, version %d", snap.run_id, snap.phase.value,
                    snap.step, snap.learning_rate, snap.version)


def _fit(args: argparse.Namespace, initial: specs.ScheduleSpec | None, limits: Guardrails,
         slot: ControllerSlot, journal: Journal | None, observers: contextlib.ExitStack,
         run_id: str | None) -> TrainingControl | None:
    """Load TensorFlow, build the model, resume, bind the controller into `slot` and train.
    `run_id`: None lets a resumed checkpoint's name the run. Returns the control, or None when
    the goal (`--steps`, `--epochs`) was reached already: nothing trained, nothing saved."""
    import tensorflow as tf

    from lrctl.service.apps import demo
    from lrctl.service.training.integration import TrainingControl

    _use_devices(args.no_memory_growth)
    model, data = demo.build() if args.demo else _load(args.model)
    try:
        control = TrainingControl(model.optimizer, run_id=run_id, guardrails=limits,
                                  revert_on_nan=args.revert_on_nan or None, initial_schedule=initial,
                                  incarnation=slot.incarnation)
    except (TypeError, ValueError) as e:  # e.g. a custom schedule lrctl cannot express
        raise _UsageError(" ".join(str(e).split())) from None

    # Signal handlers only set a flag: the training thread acts on it at the next boundary,
    # so a stop never lands in the middle of a step (or of a lock held by that thread).
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        control.controller.shut_down()  # one attribute store: new changes get UNAVAILABLE

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    checkpoints: Checkpointer | None = None
    try:
        fit_args: dict[str, Any] = {"epochs": args.epochs or UNTIL_STOPPED_EPOCHS, "verbose": args.verbose,
                                    "callbacks": [control.callback,
                                                  *_stop_callbacks(control, stop, args.steps)]}
        if isinstance(data, tuple):
            fit_args.update(x=data[0], y=data[1])
        else:
            fit_args.update(x=data, shuffle=False)  # a dataset shuffles itself; Keras warns otherwise
            if isinstance(data, tf.data.Dataset) and data.cardinality() == tf.data.INFINITE_CARDINALITY:
                fit_args["steps_per_epoch"] = demo.STEPS_PER_EPOCH

        # -- checkpoints (issue #8): resume, then save every N steps and when fit returns --
        if args.checkpoint_dir:
            from lrctl.service.control.disk import CheckpointError
            from lrctl.service.training.checkpoints import Checkpointer

            try:
                checkpoints = Checkpointer(control, model, args.checkpoint_dir, every=args.checkpoint_every,
                                           keep=args.keep_checkpoints)
                resumed = checkpoints.restore(fresh=args.fresh)
            except CheckpointError as e:
                raise _StartError(f"{e}. Pass --fresh to start a new run there (its files are left "
                                  "alone), or choose another --checkpoint-dir") from None
            except OSError as e:
                raise _StartError(f"cannot resume from {args.checkpoint_dir}: {e}") from None
            if resumed is not None and journal is not None:
                snap = control.controller.snapshot()
                journal.record(event="resumed", checkpoint=args.checkpoint_dir, step=snap.step,
                               version=snap.version, run_id=snap.run_id,
                               checkpoint_run_id=resumed.get("run_id"), replayed=checkpoints.replayed,
                               note="changes acknowledged after this step were replayed from the "
                               "write-ahead log")
            fit_args["callbacks"].append(checkpoints.callback)
        # -- end of checkpoints --
        # --steps and --epochs are the run's totals: a resume trains what is left, from the
        # epoch after the last one completed (so the state's epoch goes on), or nothing.
        done, step = control.controller.epochs_done, control.step
        if args.steps is not None and step >= args.steps:
            logger.info("run %s: already at step %d, the --steps %d asked for; nothing to train",
                        control.controller.snapshot().run_id, step, args.steps)
            return None
        if args.epochs and done >= args.epochs:
            logger.info("run %s: already %d epochs done, the --epochs %d asked for; nothing to train",
                        control.controller.snapshot().run_id, done, args.epochs)
            return None
        fit_args["initial_epoch"] = done
        # -- metrics and TensorBoard (issue #8, items 4-5) --
        _tensorboard(args, control, observers, fit_args["callbacks"])
        # -- end of metrics and TensorBoard --
        slot.bind(control.controller)  # from now on the server answers for the run
        try:
            model.fit(**fit_args)
            if checkpoints is not None:  # issue #8: the final checkpoint, server still up
                checkpoints.save()
        except BaseException:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        initial = _initial_schedule(args)
        security = _security(args)
        _require_service()
        _train(args, initial, security, _guardrails(args))
    except _UsageError as e:
        print(f"lrctl-trainer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _StartError as e:
        print(f"lrctl-trainer: error: {e}", file=sys.stderr)
        return EXIT_START
    return 0


if __name__ == "__main__":
    sys.exit(main())
