"""The command line's shared flags: the global ones (accepted before and after the command,
listed once, in `lrctl --help`) and the change options, each read from its field in
`ChangeOptions` or `Swap` (`lrctl.client.changes`) with what the command line adds."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any

from lrctl.client.changes import ChangeOptions, Swap
from lrctl.client.channels import DEFAULT_TARGET
from lrctl.client.cli_output import EXIT_FAILED_PRECONDITION, EXIT_VERSION_CONFLICT
from lrctl.client.cli_values import int_at_least, non_negative_float, target

__all__ = [
    "DEFAULT_PREVIEW_STEPS", "DEFAULT_TIMEOUT", "add_change_flags", "add_global_flags",
    "add_option_flags",
]

#: `--dry-run` without `--preview-steps`: the steps the chart covers.
DEFAULT_PREVIEW_STEPS = 1000
#: `--timeout` when not given: seconds.
DEFAULT_TIMEOUT = 10.0


class _NoToken(argparse.Action):
    """`--token`: refused without echoing its value (a token in argv shows in `ps` and in
    shell history). Without it, argparse would take `--token X` as `--token-file X`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("there is no --token flag (it would show in `ps` and shell history); "
                     "use --token-file PATH or $LRCTL_TOKEN")




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


def add_option_flags(parser: Any, cls: type, *, hidden: bool = False,
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
            kwargs["type"] = int_at_least(meta["minimum"]) if "minimum" in meta else base
            kwargs["metavar"] = meta["metavar"]
        default = _FLAG_DEFAULTS.get(field.name, default)
        if hidden:
            kwargs["help"] = default = argparse.SUPPRESS
        parser.add_argument(meta["flag"], default=default, **kwargs)


def add_global_flags(parser: argparse.ArgumentParser, *, hidden: bool) -> None:
    # Accepted before and after the command; listed once, in `lrctl --help`. After the
    # command their default is SUPPRESS, so a flag given before it is not overwritten.
    def flag(*names: str, default: Any, help: str, **kwargs: Any) -> None:
        if hidden:
            default = help = argparse.SUPPRESS
        group.add_argument(*names, default=default, help=help, **kwargs)

    group = parser if hidden else parser.add_argument_group(
        "global options (before or after the command)")
    flag("--target", type=target, default=os.environ.get("LRCTL_TARGET", DEFAULT_TARGET),
         help=f"server address host:port (default: $LRCTL_TARGET or {DEFAULT_TARGET})")
    flag("--json", action="store_true", default=False,
         help="print messages as JSON (one object per line; int64 values as numbers, zero "
              "values printed) and errors as one JSON object on stderr")
    flag("--timeout", type=non_negative_float, default=DEFAULT_TIMEOUT,
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


def add_change_flags(parser: argparse.ArgumentParser, *, swap: bool = False,
                      hidden: bool = False) -> None:
    if swap:
        add_option_flags(parser, Swap, hidden=hidden)
    add_option_flags(parser, ChangeOptions, hidden=hidden)
