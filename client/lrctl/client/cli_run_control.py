"""The run-control commands (pause, resume, checkpoint, stop, load), one per `run_actions`
entry: the verb, its help and examples are read from there; here are each command's own
arguments and the client call it makes. Each takes the change options its request has (all
but --force and --preview-steps)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lrctl.client.changes import ChangeOptions
from lrctl.client.cli_flags import add_option_flags
from lrctl.client.cli_values import duration_seconds
from lrctl.client.run_actions import OPTION_NAMES, RUN_ACTIONS, RunAction

__all__ = ["RUN_COMMANDS", "add_run_commands", "run_call"]

#: `lrctl COMMAND` of each run-control change.
RUN_COMMANDS: dict[str, RunAction] = {action.command: action for action in RUN_ACTIONS.values()}


def _pause_arguments(parser: argparse.ArgumentParser) -> None:
    # `pause --timeout` is the pause's length (it replaces the global flag here, so the RPC
    # deadline goes before the command).
    parser.add_argument("--timeout", dest="pause_timeout", type=duration_seconds, default=None,
                        metavar="DURATION",
                        help="resume by itself after this long: 90s, 30m, 1h, up to 7d (default: "
                             "the trainer's, 1h); pausing a paused run restarts it")


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    # The usage names PATH: it is not listed again.
    parser.add_argument("path", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--with-hyperparameters", dest="load_hyperparameters", action="store_true",
                        help="also take its learning-rate schedule and hyperparameters (default: "
                             "keep this run's)")


#: The commands with arguments of their own: how to add them, and the usage line.
_OWN_ARGUMENTS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str | None]] = {
    "pause": (_pause_arguments, None),
    "load": (_load_arguments, "%(prog)s PATH [options]"),
}


def add_run_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add each run-control command with `command(name, help, *examples, usage=...,
    conflict_handler=...)`, `build_parser`'s subcommand maker."""
    for name, action in RUN_COMMANDS.items():
        add_own, usage = _OWN_ARGUMENTS.get(name, (None, None))
        parser = command(name, action.help, *action.examples, usage=usage,
                         conflict_handler="resolve")  # `pause --timeout` replaces the global one
        if add_own is not None:
            add_own(parser)
        add_option_flags(parser, ChangeOptions, names=OPTION_NAMES)


def run_call(args: argparse.Namespace, options: dict[str, Any]
             ) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """The client call of a run-control command: `(method name, args, kwargs)`, the kwargs
    those of the change `options` its request has."""
    kwargs = {name: value for name, value in options.items() if name in OPTION_NAMES}
    own: tuple[Any, ...] = ()
    if args.command == "pause":
        own = (args.pause_timeout,)
    elif args.command == "load":
        own = (args.path, args.load_hyperparameters)
    return RUN_COMMANDS[args.command].method, own, kwargs
