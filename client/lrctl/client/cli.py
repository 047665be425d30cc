"""`lrctl`: change the learning rate of a running training job from the command line.

`main` runs it; `cli_parser` reads the command line, `cli_commands` runs the command and
`cli_output` prints what comes back.

Exit codes (`cli_output.EXIT_MEANINGS`):
{exit_codes}

With --json (for scripts and jq):
  * output is protobuf JSON, one object per line, camelCase field names, enums by name;
  * int64 values (step, version, applyAtStep, ...) are JSON numbers, not strings;
  * every field is printed, zero values included ("version": 0, "learningRate": 0); only
    `optional` fields that are not set are left out (a pending change has no "appliedStep"
    or "learningRateAfter" yet): use `.appliedStep // empty` in jq;
  * an error is one JSON object on stderr, with the exit code as above:
      {{"code": "ABORTED", "exit_code": 4, "message": "...", "current_version": 7,
       "field_violations": [{{"field": "...", "description": "..."}}]}}
    "code" is the gRPC status name ("USAGE" for a bad value the server never saw);
    "current_version" and "field_violations" appear only when the server sent them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from lrctl.client import errors
from lrctl.client.cli_commands import build_change_call, connect, run
from lrctl.client.cli_output import (
    EXIT_CODES,
    EXIT_DEADLINE_EXCEEDED,
    EXIT_ERROR,
    EXIT_FAILED_PRECONDITION,
    EXIT_INTERNAL,
    EXIT_INVALID_ARGUMENT,
    EXIT_NOT_FOUND,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_PERMISSION_DENIED,
    EXIT_RESOURCE_EXHAUSTED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_VERSION_CONFLICT,
    PREVIEW_BOTH,
    PREVIEW_CHANGE,
    PREVIEW_CURRENT,
    PREVIEW_ROWS,
    describe_change,
    describe_exit_codes,
    json_error,
    render_preview,
    report,
)
from lrctl.client.cli_parser import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_PREVIEW_STEPS,
    SWAP_KINDS,
    UsageError,
    build_parser,
    check,
)

__doc__ = (__doc__ or "").format(exit_codes=describe_exit_codes("{:<2}"))

__all__ = [
    "DEFAULT_HISTORY_LIMIT", "DEFAULT_PREVIEW_STEPS", "EXIT_CODES", "EXIT_DEADLINE_EXCEEDED",
    "EXIT_ERROR", "EXIT_FAILED_PRECONDITION", "EXIT_INTERNAL", "EXIT_INVALID_ARGUMENT",
    "EXIT_NOT_FOUND", "EXIT_NOT_SERVING", "EXIT_OK", "EXIT_PERMISSION_DENIED",
    "EXIT_RESOURCE_EXHAUSTED", "EXIT_UNAUTHENTICATED", "EXIT_UNAVAILABLE", "EXIT_USAGE",
    "EXIT_VERSION_CONFLICT", "PREVIEW_BOTH", "PREVIEW_CHANGE", "PREVIEW_CURRENT",
    "PREVIEW_ROWS", "SWAP_KINDS", "build_change_call", "build_parser", "describe_change",
    "main", "render_preview",
]

log = logging.getLogger("lrctl")


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="lrctl: %(levelname)s: %(message)s",
    )
    out = out if out is not None else sys.stdout
    timeout = args.timeout if args.timeout > 0 else None
    log.debug("target %s, timeout %s", args.target, timeout)
    try:
        with connect(args, timeout) as client:
            return run(client, args, out)
    except UsageError as exc:
        if args.json:
            json_error(None, "USAGE", EXIT_USAGE, str(exc))
        else:
            print(f"lrctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.LrctlError as exc:
        report(exc, args.target, args.json)
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
            json_error(None, "USAGE", EXIT_USAGE, str(exc))
        else:
            print(f"lrctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
