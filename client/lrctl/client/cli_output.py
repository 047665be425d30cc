"""How `lrctl` reports: messages as text or JSON, the dry run's chart, errors, exit codes."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lrctl.client import errors, schedules
from lrctl.v1 import training_control_pb2 as pb

__all__ = [
    "EXIT_CODES", "EXIT_MEANINGS", "PREVIEW_BOTH", "PREVIEW_CHANGE", "PREVIEW_CURRENT",
    "PREVIEW_ROWS", "describe_change", "describe_exit_codes", "describe_guardrails",
    "describe_state", "describe_update", "fmt", "history_line", "json_error", "render_preview",
    "report", "to_json",
]

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

#: What each exit code means: `lrctl --help` and `lrctl.client.cli`'s docstring list them.
EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_ERROR: "any other error",
    EXIT_USAGE: "usage error (a bad command line; also a missing or empty --token-file)",
    EXIT_INVALID_ARGUMENT: "invalid argument (the server rejected a value)",
    EXIT_VERSION_CONFLICT: "version conflict (--expected-version did not match; the change "
                           "was aborted)",
    EXIT_FAILED_PRECONDITION: "failed precondition (e.g. --at-step in the past, training "
                              "finished, cancel of a change that already ended)",
    EXIT_DEADLINE_EXCEEDED: "deadline exceeded (--timeout passed; a waited-for change stays "
                            "pending)",
    EXIT_UNAVAILABLE: "unavailable (server unreachable)",
    EXIT_NOT_SERVING: "not serving (`lrctl health`)",
    EXIT_NOT_FOUND: "not found (e.g. `lrctl cancel` of a change the server does not know)",
    EXIT_RESOURCE_EXHAUSTED: "resource exhausted (a server limit was reached, e.g. too many "
                             "pending changes)",
    EXIT_INTERNAL: "internal (the trainer failed to apply a change; nothing changed)",
    EXIT_UNAUTHENTICATED: "unauthenticated (missing or wrong token: --token-file or "
                          "$LRCTL_TOKEN)",
    EXIT_PERMISSION_DENIED: "permission denied (e.g. a read-only token sending a change)",
}


def describe_exit_codes(code_format: str = "{:>2}", width: int = 79) -> str:
    """`EXIT_MEANINGS`, one indented line per code (wrapped at `width`)."""
    lines = []
    for code, meaning in EXIT_MEANINGS.items():
        first = f"  {code_format.format(code)} "
        lines.append(textwrap.fill(meaning, width, initial_indent=first,
                                   subsequent_indent=" " * len(first)))
    return "\n".join(lines)


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


def to_json(message: Message) -> str:
    """Protobuf JSON (camelCase names, enums by name), except that int64 values are
    numbers. Zero values are printed (so `jq .version` is 0, not null); only fields with
    presence that are not set (`optional` scalars, messages) are left out."""
    from google.protobuf import json_format  # only --json needs it: `lrctl state` stays quick

    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    _int64_as_numbers(message, data)
    return json.dumps(data, separators=(",", ":"))


def fmt(value: float) -> str:
    return f"{value:.6g}"


def _action(change: pb.Change) -> str:
    if change.description:
        return change.description
    which = change.WhichOneof("action")
    if which == "set_learning_rate":
        return f"set lr {fmt(change.set_learning_rate)}"
    if which == "scale":
        return f"scale x{fmt(change.scale)}"
    if which == "swap_schedule":  # as the server describes it
        origin = "global" if change.origin == pb.STEP_ORIGIN_GLOBAL else "restart"
        extra = f" start_step={change.schedule_start_step}" if change.schedule_start_step else ""
        extra += f" scale={fmt(change.swap_scale)}" if change.HasField("swap_scale") else ""
        return f"swap {schedules.describe_schedule(change.swap_schedule)} origin={origin}{extra}"
    if which == "pause":
        return f"pause (timeout {change.pause.timeout.ToTimedelta().total_seconds():g}s)"
    if which in ("resume", "save_checkpoint", "stop"):
        return {"resume": "resume", "save_checkpoint": "save checkpoint", "stop": "stop training"}[which]
    if which == "load_checkpoint":
        hyper = " with its hyperparameters" if change.load_checkpoint.load_hyperparameters else ""
        return f"load {change.load_checkpoint.path}{hyper}"
    if which == "set_optimizer_parameters":
        values = change.set_optimizer_parameters.parameters
        return "set " + " ".join(f"{name}={fmt(values[name])}" for name in sorted(values))
    if which == "revert":
        restored = change.revert
        return (f"revert to {schedules.describe_schedule(restored.schedule)} "
                f"origin_step={restored.schedule_origin_step} scale={fmt(restored.scale)}")
    return "(no action)"


def describe_change(change: pb.Change) -> str:
    """One line for a Change, e.g. `applied v3 at step 120: scale x0.5 -> lr 0.005`."""
    reason = f" ({change.reason})" if change.reason else ""
    status = change.status
    if status == pb.CHANGE_STATUS_APPLIED and change.parameter_updates:
        updates = ", ".join(f"{u.name} {fmt(u.before)} -> {fmt(u.after)}" for u in change.parameter_updates)
        return f"applied v{change.version} at step {change.applied_step}: {updates}{reason}"
    if status == pb.CHANGE_STATUS_APPLIED:
        lr = fmt(change.learning_rate_after) if change.HasField("learning_rate_after") else "?"
        checkpoint = ""
        if change.checkpoint_path:  # a save or a load: the file, its step, its run
            of_run = f" of run {change.checkpoint_run_id}" if change.checkpoint_run_id else ""
            checkpoint = f" [{change.checkpoint_path}, step {change.checkpoint_step}{of_run}]"
        return (
            f"applied v{change.version} at step {change.applied_step}: "
            f"{_action(change)}{checkpoint} -> lr {lr}{reason}"
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


def history_line(change: pb.Change) -> str:
    """`describe_change` and the request id, which is what `lrctl cancel` takes."""
    line = describe_change(change)
    return f"{line}  [{change.request_id}]" if change.request_id else line


def measurement_line(measurement: pb.Measurement) -> str:
    """`lrctl measurements`: one line a measurement, its metrics in name order."""
    metrics = "  ".join(f"{name}={fmt(value)}" for name, value in sorted(measurement.metrics.items()))
    kind = "epoch end" if measurement.epoch_end else "batch"
    return (f"#{measurement.sequence}  step {measurement.step}  epoch {measurement.epoch}  {kind}"
            f"{'  ' + metrics if metrics else ''}")


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
    labels = {row(lo): fmt(lo), row(hi): fmt(hi)}
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
        f"lr:        {fmt(state.learning_rate)}",
        f"schedule:  {schedules.describe_schedule(state.schedule)}"
        + (f" from step {state.schedule_origin_step}" if state.schedule_origin_step else ""),
        f"scale:     {fmt(state.scale)}",
        f"version:   {state.version}",
        f"optimizer: {state.optimizer or '-'}",
        "metrics:   "
        + (", ".join(f"{k}={fmt(v)}" for k, v in sorted(state.metrics.items())) or "-"),
        f"guardrails: {describe_guardrails(state.guardrails)}",
    ]
    if state.boundary_spacing > 1:
        lines.append(f"boundaries: changes apply every {state.boundary_spacing} steps "
                     f"from step {state.boundary_origin_step}")
    if state.lr_clamp_count:
        lines.append(f"warning:   the engine clamped the learning rate into the guardrails "
                     f"{state.lr_clamp_count} times: their validation missed something")
    for h in state.hyperparameters:
        live = "live" if h.live else f"fixed: {h.fixed_reason}"
        lines.append(f"param:     {h.name}={fmt(h.value)}{' (registered)' if h.registered else ''} [{live}]")
    lines.append(f"pending:   {len(state.pending_changes) or '-'}")
    lines.extend(f"  {history_line(c)}" for c in state.pending_changes)
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
        return fmt(getattr(guardrails, field)) if guardrails.HasField(field) else "-"

    return (
        f"lr in [{fmt(guardrails.min_learning_rate)}, {optional('max_learning_rate')}], "
        f"max change factor {optional('max_change_factor')}, "
        f"max changes/minute {optional('max_changes_per_minute')}, "
        f"revert on NaN {guardrails.revert_on_nan_steps or 'off'}"
    )


def describe_update(state: pb.TrainingState) -> str:
    """One line per watch update."""
    loss = state.metrics.get("loss")
    return (
        f"step {state.step} epoch {state.epoch} lr {fmt(state.learning_rate)} "
        f"loss {fmt(loss) if loss is not None else '-'} v{state.version} "
        f"{pb.Phase.Name(state.phase).removeprefix('PHASE_')}"
    )


def json_error(exc: errors.LrctlError | None, code: str, exit_code: int, message: str) -> None:
    """`--json`: one JSON object on stderr (`lrctl.client.cli`'s docstring describes it)."""
    body: dict[str, Any] = {"code": code, "exit_code": exit_code, "message": message}
    if isinstance(exc, errors.VersionConflict) and exc.current_version is not None:
        body["current_version"] = exc.current_version
    if exc is not None and exc.field_violations:
        body["field_violations"] = [
            {"field": field, "description": description}
            for field, description in exc.field_violations
        ]
    print(json.dumps(body, separators=(",", ":")), file=sys.stderr, flush=True)


def report(exc: errors.LrctlError, target: str, as_json: bool = False) -> None:
    """An error on stderr: one line saying what to check, then any field the server named
    that the line does not (with `as_json`, `json_error`'s object)."""
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
        json_error(exc, exc.code.name, EXIT_CODES.get(type(exc), EXIT_ERROR), message)
        return
    print(f"lrctl: error: {message}", file=sys.stderr)
    for field, description in exc.field_violations:
        if description not in message:  # the server's message often is the one violation
            print(f"  {field}: {description}", file=sys.stderr)

