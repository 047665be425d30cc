"""`lrctl`'s command line: the parser and the checks argparse cannot make.

The shared flags are `cli_flags`' (the change flags and their help come from `ChangeOptions`
and `Swap`), the value parsers `cli_values`', the run-control commands `cli_run_control`'s;
the swap kinds and their flags come from the proto's schedule kinds (`lrctl.client.schedules`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lrctl.client import schedules
from lrctl.client.changes import ChangeOptions
from lrctl.client.cli_flags import (
    DEFAULT_PREVIEW_STEPS,
    DEFAULT_TIMEOUT,
    add_change_flags,
    add_global_flags,
    add_option_flags,
)
from lrctl.client.cli_output import EXIT_FAILED_PRECONDITION, EXIT_NOT_FOUND, describe_exit_codes
from lrctl.client.cli_run_control import add_run_commands
from lrctl.client.cli_values import (
    assignment,
    float_list,
    int_at_least,
    int_list,
    knots,
    non_negative_float,
)
from lrctl.client.schedule_fields import Field
from lrctl.v1 import training_control_pb2 as pb

__all__ = [
    "DEFAULT_HISTORY_LIMIT", "DEFAULT_PREVIEW_STEPS", "DEFAULT_TIMEOUT", "SWAP_KINDS",
    "UsageError", "build_parser", "check", "schedule_from_args",
]

#: `lrctl history` without `--limit`.
DEFAULT_HISTORY_LIMIT = 20


class UsageError(Exception):
    """A command-line value that argparse could not check (exit code 2)."""


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
    "ints": int_list,
    "floats": float_list,
    "knots": knots,
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



# --- the parser ---


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
    add_global_flags(parser, hidden=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *examples: str, usage: str | None = None,
                conflict_handler: str = "error") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, usage=usage,
                                  epilog=_examples(*examples), conflict_handler=conflict_handler,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_global_flags(sub, hidden=True)
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
    add_change_flags(p)

    p = command("scale", "multiply the active schedule by FACTOR (cumulative; 0.5 halves the "
                "learning rate)", 'lrctl scale 0.5 --reason "loss plateau"',
                "lrctl scale 0.5 --expected-run-id run-7 --after-steps 100",
                usage="%(prog)s FACTOR [options]")
    p.add_argument("factor", type=float, metavar="FACTOR", help=argparse.SUPPRESS)
    add_change_flags(p)

    p = command("set-param", "set optimizer hyperparameters or registered variables by name "
                "(lrctl state lists them), as one change",
                "lrctl set-param momentum=0.95 beta_2=0.98",
                "lrctl set-param weight_decay=1e-4 --at-step 5000 --json",
                usage="%(prog)s NAME=VALUE [NAME=VALUE ...] [options]")
    p.add_argument("assignments", nargs="+", type=assignment, metavar="NAME=VALUE",
                   help=argparse.SUPPRESS)
    add_change_flags(p)

    swap = command(
        "swap", "replace the learning-rate schedule",
        "lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 5 \\\n"
        "      --decay-rate 0.8 --staircase",
        "lrctl swap piecewise-linear --knots 0:0.0,100:0.1,1000:0.001 --origin global",
        usage="%(prog)s KIND --KIND-ARGUMENT VALUE ... [options]")
    add_change_flags(swap, swap=True)
    kinds = swap.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, kind in SWAP_KINDS.items():
        k = kinds.add_parser(
            name, prog=f"lrctl swap {name}", help=kind.help, description=kind.help,
            epilog="The change options (`lrctl swap --help`) go before or after KIND.")
        add_global_flags(k, hidden=True)
        group = k.add_argument_group(f"{name} arguments (Keras names)")
        for field in kind.args:
            flag = "--" + field.name.replace("_", "-")
            if field.kind == "bool":
                group.add_argument(flag, dest=field.name, action="store_true", help=field.help)
            else:
                group.add_argument(flag, dest=field.name, type=_FROM_TEXT[field.kind],
                                   required=field.required, metavar=field.name.upper(),
                                   help=_flag_help(field))
        add_change_flags(k, swap=True, hidden=True)

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
    add_option_flags(p, ChangeOptions,
                      names=("reason", "expected_run_id", "expected_incarnation"))

    add_run_commands(command)

    p = command("history", "list changes, newest first (pending and finished)",
                "lrctl history --limit 5", "lrctl history --filter 'status = APPLIED AND version >= 12'")
    p.add_argument("--limit", type=int_at_least(1), default=DEFAULT_HISTORY_LIMIT, metavar="N",
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
        "--min-interval", type=non_negative_float, default=1.0, metavar="SECONDS",
        help="at most one update per interval while training advances (default 1.0)")
    p.add_argument("--count", type=int, metavar="N", help="exit after N updates")

    p = command("measurements", "list the run's measurements (batch and epoch logs), oldest first",
                "lrctl measurements --start-step 1000 --json", "lrctl measurements --follow")
    p.add_argument("--start-step", type=int_at_least(0), default=0, metavar="N",
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
