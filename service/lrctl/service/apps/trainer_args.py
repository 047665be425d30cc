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
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# Pure Python (and gRPC, a client dependency): TensorFlow, Keras and the server load only after
# the command line is checked, so `--help` and usage errors answer at once, and a client-only
# install gets a clear message.
from lrctl.service.rpc.auth import DEFAULT_ADDRESS, exposed, read_secret, server_credentials
from lrctl.service.schedules import specs

if TYPE_CHECKING:
    from lrctl.service.control.guardrails import Guardrails

DEFAULT_MAX_LR = 10.0  # above any learning rate a sane run uses: a typo guard
DEFAULT_RATE = 600.0  # changes a minute: far above any controller's need, far below a flood
# What `pip install "lrctl[service]"` adds to the client's dependencies.
SERVICE_MODULES = ("tensorflow", "keras", "grpc_reflection")


class UsageError(Exception):
    """A bad --model, --schedule or install: one line on stderr and exit code 2."""


class StartError(Exception):
    """The server could not start (its port is taken): one line on stderr and exit code 3."""


def listen_address(text: str) -> str:
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


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lrctl-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--demo", action="store_true", help="train the built-in demo task")
    task.add_argument("--model", metavar="MODULE:FUNCTION", help="train your own model (see above)")
    parser.add_argument("--listen", default=DEFAULT_ADDRESS, type=listen_address,
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
    security.add_argument("--health-listen", metavar="HOST:PORT", type=listen_address,
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
    limits.add_argument("--parameter-bounds", action="append", default=[], metavar="NAME=MIN:MAX",
                        type=parameter_bound,
                        help="bounds on a hyperparameter SetOptimizerParameters may set, e.g. "
                        "momentum=0.8:0.99 or weight_decay=:0.01 (either side may be empty); repeatable")
    limits.add_argument("--max-changes-per-minute", type=float, default=DEFAULT_RATE, metavar="N",
                        help=f"accept at most N changes a minute (default {DEFAULT_RATE:g})")
    limits.add_argument("--revert-on-nan", type=int, default=0, metavar="K",
                        help="if the loss turns NaN/Inf within K steps of a change, restore the "
                        "weights, optimizer slots and schedule from before it (default 0: off; "
                        "costs a host copy of the weights and slots while watching)")

    observe = parser.add_argument_group("metrics and TensorBoard")
    observe.add_argument("--metrics-listen", metavar="HOST:PORT", type=listen_address,
                         help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
                         "(port 0 picks one; default: off)")
    observe.add_argument("--tensorboard-dir", metavar="DIR",
                         help="write the learning rate and every applied change as TensorBoard "
                         "summaries into DIR (default: off)")
    observe.add_argument("--tensorboard-every", type=int, default=1, metavar="N",
                         help="write the learning rate every N steps (default 1)")

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
    durability.add_argument("--checkpoint-root", metavar="DIR",
                            help="let LoadCheckpoint load checkpoints from under DIR (after "
                            "resolving links and '..'; relative paths are taken under DIR); "
                            "without it LoadCheckpoint is refused (FAILED_PRECONDITION)")
    durability.add_argument("--no-memory-growth", action="store_true",
                            help="let TensorFlow take all GPU memory at start (default: grow as "
                            "needed, so another process can share the GPU)")
    args = parser.parse_args(argv)
    if args.checkpoint_every is not None and (args.checkpoint_every <= 0 or not args.checkpoint_dir):
        parser.error("--checkpoint-every needs --checkpoint-dir and a number of steps > 0")
    if args.fresh and not args.checkpoint_dir:
        parser.error("--fresh needs --checkpoint-dir")
    if args.checkpoint_root is not None and not os.path.isdir(args.checkpoint_root):
        parser.error(f"--checkpoint-root must be an existing folder; got {args.checkpoint_root!r}")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep-checkpoints must be at least 1; got {args.keep_checkpoints}")
    return args


def security(args: argparse.Namespace) -> dict[str, Any]:
    """serve()'s token and TLS arguments, or a usage error; checked before TensorFlow loads."""

    def token(path: str | None, variable: str) -> list[str]:
        try:
            value = read_secret(path) if path else os.environ.get(variable, "").strip()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the token file: {e}") from None
        return [value] if value else []

    write, read = token(args.token_file, "LRCTL_TOKEN"), token(args.read_token_file, "LRCTL_READ_TOKEN")
    if read and not write:
        raise UsageError("a read token needs a write token too (--token-file or LRCTL_TOKEN)")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        raise UsageError("--tls-cert and --tls-key go together, and --tls-client-ca needs both")
    credentials = None
    if args.tls_cert:
        try:
            credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        except OSError as e:
            raise UsageError(f"cannot read a TLS file: {e}") from None
    if exposed(args.listen, tokens=bool(write), credentials=credentials, insecure=args.insecure):
        raise UsageError(
            f"refusing to listen on {args.listen} without authentication: anyone who can reach it "
            "could change the learning rate (TLS alone does not say who may connect). Give "
            "--token-file PATH (or set LRCTL_TOKEN), or mutual TLS (--tls-client-ca with "
            "--tls-cert/--tls-key), or --insecure to accept the risk.")
    return {"write_tokens": write, "read_tokens": read, "credentials": credentials,
            "insecure": args.insecure, "health_address": args.health_listen}


def parameter_bound(text: str) -> tuple[str, float | None, float | None]:
    """--parameter-bounds NAME=MIN:MAX (either side may be empty)."""
    name, _, span = text.partition("=")
    lo, colon, hi = span.partition(":")
    try:
        if not name or not colon:
            raise ValueError
        return name, float(lo) if lo else None, float(hi) if hi else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=MIN:MAX (e.g. momentum=0.8:0.99), got {text!r}") from None


def guardrails(args: argparse.Namespace) -> Guardrails:
    from lrctl.service.control.guardrails import Guardrails  # numpy: the [service] extra

    try:
        return Guardrails(min_learning_rate=args.min_learning_rate,
                          max_learning_rate=args.max_learning_rate,
                          max_change_factor=args.max_change_factor,
                          max_changes_per_minute=args.max_changes_per_minute or None,
                          parameter_bounds=tuple(getattr(args, "parameter_bounds", None) or ()))
    except ValueError as e:
        raise UsageError(str(e)) from None


def initial_schedule(args: argparse.Namespace) -> specs.ScheduleSpec | None:
    """`--learning-rate` or `--schedule`, checked before TensorFlow loads (specs is pure Python)."""
    if args.learning_rate is not None:
        flag, value = "--learning-rate", args.learning_rate
    elif args.schedule is not None:
        flag = "--schedule"
        try:
            value = json.loads(args.schedule)
        except json.JSONDecodeError as e:
            raise UsageError(f"--schedule is not valid JSON ({e}). Received: {args.schedule}") from None
        if not isinstance(value, dict) or not isinstance(value.get("config", {}), dict):
            raise UsageError(
                '--schedule must be a JSON object {"class_name": ..., "config": {...}}, as '
                f"keras.optimizers.schedules.serialize() returns. Received: {args.schedule}"
            )
    else:
        return None
    try:
        return specs.as_spec(value)
    except ValueError as e:  # InvalidArgumentError, worded like Keras's own errors
        raise UsageError(f"{flag}: {e}") from None


def require_service() -> None:
    """On a client-only install (`pip install lrctl`), say what to install, not a traceback.
    Found, not imported: TensorFlow loads for seconds, and the port is checked first."""
    for name in SERVICE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise UsageError(
                f"{name} is not installed; the trainer needs the service extra: "
                'pip install "lrctl[service]"'
            )
