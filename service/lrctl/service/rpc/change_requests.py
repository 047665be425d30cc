"""Protobuf -> domain for the mutation RPCs: each request as the `ChangeRequest` it asks for,
its action and the options every change takes. One function per RPC, and `BY_METHOD` naming
them for the servicer, which runs every mutation the same way. A malformed request is
INVALID_ARGUMENT naming its field; the rules that need no proto are the policy's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.duration_pb2 import Duration

from lrctl.service.control.changes import (
    Action,
    ChangeRequest,
    LoadCheckpoint,
    PauseTraining,
    PinLearningRate,
    ResumeTraining,
    SaveCheckpoint,
    ScaleLearningRate,
    SetParameters,
    StopTraining,
    SwapSchedule,
)
from lrctl.service.control.limits import DEFAULT_PAUSE_TIMEOUT
from lrctl.service.errors import InvalidArgumentError
from lrctl.service.rpc.convert import spec_from_proto
from lrctl.service.schedules import specs
from lrctl.v1 import training_control_pb2 as pb

#: Every mutation RPC's request: each carries the options every change takes.
MutationRequest = (pb.SetLearningRateRequest | pb.SwapScheduleRequest | pb.SetOptimizerParametersRequest
                   | pb.PauseTrainingRequest | pb.ResumeTrainingRequest | pb.SaveCheckpointRequest
                   | pb.StopTrainingRequest | pb.LoadCheckpointRequest)

_ORIGIN_FROM_PB = {
    pb.STEP_ORIGIN_UNSPECIFIED: specs.Origin.RESTART,
    pb.STEP_ORIGIN_RESTART: specs.Origin.RESTART,
    pb.STEP_ORIGIN_GLOBAL: specs.Origin.GLOBAL,
}


def _with_options(request: MutationRequest, action: Action, *, force: bool = False) -> ChangeRequest:
    """`action` with the options every change takes (`force` only where a request has one)."""
    return ChangeRequest(
        action=action,
        request_id=request.request_id,
        expected_version=request.expected_version if request.HasField("expected_version") else None,
        apply_at_step=request.apply_at_step if request.HasField("apply_at_step") else None,
        reason=request.reason,
        force=force,
        expected_run_id=request.expected_run_id,
        expected_incarnation=request.expected_incarnation,
        apply_after_steps=request.apply_after_steps if request.HasField("apply_after_steps") else None,
    )


def set_learning_rate(request: pb.SetLearningRateRequest) -> ChangeRequest:
    which = request.WhichOneof("change")
    if which is None:
        raise InvalidArgumentError("learning_rate", "or `scale` must be set", "neither")
    action: Action = (PinLearningRate(request.learning_rate) if which == "learning_rate"
                      else ScaleLearningRate(request.scale))
    return _with_options(request, action, force=request.force)


def swap_schedule(request: pb.SwapScheduleRequest) -> ChangeRequest:
    if not request.HasField("schedule"):
        raise InvalidArgumentError("schedule", "must be set", "nothing")
    if request.origin not in _ORIGIN_FROM_PB:
        raise InvalidArgumentError("origin", "must be a known StepOrigin", request.origin)
    action = SwapSchedule(spec_from_proto(request.schedule), _ORIGIN_FROM_PB[request.origin],
                          start_step=request.schedule_start_step,
                          scale=request.scale if request.HasField("scale") else None)
    return _with_options(request, action, force=request.force)


def set_optimizer_parameters(request: pb.SetOptimizerParametersRequest) -> ChangeRequest:
    """Names sorted: one payload per request, whatever the map's order on the wire. An empty
    map is refused with the other stateless rules (the policy)."""
    return _with_options(request, SetParameters(tuple(sorted(
        (name, float(value)) for name, value in request.parameters.items()))))


def pause_training(request: pb.PauseTrainingRequest) -> ChangeRequest:
    return _with_options(request, PauseTraining(pause_timeout(request.timeout)))


def resume_training(request: pb.ResumeTrainingRequest) -> ChangeRequest:
    return _with_options(request, ResumeTraining())


def save_checkpoint(request: pb.SaveCheckpointRequest) -> ChangeRequest:
    return _with_options(request, SaveCheckpoint())


def stop_training(request: pb.StopTrainingRequest) -> ChangeRequest:
    return _with_options(request, StopTraining())


def load_checkpoint(request: pb.LoadCheckpointRequest) -> ChangeRequest:
    return _with_options(request, LoadCheckpoint(request.path, request.load_hyperparameters))


def pause_timeout(duration: Duration) -> float:
    """PauseTrainingRequest.timeout in seconds: unset or zero is the default (1 hour); a
    malformed Duration (nanos out of range, mixed signs) is INVALID_ARGUMENT naming `timeout`;
    the range is the policy's (it names `timeout` too)."""
    if not -999_999_999 <= duration.nanos <= 999_999_999 or (duration.seconds * duration.nanos < 0):
        raise InvalidArgumentError("timeout", "must be a valid Duration",
                                   f"{duration.seconds}s {duration.nanos}ns")
    seconds = duration.seconds + duration.nanos / 1e9
    return seconds or DEFAULT_PAUSE_TIMEOUT


#: Each mutation RPC's conversion by method name (CancelChange names a change, submits none).
BY_METHOD: dict[str, Callable[[Any], ChangeRequest]] = {
    "SetLearningRate": set_learning_rate,
    "SwapSchedule": swap_schedule,
    "SetOptimizerParameters": set_optimizer_parameters,
    "PauseTraining": pause_training,
    "ResumeTraining": resume_training,
    "SaveCheckpoint": save_checkpoint,
    "StopTraining": stop_training,
    "LoadCheckpoint": load_checkpoint,
}
