"""Protobuf <-> domain: specs from the descriptor, changes, states and guardrails to protobuf,
change names, and the ListChanges and ListMeasurements page tokens. Every conversion of lrctl's
messages lives here, but the mutation requests' (change_requests.py: each as the change it asks for)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from lrctl.service.control.changes import (
    Change,
    ChangeStatus,
    Hyperparameter,
    LoadCheckpoint,
    PauseTraining,
    Phase,
    PinLearningRate,
    ResumeTraining,
    RevertSchedule,
    SaveCheckpoint,
    ScaleLearningRate,
    SetParameters,
    Snapshot,
    StopTraining,
    SwapSchedule,
)
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.control.measurements import Measurement
from lrctl.service.errors import InvalidArgumentError
from lrctl.service.schedules import specs
from lrctl.v1 import training_control_pb2 as pb

# Each registered kind's field in the `Schedule.kind` oneof, whose message is named after the
# spec class: ExponentialDecay -> "exponential_decay" (tests/test_specs.py: one for each).
_FIELD_BY_TYPE: dict[type[specs.ScheduleSpec], str] = {
    spec_type: field.name
    for spec_type in specs.SPEC_TYPES for field in pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"].fields
    if field.message_type is not None and field.message_type.name == spec_type.keras_name
}
_TYPE_BY_FIELD = {name: t for t, name in _FIELD_BY_TYPE.items()}
_ORIGIN_TO_PB = {specs.Origin.RESTART: pb.STEP_ORIGIN_RESTART, specs.Origin.GLOBAL: pb.STEP_ORIGIN_GLOBAL}
_PHASE_TO_PB = {phase: pb.Phase.Value(f"PHASE_{phase.name}") for phase in Phase}
_STATUS_TO_PB = {status: pb.ChangeStatus.Value(f"CHANGE_STATUS_{status.name}") for status in ChangeStatus}
_CHANGE_NAME = re.compile(r"changes/([1-9][0-9]{0,18})")


# -- protobuf -> domain ------------------------------------------------------------------------
def spec_from_proto(schedule: pb.Schedule, path: str = "schedule") -> specs.ScheduleSpec:
    """Build a validated spec; errors name the field by its full request path. Each spec field
    is its message's field of the same name; a repeated message (Knot) becomes a tuple of its
    fields' values, an unset `optional` field keeps the spec's (Keras's) default."""
    kind = schedule.WhichOneof("kind")
    if kind is None or kind not in _TYPE_BY_FIELD:
        raise InvalidArgumentError(path, f"must set one of {sorted(_TYPE_BY_FIELD)}", kind or "nothing")
    message = getattr(schedule, kind)
    spec_type = _TYPE_BY_FIELD[kind]
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(spec_type):
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(message, f.name)
        if descriptor.is_repeated:
            kwargs[f.name] = tuple(map(_plain, value))
        elif not descriptor.has_presence or message.HasField(f.name):
            kwargs[f.name] = value
    try:
        return spec_type(**kwargs)
    except InvalidArgumentError as e:
        raise e.with_prefix(f"{path}.{kind}.") from None


def parse_change_name(name: str, field: str = "name") -> int:
    """The change id in a change's resource name, "changes/{id}" (AIP-122); INVALID_ARGUMENT
    naming `field` for anything else."""
    if not name:
        raise InvalidArgumentError(field, 'must be set (a change\'s name, "changes/{id}")', "nothing")
    match = _CHANGE_NAME.fullmatch(name)
    if match is None or int(match.group(1)) >= 2**63:
        raise InvalidArgumentError(
            field, 'must be a change\'s name, "changes/{id}" with a positive integer id (Change.name)',
            repr(name[:100]))
    return int(match.group(1))


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return tuple(getattr(value, f.name) for f in value.DESCRIPTOR.fields)
    return value


def _duration(seconds: float) -> Duration:
    message = Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


# -- domain -> protobuf ------------------------------------------------------------------------
def spec_to_proto(spec: specs.ScheduleSpec) -> pb.Schedule:
    """The inverse of `spec_from_proto` (a None field stays unset)."""
    schedule = pb.Schedule()
    message = getattr(schedule, _FIELD_BY_TYPE[type(spec)])
    message.SetInParent()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        if descriptor.message_type is not None and descriptor.is_repeated:
            names = [field.name for field in descriptor.message_type.fields]
            for item in value:
                getattr(message, f.name).add(**dict(zip(names, item)))
        elif isinstance(value, tuple):
            getattr(message, f.name).extend(value)
        elif value is not None:
            setattr(message, f.name, value)
    return schedule


def reported_rate(value: float) -> float:
    """A learning rate as the engine holds it, float32, written as the shortest decimal that
    is that float32 (0.001, not 0.0010000000474974513): what a user typed reads back alike."""
    return float(str(np.float32(value))) if math.isfinite(value) else value


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def change_name(change_id: int) -> str:
    """A change's resource name (Change.name): stable within a run, across its restarts."""
    return f"changes/{change_id}"


def change_to_proto(change: Change) -> pb.Change:
    request, action = change.request, change.request.action
    message = pb.Change(
        name="" if change.status is ChangeStatus.VALIDATED else change_name(change.id),
        version=change.version, status=_STATUS_TO_PB[change.status], request_id=request.request_id,
        reason=request.reason, requested_step=change.requested_step,
        apply_at_step=change.due_step if change.due_step is not None else request.apply_at_step,
        apply_after_steps=request.apply_after_steps, applied_step=change.applied_step,
        learning_rate_after=None if change.learning_rate_after is None
        else reported_rate(change.learning_rate_after),
        requested_time=timestamp(change.requested_time),
        applied_time=timestamp(change.applied_time) if change.status is ChangeStatus.APPLIED else None,
        description=change.description, error=str(change.error) if change.error else "",
    )
    if isinstance(action, PinLearningRate):
        message.set_learning_rate = action.learning_rate
    elif isinstance(action, ScaleLearningRate):
        message.scale = action.factor
    elif isinstance(action, SetParameters):
        message.set_optimizer_parameters.CopyFrom(pb.OptimizerParameters(parameters=dict(action.values)))
    elif isinstance(action, RevertSchedule):
        message.revert.CopyFrom(pb.RestoredSchedule(
            schedule=spec_to_proto(action.state.spec), origin=_ORIGIN_TO_PB[action.state.origin],
            schedule_origin_step=action.state.origin_step, scale=action.state.scale))
    elif isinstance(action, PauseTraining):
        message.pause.timeout.CopyFrom(_duration(action.timeout))
    elif isinstance(action, ResumeTraining):
        message.resume.SetInParent()
    elif isinstance(action, SaveCheckpoint):
        message.save_checkpoint.SetInParent()
    elif isinstance(action, StopTraining):
        message.stop.SetInParent()
    elif isinstance(action, LoadCheckpoint):
        message.load_checkpoint.CopyFrom(pb.LoadCheckpointAction(
            path=action.path, load_hyperparameters=action.load_hyperparameters))
    elif isinstance(action, SwapSchedule):
        message.swap_schedule.CopyFrom(spec_to_proto(action.schedule))
        message.origin = _ORIGIN_TO_PB[action.origin]
        message.schedule_start_step = action.start_step
        if action.scale is not None:
            message.swap_scale = action.scale
    if change.schedule_after is not None:
        message.schedule.CopyFrom(spec_to_proto(change.schedule_after.spec))
        message.scale_after = change.schedule_after.scale
    if change.checkpoint_path:
        message.checkpoint_path = change.checkpoint_path
        message.checkpoint_step = change.checkpoint_step if change.checkpoint_step is not None else 0
        message.checkpoint_run_id = change.checkpoint_run_id
    message.parameter_updates.extend(pb.ParameterUpdate(name=u.name, before=u.before, after=u.after)
                                     for u in change.parameter_updates)
    message.preview.extend(pb.LearningRatePoint(step=s, learning_rate=reported_rate(lr))
                           for s, lr in change.preview)
    message.preview_current.extend(pb.LearningRatePoint(step=s, learning_rate=reported_rate(lr))
                                   for s, lr in change.preview_current)
    return message


def guardrails_to_proto(limits: Guardrails) -> pb.Guardrails:
    def bound(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return pb.Guardrails(
        min_learning_rate=limits.min_learning_rate, max_learning_rate=bound(limits.max_learning_rate),
        max_change_factor=bound(limits.max_change_factor),
        max_changes_per_minute=bound(limits.max_changes_per_minute),
        revert_on_nan_steps=limits.revert_on_nan_steps, horizon_steps=limits.horizon_steps,
        parameter_bounds={name: pb.ParameterBounds(min_value=lo, max_value=hi)
                          for name, lo, hi in limits.parameter_bounds},
    )


def hyperparameter_to_proto(item: Hyperparameter) -> pb.Hyperparameter:
    return pb.Hyperparameter(name=item.name, value=item.value, live=item.live,
                             fixed_reason=item.fixed_reason, registered=item.registered,
                             min_value=item.min_value, max_value=item.max_value)


def state_to_proto(snap: Snapshot, convert_change: Callable[[Change], pb.Change] = change_to_proto,
                   view: int = pb.STATE_VIEW_FULL) -> pb.TrainingState:
    """The state as `view` asks: STATE_VIEW_BASIC leaves the change lists empty (their
    conversion is most of the cost); FULL or UNSPECIFIED carries them. INVALID_ARGUMENT naming
    `view` for a value that is no StateView."""
    if view not in pb.StateView.values():
        raise InvalidArgumentError("view", f"must be one of {', '.join(pb.StateView.keys())}", view)
    full = view != pb.STATE_VIEW_BASIC
    return pb.TrainingState(
        run_id=snap.run_id, phase=_PHASE_TO_PB[snap.phase], step=snap.step, epoch=snap.epoch,
        learning_rate=reported_rate(snap.learning_rate), schedule=spec_to_proto(snap.schedule.spec),
        schedule_origin_step=snap.schedule.origin_step, scale=snap.schedule.scale,
        version=snap.version, metrics=dict(snap.metrics), optimizer=snap.optimizer,
        pending_changes=[convert_change(c) for c in snap.pending] if full else [],
        recent_changes=[convert_change(c) for c in snap.recent] if full else [],
        updated_time=timestamp(snap.updated_time), pending_count=snap.pending_count,
        guardrails=guardrails_to_proto(snap.guardrails),
        metrics_step=snap.metrics_step, metrics_time=timestamp(snap.metrics_time),
        epoch_metrics=dict(snap.epoch_metrics), epoch_metrics_epoch=snap.epoch_metrics_epoch,
        epoch_metrics_step=snap.epoch_metrics_step,
        epoch_metrics_time=timestamp(snap.epoch_metrics_time),
        steps_per_second=snap.steps_per_second,
        workers=[pb.WorkerState(index=w.index, applied_version=w.applied_version, step=w.step)
                 for w in snap.workers],
        incarnation=snap.incarnation,
        boundary_spacing=snap.boundaries.spacing if snap.boundaries else 0,
        boundary_origin_step=snap.boundaries.origin if snap.boundaries else 0,
        epoch_start_step=snap.epoch_start_step,
        lr_clamp_count=snap.lr_clamp_count,
        checkpoint_failures=snap.checkpoint_failures, checkpoint_error=snap.checkpoint_error,
        checkpoint_step=snap.checkpoint_step, paused_until=timestamp(snap.paused_until),
        hyperparameters=[hyperparameter_to_proto(h) for h in snap.hyperparameters],
        measurement_sequence=snap.measurement_sequence,
    )


def measurement_to_proto(measurement: Measurement) -> pb.Measurement:
    return pb.Measurement(step=measurement.step, epoch=measurement.epoch, metrics=dict(measurement.metrics),
                          epoch_end=measurement.epoch_end, time=timestamp(measurement.time),
                          sequence=measurement.sequence)


#: Marks a ListMeasurements token, so that a ListChanges token is never taken for one.
_MEASUREMENTS_TAG = "m"


def encode_measurement_token(after_sequence: int, run_id: str, incarnation: str) -> str:
    """An opaque ListMeasurements page token: the run, the process that issued it (a restart
    numbers the measurements after its checkpoint anew), and the sequence read up to."""
    body = f"{_MEASUREMENTS_TAG}:{run_id}:{incarnation}:{after_sequence}"
    return base64.urlsafe_b64encode(body.encode()).decode()


def decode_measurement_token(token: str, run_id: str) -> tuple[str, int]:
    """(the incarnation that issued it, the sequence read up to); INVALID_ARGUMENT naming
    `page_token` for anything but a ListMeasurements token of this run."""
    try:
        body = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        body = ""
    head, _, sequence = body.rpartition(":")
    head, _, incarnation = head.rpartition(":")
    tag, _, token_run = head.partition(":")
    if tag != _MEASUREMENTS_TAG or token_run != run_id or not (
            sequence.isascii() and sequence.isdigit() and len(sequence) <= 18):
        raise InvalidArgumentError("page_token", "must be a next_page_token of a ListMeasurements "
                                                 "call of this run", token[:64])
    return incarnation, int(sequence)


def _filter_tag(filter_text: str) -> str:
    """What a page token keeps of the filter it was issued for ("" for none: such a token
    reads as tokens did before filters existed)."""
    return "f" + hashlib.sha256(filter_text.encode()).hexdigest()[:16] if filter_text else ""


def encode_page_token(before_id: int, run_id: str, filter_text: str = "") -> str:
    tag = _filter_tag(filter_text)
    return base64.urlsafe_b64encode(f"{run_id}:{before_id}{':' + tag if tag else ''}".encode()).decode()


def decode_page_token(token: str, run_id: str, filter_text: str = "") -> int:
    """The change id a page token continues before; INVALID_ARGUMENT naming `page_token` for a
    token of another run, or one issued for another filter."""
    try:
        body = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        body = ""
    head, _, last = body.rpartition(":")
    issued_for, body = (last, head) if last.startswith("f") else ("", body)
    token_run, _, before = body.rpartition(":")
    if token_run != run_id or not (before.isascii() and before.isdigit() and len(before) <= 19):
        raise InvalidArgumentError("page_token", "must be a next_page_token of this run", token[:64])
    if issued_for != _filter_tag(filter_text):
        raise InvalidArgumentError("page_token", "must come from a ListChanges call with the same filter",
                                   token[:64])
    return int(before)
