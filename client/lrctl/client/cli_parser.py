"""`lrctl`'s command line: the parser, its value checks, and the checks argparse cannot make.

The change flags and their help come from `ChangeOptions` and `Swap` (`lrctl.client.changes`),
the swap kinds and their flags from the proto's schedule kinds (`lrctl.client.schedules`).
The global flags are accepted before and after the command, and listed once, in `lrctl --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable
from typing import Any

from lrctl.client import schedules
from lrctl.client.changes import ChangeOptions, Swap
from lrctl.client.channels import DEFAULT_TARGET
from lrctl.client.cli_output import (
    EXIT_FAILED_PRECONDITION,
    EXIT_NOT_FOUND,
    EXIT_VERSION_CONFLICT,
    describe_exit_codes,
)
from lrctl.client.schedule_fields import Field
from lrctl.v1 import training_control_pb2 as pb

__all__ = [
    "DEFAULT_HISTORY_LIMIT", "DEFAULT_PREVIEW_STEPS", "DEFAULT_TIMEOUT", "SWAP_KINDS",
    "UsageError", "build_parser", "check", "schedule_from_args",
]

#: `--dry-run` without `--preview-steps`: the steps the chart covers.
DEFAULT_PREVIEW_STEPS = 1000
#: `lrctl history` without `--limit`.
DEFAULT_HISTORY_LIMIT = 20
#: `--timeout` when not given: seconds.
DEFAULT_TIMEOUT = 10.0


class UsageError(Exception):
    """A command-line value that argparse could not check (exit code 2)."""


class _NoToken(argparse.Action):
    """`--token`: refused without echoing its value (a token in argv shows in `ps` and in
    shell history). Without it, argparse would take `--token X` as `--token-file X`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("there is no --token flag (it would show in `ps` and shell history); "
                     "use --token-file PATH or $LRCTL_TOKEN")


# --- value parsers for argparse ---


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 100,200; got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.1,0.01; got {text!r}") from None


def _knots(text: str) -> list[tuple[int, float]]:
    knots: list[tuple[int, float]] = []
    for item in (v for v in text.split(",") if v.strip()):
        step, sep, lr = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            knots.append((int(step), float(lr)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected STEP:LR pairs, e.g. 0:0.0,100:0.1; got {item!r}"
            ) from None
    return knots


#: gRPC name-resolver schemes: a target that starts with one goes to gRPC as it is.
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _target(text: str) -> str:
    """`--target`: HOST:PORT (an IPv6 host in brackets) or a gRPC target such as unix:PATH.
    Without a port, gRPC would dial port 443 and report only "unavailable"."""
    if text.startswith(_TARGET_SCHEMES):
        return text
    source = " (from $LRCTL_TARGET)" if text == os.environ.get("LRCTL_TARGET") else ""
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"use HOST:PORT, not a URL, e.g. localhost:50051; got {text!r}{source}"
        )
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port from 1 to 65535, e.g. localhost:50051, "
            f"[::1]:50051 or unix:PATH; got {text!r}{source}"
        )
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(
            f"put an IPv6 host in brackets, e.g. [::1]:50051; got {text!r}{source}"
        )
    return text


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


#: `lrctl pause --timeout`'s units.
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """A duration such as 90s, 30m, 1.5h or 7d (a bare number: seconds), > 0."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration > 0 such as 90s, 30m, 1h or 7d; got {text!r}")
    return seconds


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


# --- the swap kinds: schedules' table drives the parsers and the request mapping ---

#: `lrctl swap KIND`: one subcommand per schedule kind, named after its field in
#: `Schedule.kind` (kebab case); its flags are the builder's arguments. Flags left
#: out fall back to the builder's (Keras) defaults.
SWAP_KINDS: dict[str, schedules.Kind] = {
    kind.oneof_field.replace("_", "-"): kind for kind in schedules.KINDS
}

# How a flag's text becomes the builder's argument, by `Field.kind`. "bool"
# arguments are switches (--staircase) and take no text.
_FROM_TEXT: dict[str, Callable[[str], Any]] = {
    "float": float,
    "int": int,
    "ints": _int_list,
    "floats": _float_list,
    "knots": _knots,
}


def _flag_help(field: Field) -> str:
    # The table holds each default once; the help shows it where a flag may be left out.
    if field.required or field.kind == "bool":
        return field.help
    if field.default is None:
        return f"{field.help} (default: none)"
    return f"{field.help} (default {field.default})"


def schedule_from_args(args: argparse.Namespace) -> pb.Schedule:
    """Build the Schedule for `lrctl swap KIND` from parsed arguments."""
    kind = SWAP_KINDS[args.kind]
    kwargs: dict[str, Any] = {}
    for field in kind.args:
        value = getattr(args, field.name)
        if value is not None:
            kwargs[field.name] = value
    return kind.builder(**kwargs)



# --- the flags ---

#: What the command line adds to an option's help (the option's own help comes first).
_FLAG_NOTES = {
    "apply_at_step": "implies --no-wait",
    "apply_after_steps": "excludes --at-step; implies --no-wait",
    "expected_version": f"else exit {EXIT_VERSION_CONFLICT}",
    "expected_run_id": f"else exit {EXIT_FAILED_PRECONDITION}",
    "expected_incarnation": f"else exit {EXIT_FAILED_PRECONDITION}",
    "validate_only": "charts the LR before and after",
    "preview_steps": f"default {DEFAULT_PREVIEW_STEPS}; 0: no chart",
}
#: `--no-wait` clears `wait`, which a person at a terminal wants by default.
_FLAG_HELP = {"wait": "return once queued (default: wait until applied)"}
#: Defaults of the command line's own: `--preview-steps` not given (None) follows --dry-run.
_FLAG_DEFAULTS: dict[str, Any] = {"preview_steps": None}


def _add_option_flags(parser: Any, cls: type, *, hidden: bool = False,
                      names: tuple[str, ...] | None = None) -> None:
    """A flag for each field of `cls` (`ChangeOptions`, `Swap`) that has one, or for each of
    `names`, as the field's `option` metadata says; its value lands under the field's name.
    `hidden`: accepted but not listed, and its default SUPPRESS, so as not to overwrite the
    same flag given earlier on the command line (before the swap kind)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "flag" not in meta or (names is not None and field.name not in names):
            continue
        note = _FLAG_NOTES.get(field.name)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "help": _FLAG_HELP.get(field.name, meta["help"] + (f"; {note}" if note else "")),
        }
        default: Any = field.default
        if isinstance(field.default, bool):  # a switch: --dry-run sets, --no-wait clears
            clears = meta["flag"].startswith("--no-")
            kwargs["action"] = "store_false" if clears else "store_true"
            default = clears
        elif "choices" in meta:
            kwargs["choices"] = meta["choices"]
        else:
            hint = hints[field.name]
            base = next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))
            kwargs["type"] = _int_at_least(meta["minimum"]) if "minimum" in meta else base
            kwargs["metavar"] = meta["metavar"]
        default = _FLAG_DEFAULTS.get(field.name, default)
        if hidden:
            kwargs["help"] = default = argparse.SUPPRESS
        parser.add_argument(meta["flag"], default=default, **kwargs)


def _add_global_flags(parser: argparse.ArgumentParser, *, hidden: bool) -> None:
    # Accepted before and after the command; listed once, in `lrctl --help`. After the
    # command their default is SUPPRESS, so a flag given before it is not overwritten.
    def flag(*names: str, default: Any, help: str, **kwargs: Any) -> None:
        if hidden:
            default = help = argparse.SUPPRESS
        group.add_argument(*names, default=default, help=help, **kwargs)

    group = parser if hidden else parser.add_argument_group(
        "global options (before or after the command)")
    flag("--target", type=_target, default=os.environ.get("LRCTL_TARGET", DEFAULT_TARGET),
         help=f"server address host:port (default: $LRCTL_TARGET or {DEFAULT_TARGET})")
    flag("--json", action="store_true", default=False,
         help="print messages as JSON (one object per line; int64 values as numbers, zero "
              "values printed) and errors as one JSON object on stderr")
    flag("--timeout", type=_non_negative_float, default=DEFAULT_TIMEOUT,
         help=f"RPC deadline in seconds (default {DEFAULT_TIMEOUT:g}; 0: none); also bounds "
              f"waiting for a change")
    flag("-v", "--verbose", action="store_true", default=False,
         help="log debug information to stderr")
    flag("--token-file", metavar="PATH", default=None,
         help="read the bearer token from PATH (default: $LRCTL_TOKEN; none if unset). "
              "There is no flag for the token itself: it would show in `ps` and shell history")
    group.add_argument("--token", nargs="?", action=_NoToken, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    flag("--ca", metavar="PATH", default=None,
         help="TLS: verify the server with this CA certificate (PEM); any of --ca, --cert, "
              "--key switches to TLS (without --ca: the system's roots)")
    flag("--cert", metavar="PATH", default=None,
         help="mutual TLS: client certificate (PEM); needs --key")
    flag("--key", metavar="PATH", default=None, help="mutual TLS: client key (PEM); needs --cert")


#: The change options of the run-control commands (their requests have no force or preview).
RUN_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ChangeOptions)
                         if f.name not in ("force", "preview_steps"))
#: The run-control commands and the client method each calls.
RUN_COMMANDS = {"pause": "pause_training", "resume": "resume_training",
                "checkpoint": "save_checkpoint", "stop": "stop_training", "load": "load_checkpoint"}


def _add_change_flags(parser: argparse.ArgumentParser, *, swap: bool = False,
                      hidden: bool = False) -> None:
    if swap:
        _add_option_flags(parser, Swap, hidden=hidden)
    _add_option_flags(parser, ChangeOptions, hidden=hidden)


# --- the parser ---


def _assignment(text: str) -> tuple[str, float]:
    """NAME=VALUE of `set-param`."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. momentum=0.9), got {text!r}") from None


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


_EPILOG = f"""\
exit codes:
{describe_exit_codes()}

{_examples(
    "lrctl state",
    'lrctl scale 0.5 --reason "loss plateau"',
    "lrctl --token-file ~/.lrctl-token --ca ca.crt history",
    "lrctl COMMAND --help      the command's options and examples",
)}"""


_ONE_CHANGE = "%(prog)s (NAME | REQUEST_ID | --version N) [options]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrctl",
        description="Change the learning rate of a running TensorFlow/Keras training job.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_flags(parser, hidden=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *examples: str, usage: str | None = None,
                conflict_handler: str = "error") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, usage=usage,
                                  epilog=_examples(*examples), conflict_handler=conflict_handler,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_global_flags(sub, hidden=True)
        return sub

    p = command("state", "show the training state", "lrctl state", "lrctl state --at-step 20000")
    p.add_argument(
        "--at-step", type=int, metavar="N",
        help="print only the learning rate the current schedule gives at the future step N "
             "(the trainer evaluates it: a dry-run no-op change, so it needs a write token)")

    # The usage and the description name the one positional argument: it is not listed again.
    p = command("set", "pin the learning rate to the constant LR (resets the scale to 1)",
                "lrctl set 0.01 --at-step 5000", "lrctl set 0.1 --dry-run --preview-steps 5000",
                usage="%(prog)s LR [options]")
    p.add_argument("learning_rate", type=float, metavar="LR", help=argparse.SUPPRESS)
    _add_change_flags(p)

    p = command("scale", "multiply the active schedule by FACTOR (cumulative; 0.5 halves the "
                "learning rate)", 'lrctl scale 0.5 --reason "loss plateau"',
                "lrctl scale 0.5 --expected-run-id run-7 --after-steps 100",
                usage="%(prog)s FACTOR [options]")
    p.add_argument("factor", type=float, metavar="FACTOR", help=argparse.SUPPRESS)
    _add_change_flags(p)

    p = command("set-param", "set optimizer hyperparameters or registered variables by name "
                "(lrctl state lists them), as one change",
                "lrctl set-param momentum=0.95 beta_2=0.98",
                "lrctl set-param weight_decay=1e-4 --at-step 5000 --json",
                usage="%(prog)s NAME=VALUE [NAME=VALUE ...] [options]")
    p.add_argument("assignments", nargs="+", type=_assignment, metavar="NAME=VALUE",
                   help=argparse.SUPPRESS)
    _add_change_flags(p)

    swap = command(
        "swap", "replace the learning-rate schedule",
        "lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 5 \\\n"
        "      --decay-rate 0.8 --staircase",
        "lrctl swap piecewise-linear --knots 0:0.0,100:0.1,1000:0.001 --origin global",
        usage="%(prog)s KIND --KIND-ARGUMENT VALUE ... [options]")
    _add_change_flags(swap, swap=True)
    kinds = swap.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, kind in SWAP_KINDS.items():
        k = kinds.add_parser(
            name, prog=f"lrctl swap {name}", help=kind.help, description=kind.help,
            epilog="The change options (`lrctl swap --help`) go before or after KIND.")
        _add_global_flags(k, hidden=True)
        group = k.add_argument_group(f"{name} arguments (Keras names)")
        for field in kind.args:
            flag = "--" + field.name.replace("_", "-")
            if field.kind == "bool":
                group.add_argument(flag, dest=field.name, action="store_true", help=field.help)
            else:
                group.add_argument(flag, dest=field.name, type=_FROM_TEXT[field.kind],
                                   required=field.required, metavar=field.name.upper(),
                                   help=_flag_help(field))
        _add_change_flags(k, swap=True, hidden=True)

    p = command("cancel", "cancel a pending change (see `lrctl history` for request ids)",
                'lrctl cancel 3f2a9c0e7b8d4e1fa2b3c4d5e6f70819 --reason "superseded"',
                usage="%(prog)s (REQUEST_ID | --version N) [options]")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("request_id", nargs="?", metavar="REQUEST_ID",
                       help="the change's request id")
    which.add_argument(
        "--version", type=int, metavar="N",
        help=f"the change that produced state version N (applied changes cannot be "
             f"cancelled: exits {EXIT_FAILED_PRECONDITION}, or {EXIT_NOT_FOUND} if unknown)")
    _add_option_flags(p, ChangeOptions,
                      names=("reason", "expected_run_id", "expected_incarnation"))

    # Run control: each a change, with the change options but --force and --preview-steps.
    # `pause --timeout` is the pause's length; the RPC deadline goes before the command there.
    p = command("pause", "pause training at the next step boundary (it resumes by itself after "
                "--timeout); changes still apply while paused",
                "lrctl pause --timeout 30m --reason 'inspect the loss spike'", "lrctl resume",
                "lrctl --timeout 5 pause    (the RPC deadline goes before the command)",
                conflict_handler="resolve")
    p.add_argument("--timeout", dest="pause_timeout", type=duration_seconds, default=None,
                   metavar="DURATION",
                   help="resume by itself after this long: 90s, 30m, 1h, up to 7d (default: the "
                        "trainer's, 1h); pausing a paused run restarts it")
    _add_option_flags(p, ChangeOptions, names=RUN_OPTION_NAMES)
    p = command("resume", "resume a paused run (no effect if it is not paused)", "lrctl resume")
    _add_option_flags(p, ChangeOptions, names=RUN_OPTION_NAMES)
    p = command("checkpoint", "write a checkpoint at the next step boundary (the trainer needs "
                "--checkpoint-dir)", "lrctl checkpoint --json", "lrctl checkpoint --at-step 5000")
    _add_option_flags(p, ChangeOptions, names=RUN_OPTION_NAMES)
    p = command("stop", "end the run for good at a step boundary: a final checkpoint, pending "
                "changes cancelled with --reason, the trainer exits 0",
                "lrctl stop --reason 'ASHA: bottom half at rung 2'", "lrctl stop --at-step 10000")
    _add_option_flags(p, ChangeOptions, names=RUN_OPTION_NAMES)
    p = command("load", "load another checkpoint's weights and optimizer state at a step "
                "boundary, keeping this run's step (PATH under the trainer's --checkpoint-root)",
                "lrctl load member-3    (its newest checkpoint)",
                "lrctl load member-3/ckpt-4000.weights.h5 --with-hyperparameters",
                usage="%(prog)s PATH [options]")
    p.add_argument("path", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--with-hyperparameters", dest="load_hyperparameters", action="store_true",
                   help="also take its learning-rate schedule and hyperparameters (default: "
                        "keep this run's)")
    _add_option_flags(p, ChangeOptions, names=RUN_OPTION_NAMES)

    p = command("history", "list changes, newest first (pending and finished)",
                "lrctl history --limit 5", "lrctl history --filter 'status = APPLIED AND version >= 12'")
    p.add_argument("--limit", type=_int_at_least(1), default=DEFAULT_HISTORY_LIMIT, metavar="N",
                   help=f"show at most N changes (default {DEFAULT_HISTORY_LIMIT})")
    p.add_argument("--filter", default="", metavar="EXPR",
                   help='only the changes that match: conditions joined by AND, each `status = '
                        'PENDING` (or !=; any status), `version >= N` (or >, <=, <, =, !=) or '
                        '`request_id = "ID"`')

    for p in (command("change", "show one change", "lrctl change changes/7", usage=_ONE_CHANGE),
              command("wait", "wait until a change is applied, failed, aborted or cancelled",
                      "lrctl --timeout 600 wait changes/7    (--timeout 0: no limit)", usage=_ONE_CHANGE)):
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("change", nargs="?", metavar="NAME | REQUEST_ID",
                           help="the change's name (changes/7: Change.name, in --json output) "
                                "or the request id it was sent with")
        which.add_argument("--version", type=int, metavar="N", help="the change that produced version N")

    p = command("watch", "stream training state updates (Ctrl-C to stop)",
                "lrctl watch --min-interval 0.5 --json")
    p.add_argument(
        "--min-interval", type=_non_negative_float, default=1.0, metavar="SECONDS",
        help="at most one update per interval while training advances (default 1.0)")
    p.add_argument("--count", type=int, metavar="N", help="exit after N updates")

    p = command("measurements", "list the run's measurements (batch and epoch logs), oldest first",
                "lrctl measurements --start-step 1000 --json", "lrctl measurements --follow")
    p.add_argument("--start-step", type=_int_at_least(0), default=0, metavar="N",
                   help="only those taken at or after step N (default 0: the oldest kept)")
    p.add_argument("--follow", action="store_true",
                   help="keep printing new measurements as they are recorded (Ctrl-C to stop)")

    p = command("health", "check server health; exit 0 only if SERVING",
                "lrctl health --service lrctl.v1.TrainingControlService")
    p.add_argument("--service", default="",
                   help='service name (default "": the server as a whole)')
    return parser


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check by itself (exits 2 with the usage)."""
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together (mutual TLS)")
    if getattr(args, "apply_after_steps", None) is not None and args.apply_at_step is not None:
        parser.error("--at-step and --after-steps exclude each other")
    if getattr(args, "preview_steps", None) is not None and not args.validate_only:
        parser.error("--preview-steps needs --dry-run (without it the change would be applied)")
    if args.command == "cancel" and args.request_id == "":
        parser.error("REQUEST_ID must not be empty")
    if args.command == "load" and not args.path:
        parser.error("PATH must not be empty")
    if args.command in ("change", "wait") and args.change == "":
        parser.error("NAME | REQUEST_ID must not be empty")
