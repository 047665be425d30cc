"""What each `lrctl` command does, on a connected client: the calls and their output."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import uuid
from typing import Any, TextIO

from google.protobuf.message import Message

from lrctl.client import errors
from lrctl.client.changes import ChangeOptions, Swap, View
from lrctl.client.cli_flags import DEFAULT_PREVIEW_STEPS
from lrctl.client.cli_output import (
    EXIT_FAILED_PRECONDITION,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_VERSION_CONFLICT,
    describe_change,
    describe_state,
    describe_update,
    fmt,
    history_line,
    measurement_line,
    render_preview,
    to_json,
)
from lrctl.client.cli_parser import UsageError, schedule_from_args
from lrctl.client.cli_run_control import RUN_COMMANDS, run_call
from lrctl.client.client import TrainingControlClient, tls_credentials
from lrctl.v1 import training_control_pb2 as pb

__all__ = ["build_change_call", "change_options", "connect", "run"]

log = logging.getLogger("lrctl")

#: ListChanges' largest page.
_MAX_PAGE_SIZE = 100


def change_options(args: argparse.Namespace) -> ChangeOptions:
    """The `ChangeOptions` of `set`/`scale`/`swap` arguments (each flag lands under its field's
    name), with the command line's own defaults for waiting and the dry run's chart."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ChangeOptions)
             if getattr(args, f.name, None) is not None}
    # Waiting is the default for a person at a terminal, but --at-step and --after-steps
    # usually name a future step, so they return as soon as the change is queued.
    given["wait"] &= not (args.apply_at_step is not None or args.apply_after_steps is not None
                          or args.validate_only)
    if args.validate_only and getattr(args, "preview_steps", 0) is None:
        given["preview_steps"] = DEFAULT_PREVIEW_STEPS
    # Made here, not by the client, so that a timed-out wait can say what to cancel.
    given["request_id"] = uuid.uuid4().hex
    return ChangeOptions(**given)


def build_change_call(
    args: argparse.Namespace,
) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Map `set`/`scale`/`swap` and the run-control commands' arguments to `(client method
    name, args, kwargs)`."""
    kwargs = dataclasses.asdict(change_options(args))
    if args.command == "set":
        return "set_learning_rate", (args.learning_rate,), kwargs
    if args.command == "scale":
        return "scale_learning_rate", (args.factor,), kwargs
    if args.command == "set-param":
        if kwargs.pop("force"):
            raise ValueError("--force does not apply to set-param")
        kwargs.pop("preview_steps")
        return "set_optimizer_parameters", (dict(args.assignments),), kwargs
    if args.command == "swap":
        swap = {f.name: getattr(args, f.name) for f in dataclasses.fields(Swap)
                if f.name != "schedule"}
        return "swap_schedule", (schedule_from_args(args),), {**kwargs, **swap}
    if args.command in RUN_COMMANDS:
        return run_call(args, kwargs)
    raise AssertionError(args.command)


def _change_exit_code(change: pb.Change) -> int:
    if change.status == pb.CHANGE_STATUS_ABORTED:
        return EXIT_VERSION_CONFLICT
    if change.status in (pb.CHANGE_STATUS_CANCELLED, pb.CHANGE_STATUS_FAILED):
        return EXIT_FAILED_PRECONDITION
    return EXIT_OK


def _which_change(args: argparse.Namespace) -> dict[str, Any]:
    """`lrctl change` / `lrctl wait`'s change: a name (changes/N), else a request id, or --version."""
    if args.version is not None:
        return {"version": args.version}
    return {"name" if args.change.startswith("changes/") else "request_id": args.change}


def _print(out: TextIO, args: argparse.Namespace, message: Message, text: str) -> None:
    print(to_json(message) if args.json else text, file=out, flush=True)


def run(client: TrainingControlClient, args: argparse.Namespace, out: TextIO) -> int:
    """Run the parsed command; returns its exit code (errors raise `LrctlError`)."""
    if args.command == "state" and args.at_step is not None:
        try:
            lr = client.learning_rate_at(args.at_step)
        except errors.FailedPrecondition as exc:
            exc.message = f"--at-step {args.at_step}: only a future step has a forecast ({exc.message})"
            raise
        point = pb.LearningRatePoint(step=args.at_step, learning_rate=lr)
        _print(out, args, point, f"lr at step {args.at_step}: {fmt(lr)}")
        return EXIT_OK
    if args.command == "state":
        state = client.get_state()
        _print(out, args, state, describe_state(state))
        return EXIT_OK
    if args.command in ("set", "scale", "swap", "set-param", *RUN_COMMANDS):
        return _change(client, args, out)
    if args.command == "cancel":
        change = client.cancel_change(
            request_id=args.request_id, version=args.version, reason=args.reason,
            expected_run_id=args.expected_run_id, expected_incarnation=args.expected_incarnation,
        )
        _print(out, args, change, describe_change(change))
        return EXIT_OK
    if args.command == "history":
        changes = client.iter_changes(page_size=min(args.limit, _MAX_PAGE_SIZE), filter=args.filter)
        for change in itertools.islice(changes, args.limit):
            _print(out, args, change, history_line(change))
        return EXIT_OK
    if args.command in ("change", "wait"):
        if args.command == "change":
            change = client.get_change(**_which_change(args))
        else:
            change = client.wait_change(**_which_change(args), timeout=client.timeout)
        _print(out, args, change, f"{change.name}: {history_line(change)}")
        return EXIT_OK if args.command == "change" else _change_exit_code(change)
    if args.command == "watch":
        return _watch(client, args, out)
    if args.command == "measurements":
        try:
            for measurement in client.iter_measurements(start_step=args.start_step, follow=args.follow):
                _print(out, args, measurement, measurement_line(measurement))
        except KeyboardInterrupt:
            pass
        return EXIT_OK
    if args.command == "health":
        status = client.health(args.service)
        text = status if not args.json else json.dumps({"status": status})
        print(text, file=out, flush=True)
        return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING
    raise AssertionError(args.command)


def _change(client: TrainingControlClient, args: argparse.Namespace, out: TextIO) -> int:
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
    text = history_line(change) if change.status == pb.CHANGE_STATUS_PENDING \
        else describe_change(change)
    _print(out, args, change, text)
    return _change_exit_code(change)


def _watch(client: TrainingControlClient, args: argparse.Namespace, out: TextIO) -> int:
    seen = 0
    # A line per update needs no change lists; --json prints the whole state.
    view: View = "full" if args.json else "basic"
    with client.watch(args.min_interval, view=view) as updates:  # leaving it cancels the RPC
        try:
            for state in updates:
                _print(out, args, state, describe_update(state))
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's content, else $LRCTL_TOKEN, else None."""
    if args.token_file is not None:
        source = f"--token-file {args.token_file}"
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{source} is not UTF-8 text") from None
        if not token:
            raise UsageError(f"{source} is empty")
    else:
        source, token = "$LRCTL_TOKEN", os.environ.get("LRCTL_TOKEN", "").strip()
        if not token:
            return None
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise UsageError(f"{source} must hold one token: printable ASCII, no spaces or line breaks")
    log.debug("bearer token from %s", source)
    return token


def connect(args: argparse.Namespace, timeout: float | None) -> TrainingControlClient:
    """A client for the parsed target, token and TLS files (`UsageError` if one is unusable)."""
    token = _token(args)
    credentials = None
    if args.ca is not None or args.cert is not None:
        try:
            credentials = tls_credentials(args.ca, args.cert, args.key)
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        log.debug("TLS: ca %s, client certificate %s", args.ca or "(system roots)", args.cert)
    return TrainingControlClient(args.target, timeout=timeout, token=token, credentials=credentials)


