"""`lrctl`: change the learning rate of a running training job from the command line.

Exit codes:
  0  ok
  1  any other error
  2  usage error (bad command line)
  3  invalid argument (the server rejected a value)
  4  version conflict (--expected-version did not match; the change was aborted)
  5  failed precondition (e.g. --at-step in the past, training finished, change cancelled)
  6  deadline exceeded (--timeout passed; a waited-for change stays pending)
  7  unavailable (server unreachable)
  8  not serving (`lrctl health`)
  9  not found (e.g. `lrctl cancel` of a change the server does not know)
  10 resource exhausted (a server limit was reached, e.g. too many pending changes)
  11 internal (the trainer failed to apply a change; nothing changed)
  12 unauthenticated (missing or wrong token: --token-file or $LRCTL_TOKEN)
  13 permission denied (e.g. a read-only token sending a change)

`lrctl cancel` of a change that already ended (applied, aborted, failed) exits 5.

With --json (for scripts and jq):
  * output is protobuf JSON, one object per line, camelCase field names, enums by name;
  * int64 values (step, version, applyAtStep, ...) are JSON numbers, not strings;
  * every field is printed, zero values included ("version": 0, "learningRate": 0); only
    `optional` fields that are not set are left out (a pending change has no "appliedStep"
    or "learningRateAfter" yet): use `.appliedStep // empty` in jq;
  * an error is one JSON object on stderr, with the exit code as above:
      {"code": "ABORTED", "exit_code": 4, "message": "...", "current_version": 7,
       "field_violations": [{"field": "...", "description": "..."}]}
    "code" is the gRPC status name ("USAGE" for a bad value the server never saw);
    "current_version" and "field_violations" appear only when the server sent them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lrctl.client import errors, schedules
from lrctl.client.client import DEFAULT_TARGET, TrainingControlClient, tls_credentials
from lrctl.v1 import training_control_pb2 as pb

__all__ = ["EXIT_CODES", "SWAP_KINDS", "build_parser", "describe_change", "main", "render_preview"]

log = logging.getLogger("lrctl")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INVALID_ARGUMENT = 3
EXIT_VERSION_CONFLICT = 4
EXIT_FAILED_PRECONDITION = 5
EXIT_DEADLINE_EXCEEDED = 6
EXIT_UNAVAILABLE = 7
EXIT_NOT_SERVING = 8
EXIT_NOT_FOUND = 9
EXIT_RESOURCE_EXHAUSTED = 10
EXIT_INTERNAL = 11
EXIT_UNAUTHENTICATED = 12
EXIT_PERMISSION_DENIED = 13

EXIT_CODES: dict[type[errors.LrctlError], int] = {
    errors.InvalidArgument: EXIT_INVALID_ARGUMENT,
    errors.VersionConflict: EXIT_VERSION_CONFLICT,
    errors.FailedPrecondition: EXIT_FAILED_PRECONDITION,
    errors.DeadlineExceeded: EXIT_DEADLINE_EXCEEDED,
    errors.Unavailable: EXIT_UNAVAILABLE,
    errors.NotFound: EXIT_NOT_FOUND,
    errors.ResourceExhausted: EXIT_RESOURCE_EXHAUSTED,
    errors.Internal: EXIT_INTERNAL,
    errors.Unauthenticated: EXIT_UNAUTHENTICATED,
    errors.PermissionDenied: EXIT_PERMISSION_DENIED,
}

_EPILOG = """\
exit codes:
  0 ok, 1 other error, 2 usage, 3 invalid argument, 4 version conflict,
  5 failed precondition (e.g. cancel of a change that already ended), 6 deadline
  exceeded, 7 unavailable (server unreachable), 8 not serving (health), 9 not found,
  10 resource exhausted, 11 internal, 12 unauthenticated, 13 permission denied

examples:
  lrctl state
  lrctl scale 0.5 --reason "loss plateau"
  lrctl set 0.01 --at-step 5000 --no-wait
  lrctl swap exponential-decay --initial-learning-rate 0.005 --decay-steps 5 \\
      --decay-rate 0.8 --staircase
  lrctl swap piecewise-linear --knots 0:0.0,100:0.1,1000:0.001 --origin global
  lrctl set 0.1 --dry-run --preview-steps 5000
  lrctl state --at-step 20000
  lrctl scale 0.5 --expected-run-id run-7 --after-steps 100
  lrctl set 0.01 --expected-incarnation 3f2a9c0e7b8d
  lrctl history --limit 5
  lrctl cancel 3f2a9c0e7b8d4e1fa2b3c4d5e6f70819 --reason "superseded"
  lrctl --token-file ~/.lrctl-token --ca ca.crt state
  lrctl watch --min-interval 0.5 --json

--json: int64 values are numbers; zero values are printed, unset optional fields omitted;
  errors are one JSON object on stderr:
  {"code", "exit_code", "message", "current_version", "field_violations"}
"""


#: `--dry-run` without `--preview-steps`: the steps the chart covers.
DEFAULT_PREVIEW_STEPS = 1000
#: `lrctl history` without `--limit`.
DEFAULT_HISTORY_LIMIT = 20
#: ListChanges' largest page.
_MAX_PAGE_SIZE = 100


class _Usage(Exception):
    """A command-line value that argparse could not check (exit code 2)."""


class _NoToken(argparse.Action):
    """`--token`: refused without echoing its value (a token in argv shows in `ps` and in
    shell history). Without it, argparse would take `--token X` as `--token-file X`."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "there is no --token flag (it would show in `ps` and shell history); "
            "use --token-file PATH or $LRCTL_TOKEN"
        )


# --- value parsers for argparse ---


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 100,200; got {text!r}"
        ) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, e.g. 0.1,0.01; got {text!r}"
        ) from None


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
SWAP_KINDS: dict[str, schedules._Kind] = {
    kind.oneof_field.replace("_", "-"): kind for kind in schedules._KINDS
}

# How a flag's text becomes the builder's argument, by `_Field.kind`. "bool"
# arguments are switches (--staircase) and take no text.
_FROM_TEXT: dict[str, Callable[[str], Any]] = {
    "float": float,
    "int": int,
    "ints": _int_list,
    "floats": _float_list,
    "knots": _knots,
}


def _flag_help(field: schedules._Field) -> str:
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


# --- parser ---


def _add_global_flags(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # The same flags are accepted before and after the subcommand. In subcommand
    # parsers the default is SUPPRESS, so a flag given only before the subcommand
    # is not overwritten by the subparser's default.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--target",
        type=_target,
        default=default(os.environ.get("LRCTL_TARGET", DEFAULT_TARGET)),
        help=f"server address host:port (default: $LRCTL_TARGET or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print messages as JSON (one object per line; int64 values as numbers, zero "
        "values printed) and errors as one JSON object on stderr",
    )
    group.add_argument(
        "--timeout",
        type=_non_negative_float,
        default=default(10.0),
        help="RPC deadline in seconds (default 10); also bounds waiting for a change",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="log debug information to stderr",
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        default=default(None),
        help="read the bearer token from PATH (default: $LRCTL_TOKEN; none if unset). "
        "There is no flag for the token itself: it would show in `ps` and shell history",
    )
    group.add_argument(
        "--token", nargs="?", action=_NoToken, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    group.add_argument(
        "--ca",
        metavar="PATH",
        default=default(None),
        help="TLS: verify the server with this CA certificate (PEM); any of --ca, --cert, "
        "--key switches to TLS (without --ca: the system's roots)",
    )
    group.add_argument(
        "--cert",
        metavar="PATH",
        default=default(None),
        help="mutual TLS: client certificate (PEM); needs --key",
    )
    group.add_argument(
        "--key",
        metavar="PATH",
        default=default(None),
        help="mutual TLS: client key (PEM); needs --cert",
    )


def _add_change_flags(
    parser: argparse.ArgumentParser, *, in_subcommand: bool = False, swap: bool = False
) -> None:
    # `swap` takes these flags before KIND (so `lrctl swap --help` lists them) and after it;
    # as with the global flags, the KIND parsers' defaults are SUPPRESS so as not to
    # overwrite a flag given before KIND.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("change options")
    if swap:
        group.add_argument(
            "--origin",
            choices=("restart", "global"),
            default=default("restart"),
            help="restart: the schedule starts at its own step 0 when applied (default); "
            "global: evaluated at the optimizer's iteration count, as Keras does",
        )
        group.add_argument(
            "--schedule-start-step",
            type=_int_at_least(0),
            metavar="N",
            default=default(0),
            help="with --origin restart: the new schedule starts at its own step N (default 0)",
        )
        group.add_argument(
            "--scale",
            type=float,
            metavar="F",
            default=default(None),
            help="the cumulative scale, set in the same change (default 1)",
        )
    group.add_argument(
        "--at-step",
        type=int,
        metavar="N",
        default=default(None),
        help="apply at the first step boundary with step >= N (implies --no-wait)",
    )
    group.add_argument(
        "--after-steps",
        type=_int_at_least(0),
        metavar="N",
        default=default(None),
        help="apply N steps after the first step boundary that sees the change "
        "(excludes --at-step; implies --no-wait)",
    )
    group.add_argument(
        "--expected-run-id",
        metavar="ID",
        default=default(""),
        help="apply only to the run with this run id (else exit 5): fences a restarted "
        "trainer or another job on the same address",
    )
    group.add_argument(
        "--expected-incarnation",
        metavar="ID",
        default=default(""),
        help="apply only in the trainer process with this incarnation (`lrctl state`; else "
        "exit 5): fences a restart, a resume from a checkpoint included",
    )
    group.add_argument(
        "--expected-version",
        type=int,
        metavar="V",
        default=default(None),
        help="apply only if the state version is still V (else exit 4)",
    )
    group.add_argument(
        "--reason", default=default(""), metavar="TEXT", help="recorded in the history"
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        default=default(False),
        help="validate only and draw the learning rate before/after; change nothing",
    )
    group.add_argument(
        "--preview-steps",
        type=_int_at_least(0),
        metavar="N",
        default=default(None),
        help=f"with --dry-run: the steps to preview and check guardrails over "
        f"(default {DEFAULT_PREVIEW_STEPS}; 0: no chart)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        default=default(False),
        help="skip the trainer's max_change_factor guardrail (its LR bounds still apply)",
    )
    group.add_argument(
        "--no-wait",
        action="store_true",
        default=default(False),
        help="return once the change is queued (default: wait until applied)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrctl",
        description="Change the learning rate of a running TensorFlow/Keras training job.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_flags(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_global_flags(sub, in_subcommand=True)
        return sub

    p = command("state", "show the training state")
    p.add_argument(
        "--at-step",
        type=int,
        metavar="N",
        help="print only the learning rate the current schedule gives at the future step N "
        "(the trainer evaluates it: a dry-run no-op change, so it needs a write token)",
    )

    p = command("set", "pin the learning rate to a constant (resets the scale to 1)")
    p.add_argument("learning_rate", type=float, metavar="LR", help="the new learning rate")
    _add_change_flags(p)

    p = command("scale", "multiply the active schedule by a factor (cumulative)")
    p.add_argument("factor", type=float, help="e.g. 0.5 halves the learning rate")
    _add_change_flags(p)

    swap = command("swap", "replace the learning-rate schedule")
    _add_change_flags(swap, swap=True)
    kinds = swap.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, kind in SWAP_KINDS.items():
        k = kinds.add_parser(name, help=kind.help, description=kind.help)
        _add_global_flags(k, in_subcommand=True)
        group = k.add_argument_group(f"{name} arguments (Keras names)")
        for field in kind.args:
            flag = "--" + field.name.replace("_", "-")
            if field.kind == "bool":
                group.add_argument(flag, dest=field.name, action="store_true", help=field.help)
            else:
                group.add_argument(
                    flag,
                    dest=field.name,
                    type=_FROM_TEXT[field.kind],
                    required=field.required,
                    metavar=field.name.upper(),
                    help=_flag_help(field),
                )
        _add_change_flags(k, in_subcommand=True, swap=True)

    p = command("cancel", "cancel a pending change (see `lrctl history` for request ids)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "request_id", nargs="?", metavar="REQUEST_ID", help="the change's request id"
    )
    which.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="the change that produced state version N (applied changes cannot be "
        "cancelled: exits 5, or 9 if unknown)",
    )
    p.add_argument(
        "--reason", default="", metavar="TEXT", help="recorded in the cancelled change"
    )
    p.add_argument(
        "--expected-run-id",
        metavar="ID",
        default="",
        help="cancel only in the run with this run id (else exit 5)",
    )
    p.add_argument(
        "--expected-incarnation",
        metavar="ID",
        default="",
        help="cancel only in the trainer process with this incarnation (else exit 5)",
    )

    p = command("history", "list changes, newest first (pending and finished)")
    p.add_argument(
        "--limit",
        type=_int_at_least(1),
        default=DEFAULT_HISTORY_LIMIT,
        metavar="N",
        help=f"show at most N changes (default {DEFAULT_HISTORY_LIMIT})",
    )

    p = command("watch", "stream training state updates (Ctrl-C to stop)")
    p.add_argument(
        "--min-interval",
        type=_non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="at most one update per interval while training advances (default 1.0)",
    )
    p.add_argument("--count", type=int, metavar="N", help="exit after N updates")

    p = command("health", "check server health; exit 0 only if SERVING")
    p.add_argument(
        "--service", default="", help='service name (default "": the server as a whole)'
    )
    return parser


# --- output ---


_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})


def _int64_as_numbers(message: Message, data: dict[str, Any]) -> None:
    """Protobuf JSON writes int64 as strings; turn them back into numbers, in place, so that
    `jq` can do arithmetic on steps and versions (Python's json has no 2**53 limit)."""
    for field in message.DESCRIPTOR.fields:
        if field.json_name not in data:
            continue
        value = data[field.json_name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            if value_field.type in _INT64_TYPES:
                data[field.json_name] = {k: int(v) for k, v in value.items()}
            elif value_field.message_type is not None:
                items = getattr(message, field.name)
                for k, v in value.items():
                    if isinstance(v, dict):
                        # JSON map keys are strings; find the proto key of the same text.
                        key = next(x for x in items if str(x).lower() == k.lower())
                        _int64_as_numbers(items[key], v)
        elif field.type in _INT64_TYPES:
            data[field.json_name] = (
                [int(v) for v in value] if isinstance(value, list) else int(value)
            )
        elif entry is not None:
            sub = getattr(message, field.name)
            if isinstance(value, list):
                for item, item_data in zip(sub, value, strict=True):
                    if isinstance(item_data, dict):
                        _int64_as_numbers(item, item_data)
            elif isinstance(value, dict):
                _int64_as_numbers(sub, value)


def _to_json(message: Message) -> str:
    """Protobuf JSON (camelCase names, enums by name), except that int64 values are
    numbers. Zero values are printed (so `jq .version` is 0, not null); only fields with
    presence that are not set (`optional` scalars, messages) are left out."""
    from google.protobuf import json_format  # only --json needs it: `lrctl state` stays quick

    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message, data)
    return json.dumps(data, separators=(",", ":"))


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _action(change: pb.Change) -> str:
    if change.description:
        return change.description
    which = change.WhichOneof("action")
    if which == "set_learning_rate":
        return f"set lr {_fmt(change.set_learning_rate)}"
    if which == "scale":
        return f"scale x{_fmt(change.scale)}"
    if which == "swap_schedule":  # as the server describes it
        origin = "global" if change.origin == pb.STEP_ORIGIN_GLOBAL else "restart"
        extra = f" start_step={change.schedule_start_step}" if change.schedule_start_step else ""
        extra += f" scale={_fmt(change.swap_scale)}" if change.HasField("swap_scale") else ""
        return f"swap {schedules.describe_schedule(change.swap_schedule)} origin={origin}{extra}"
    if which == "revert":
        restored = change.revert
        return (f"revert to {schedules.describe_schedule(restored.schedule)} "
                f"origin_step={restored.schedule_origin_step} scale={_fmt(restored.scale)}")
    return "(no action)"


def describe_change(change: pb.Change) -> str:
    """One line for a Change, e.g. `applied v3 at step 120: scale x0.5 -> lr 0.005`."""
    reason = f" ({change.reason})" if change.reason else ""
    status = change.status
    if status == pb.CHANGE_STATUS_APPLIED:
        lr = _fmt(change.learning_rate_after) if change.HasField("learning_rate_after") else "?"
        return (
            f"applied v{change.version} at step {change.applied_step}: "
            f"{_action(change)} -> lr {lr}{reason}"
        )
    if status == pb.CHANGE_STATUS_PENDING:
        when = (
            f"apply at step {change.apply_at_step}"
            if change.HasField("apply_at_step")
            else "apply at the next step boundary"
        )
        return f"pending ({when}): {_action(change)}{reason}"
    if status == pb.CHANGE_STATUS_VALIDATED:
        return f"valid (dry run): {_action(change)}"
    if status == pb.CHANGE_STATUS_ABORTED:
        return f"aborted: the state version changed before the step boundary; nothing changed{reason}"
    if status == pb.CHANGE_STATUS_CANCELLED:
        # By CancelChange (with its reason, if one was given), or because the run ended first.
        why = f" ({change.error.removeprefix('cancelled: ')})" if change.error else ""
        return f"cancelled{why}: {_action(change)}; nothing changed{reason}"
    if status == pb.CHANGE_STATUS_FAILED:
        error = change.error or "no error given"
        return f"failed: {_action(change)}; nothing changed: {error}{reason}"
    return f"{pb.ChangeStatus.Name(status)}: {_action(change)}{reason}"


def _history_line(change: pb.Change) -> str:
    """`describe_change` and the request id, which is what `lrctl cancel` takes."""
    line = describe_change(change)
    return f"{line}  [{change.request_id}]" if change.request_id else line


#: `render_preview`'s glyphs: the current schedule, the schedule after the change, both.
PREVIEW_CURRENT, PREVIEW_CHANGE, PREVIEW_BOTH = "o", "*", "#"
PREVIEW_ROWS = 12


def render_preview(change: pb.Change) -> str:
    """A plain-text chart of a dry run's `preview` (the LR with the change) beside
    `preview_current` (without it): one column per point, PREVIEW_ROWS rows on a linear
    scale from the smallest to the largest LR. "" if the change has no preview."""
    columns = max(len(change.preview), len(change.preview_current))
    if columns == 0:
        return ""
    points = change.preview if len(change.preview) == columns else change.preview_current
    values = [p.learning_rate for p in (*change.preview, *change.preview_current)]
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)

    def row(lr: float) -> int:
        if hi == lo:
            return PREVIEW_ROWS // 2
        return round((hi - lr) / (hi - lo) * (PREVIEW_ROWS - 1))

    grid = [[" "] * columns for _ in range(PREVIEW_ROWS)]
    series_glyphs = ((change.preview_current, PREVIEW_CURRENT), (change.preview, PREVIEW_CHANGE))
    for series, glyph in series_glyphs:
        for column, point in enumerate(series):
            if math.isfinite(point.learning_rate):
                cells = grid[row(point.learning_rate)]
                cells[column] = glyph if cells[column] in (" ", glyph) else PREVIEW_BOTH
    labels = {row(lo): _fmt(lo), row(hi): _fmt(hi)}
    width = max(len(label) for label in labels.values())
    lines = [
        f"{labels.get(i, ''):>{width}} |{''.join(cells)}".rstrip() for i, cells in enumerate(grid)
    ]
    first, last = str(points[0].step), str(points[-1].step)
    pad = " " * width
    lines.append(f"{pad} +{'-' * columns}")
    lines.append(f"{pad}  {first}{last:>{max(columns - len(first), len(last) + 1)}}  (step)")
    lines.append(
        f"{pad}  {PREVIEW_CURRENT} current  {PREVIEW_CHANGE} with the change  {PREVIEW_BOTH} both"
    )
    return "\n".join(lines)


def describe_state(state: pb.TrainingState) -> str:
    """A multi-line human summary of a TrainingState."""
    incarnation = f" (incarnation {state.incarnation})" if state.incarnation else ""
    lines = [
        f"run_id:    {state.run_id or '-'}{incarnation}",
        f"phase:     {_phase(state.phase)}",
        f"step:      {state.step}",
        f"epoch:     {state.epoch}",
        f"lr:        {_fmt(state.learning_rate)}",
        f"schedule:  {schedules.describe_schedule(state.schedule)}"
        + (f" from step {state.schedule_origin_step}" if state.schedule_origin_step else ""),
        f"scale:     {_fmt(state.scale)}",
        f"version:   {state.version}",
        f"optimizer: {state.optimizer or '-'}",
        "metrics:   "
        + (", ".join(f"{k}={_fmt(v)}" for k, v in sorted(state.metrics.items())) or "-"),
        f"guardrails: {describe_guardrails(state.guardrails)}",
    ]
    if state.boundary_spacing > 1:
        lines.append(f"boundaries: changes apply every {state.boundary_spacing} steps "
                     f"from step {state.boundary_origin_step}")
    if state.lr_clamp_count:
        lines.append(f"warning:   the engine clamped the learning rate into the guardrails "
                     f"{state.lr_clamp_count} times: their validation missed something")
    lines.append(f"pending:   {len(state.pending_changes) or '-'}")
    lines.extend(f"  {_history_line(c)}" for c in state.pending_changes)
    lines.append(f"recent:    {len(state.recent_changes) or '-'}")
    lines.extend(f"  {describe_change(c)}" for c in state.recent_changes)
    return "\n".join(lines)


#: `lrctl state`'s phase, where the name alone would not say what happens to pending changes.
_PHASE_NOTES = {pb.PHASE_STOPPED: " (pending changes resume after a restart)"}


def _phase(phase: pb.Phase.ValueType) -> str:
    return pb.Phase.Name(phase).removeprefix("PHASE_") + _PHASE_NOTES.get(phase, "")


def describe_guardrails(guardrails: pb.Guardrails) -> str:
    """One line: the trainer's limits on what a change may do ("-": no limit)."""
    def optional(field: Any) -> str:  # a field name with presence
        return _fmt(getattr(guardrails, field)) if guardrails.HasField(field) else "-"

    return (
        f"lr in [{_fmt(guardrails.min_learning_rate)}, {optional('max_learning_rate')}], "
        f"max change factor {optional('max_change_factor')}, "
        f"max changes/minute {optional('max_changes_per_minute')}, "
        f"revert on NaN {guardrails.revert_on_nan_steps or 'off'}"
    )


def describe_update(state: pb.TrainingState) -> str:
    """One line per watch update."""
    loss = state.metrics.get("loss")
    return (
        f"step {state.step} epoch {state.epoch} lr {_fmt(state.learning_rate)} "
        f"loss {_fmt(loss) if loss is not None else '-'} v{state.version} "
        f"{pb.Phase.Name(state.phase).removeprefix('PHASE_')}"
    )


# --- commands ---


def _change_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    # Waiting is the default for a human at a terminal, but --at-step usually
    # targets a future step, so it returns as soon as the change is queued.
    wait = not (args.no_wait or args.at_step is not None or args.after_steps is not None
                or args.dry_run)
    preview_steps = args.preview_steps
    if preview_steps is None:
        preview_steps = DEFAULT_PREVIEW_STEPS if args.dry_run else 0
    return {
        "apply_at_step": args.at_step,
        "expected_version": args.expected_version,
        "wait": wait,
        "validate_only": args.dry_run,
        "reason": args.reason,
        "force": args.force,
        "preview_steps": preview_steps,
        "expected_run_id": args.expected_run_id,
        "expected_incarnation": args.expected_incarnation,
        "apply_after_steps": args.after_steps,
        # Made here, not by the client, so that a timed-out wait can say what to cancel.
        "request_id": uuid.uuid4().hex,
    }


def _change_exit_code(change: pb.Change) -> int:
    if change.status == pb.CHANGE_STATUS_ABORTED:
        return EXIT_VERSION_CONFLICT
    if change.status == pb.CHANGE_STATUS_CANCELLED:
        return EXIT_FAILED_PRECONDITION
    return EXIT_OK


def build_change_call(
    args: argparse.Namespace,
) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Map `set`/`scale`/`swap` arguments to `(client method name, args, kwargs)`."""
    kwargs = _change_kwargs(args)
    if args.command == "set":
        return "set_learning_rate", (args.learning_rate,), kwargs
    if args.command == "scale":
        return "scale_learning_rate", (args.factor,), kwargs
    if args.command == "swap":
        return "swap_schedule", (schedule_from_args(args),), {
            **kwargs,
            "origin": args.origin,
            "schedule_start_step": args.schedule_start_step,
            "scale": args.scale,
        }
    raise AssertionError(args.command)


def _print(out: TextIO, args: argparse.Namespace, message: Message, text: str) -> None:
    print(_to_json(message) if args.json else text, file=out, flush=True)


def _run(client: TrainingControlClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "state" and args.at_step is not None:
        try:
            lr = client.learning_rate_at(args.at_step)
        except errors.FailedPrecondition as exc:
            exc.message = f"--at-step {args.at_step}: only a future step has a forecast ({exc.message})"
            raise
        point = pb.LearningRatePoint(step=args.at_step, learning_rate=lr)
        _print(out, args, point, f"lr at step {args.at_step}: {_fmt(lr)}")
        return EXIT_OK
    if args.command == "state":
        state = client.get_state()
        _print(out, args, state, describe_state(state))
        return EXIT_OK
    if args.command in ("set", "scale", "swap"):
        method, call_args, kwargs = build_change_call(args)
        log.debug("%s%r %r", method, call_args, kwargs)
        try:
            change: pb.Change = getattr(client, method)(*call_args, **kwargs)
        except errors.DeadlineExceeded as exc:
            if kwargs["wait"]:
                exc.message += (
                    f" (the change stays pending; cancel it with "
                    f"`lrctl cancel {kwargs['request_id']}`)"
                )
            raise
        chart = "" if args.json else render_preview(change)
        if chart:
            print(chart, file=out)
        text = _history_line(change) if change.status == pb.CHANGE_STATUS_PENDING \
            else describe_change(change)
        _print(out, args, change, text)
        return _change_exit_code(change)
    if args.command == "cancel":
        change = client.cancel_change(
            request_id=args.request_id, version=args.version, reason=args.reason,
            expected_run_id=args.expected_run_id, expected_incarnation=args.expected_incarnation,
        )
        _print(out, args, change, describe_change(change))
        return EXIT_OK
    if args.command == "history":
        changes = client.iter_changes(page_size=min(args.limit, _MAX_PAGE_SIZE))
        for change in itertools.islice(changes, args.limit):
            _print(out, args, change, _history_line(change))
        return EXIT_OK
    if args.command == "watch":
        return _watch(client, args, out)
    if args.command == "health":
        status = client.health(args.service)
        text = status if not args.json else json.dumps({"status": status})
        print(text, file=out, flush=True)
        return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING
    raise AssertionError(args.command)


def _watch(client: TrainingControlClient, args: argparse.Namespace, out: TextIO) -> int:
    seen = 0
    with client.watch(args.min_interval) as updates:  # leaving it cancels the RPC
        try:
            for state in updates:
                _print(out, args, state, describe_update(state))
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def _json_error(exc: errors.LrctlError | None, code: str, exit_code: int, message: str) -> None:
    """`--json`: one JSON object on stderr (see the module docstring)."""
    report: dict[str, Any] = {"code": code, "exit_code": exit_code, "message": message}
    if isinstance(exc, errors.VersionConflict) and exc.current_version is not None:
        report["current_version"] = exc.current_version
    if exc is not None and exc.field_violations:
        report["field_violations"] = [
            {"field": field, "description": description}
            for field, description in exc.field_violations
        ]
    print(json.dumps(report, separators=(",", ":")), file=sys.stderr, flush=True)


def _report(exc: errors.LrctlError, target: str, as_json: bool = False) -> None:
    message = exc.message or exc.code.name
    if isinstance(exc, errors.Unavailable):
        where = "" if target in message else f" at {target}"
        message = (
            f"server unavailable{where}: {message} (is the trainer running? "
            f"check --target or $LRCTL_TARGET)"
        )
    elif isinstance(exc, errors.DeadlineExceeded):
        message = f"deadline exceeded: {message}"
    elif isinstance(exc, errors.Unauthenticated):
        message = f"unauthenticated: {message} (give a token with --token-file or $LRCTL_TOKEN)"
    elif isinstance(exc, errors.PermissionDenied):
        message = f"permission denied: {message}"
    if as_json:
        _json_error(exc, exc.code.name, EXIT_CODES.get(type(exc), EXIT_ERROR), message)
        return
    print(f"lrctl: error: {message}", file=sys.stderr)
    for field, description in exc.field_violations:
        if description not in message:  # the server's message often is the one violation
            print(f"  {field}: {description}", file=sys.stderr)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check by itself (exits 2 with the usage)."""
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together (mutual TLS)")
    if getattr(args, "after_steps", None) is not None and args.at_step is not None:
        parser.error("--at-step and --after-steps exclude each other")
    if getattr(args, "preview_steps", None) is not None and not args.dry_run:
        parser.error("--preview-steps needs --dry-run (without it the change would be applied)")
    if args.command == "cancel" and args.request_id == "":
        parser.error("REQUEST_ID must not be empty")


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's content, else $LRCTL_TOKEN, else None."""
    if args.token_file is not None:
        source = f"--token-file {args.token_file}"
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise _Usage(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise _Usage(f"{source} is not UTF-8 text") from None
        if not token:
            raise _Usage(f"{source} is empty")
    else:
        source, token = "$LRCTL_TOKEN", os.environ.get("LRCTL_TOKEN", "").strip()
        if not token:
            return None
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise _Usage(f"{source} must hold one token: printable ASCII, no spaces or line breaks")
    log.debug("bearer token from %s", source)
    return token


def _connect(args: argparse.Namespace, timeout: float | None) -> TrainingControlClient:
    token = _token(args)
    credentials = None
    if args.ca is not None or args.cert is not None:
        try:
            credentials = tls_credentials(args.ca, args.cert, args.key)
        except OSError as exc:
            raise _Usage(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        log.debug("TLS: ca %s, client certificate %s", args.ca or "(system roots)", args.cert)
    return TrainingControlClient(args.target, timeout=timeout, token=token, credentials=credentials)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="lrctl: %(levelname)s: %(message)s",
    )
    out = out if out is not None else sys.stdout
    timeout = args.timeout if args.timeout > 0 else None
    log.debug("target %s, timeout %s", args.target, timeout)
    try:
        with _connect(args, timeout) as client:
            return _run(client, args, out)
    except _Usage as exc:
        if args.json:
            _json_error(None, "USAGE", EXIT_USAGE, str(exc))
        else:
            print(f"lrctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.LrctlError as exc:
        _report(exc, args.target, args.json)
        return EXIT_CODES.get(type(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`lrctl watch | head`): not an error. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (TypeError, ValueError) as exc:
        # Only schedule conversion raises these; argparse has checked the rest.
        if args.json:
            _json_error(None, "USAGE", EXIT_USAGE, str(exc))
        else:
            print(f"lrctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
