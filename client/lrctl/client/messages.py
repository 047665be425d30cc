"""The requests the clients send, built from their arguments and checked before anything is
sent (`ValueError`, `TypeError`). The change options go into every change request the same
way (`apply_options`), whichever RPC carries them."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2
from google.protobuf.message import Message

from lrctl.client.changes import ChangeOptions, Origin, Parameters, Pin, Scale, Swap, View
from lrctl.client.schedules import to_schedule
from lrctl.v1 import training_control_pb2 as pb

__all__ = [
    "apply_options", "change_request", "check_one_of", "duration", "filter_naming",
    "origin_value", "rpc_of", "view_value", "watch_request",
]

_ORIGINS = {"restart": pb.STEP_ORIGIN_RESTART, "global": pb.STEP_ORIGIN_GLOBAL}
_VIEWS = {"basic": pb.STATE_VIEW_BASIC, "full": pb.STATE_VIEW_FULL}

#: The request field of each `ChangeOptions` field not named as it is.
_PROTO_NAMES = {"wait": "wait_until_applied"}


def origin_value(origin: Origin) -> pb.StepOrigin.ValueType:
    """A step origin: "restart", "global", or a `pb.StepOrigin` value."""
    return pb.StepOrigin.ValueType(_enum_value("origin", origin, _ORIGINS, pb.StepOrigin))


def view_value(view: View) -> pb.StateView.ValueType:
    """A state view: "basic" (no change lists), "full", or a `pb.StateView` value."""
    return pb.StateView.ValueType(_enum_value("view", view, _VIEWS, pb.StateView))


def _enum_value(argument: str, value: str | int, names: Mapping[str, int], enum: Any) -> int:
    """`value` as a number of the proto enum `enum`: one of `names` (any case) or a value of it."""
    if isinstance(value, str):
        try:
            return names[value.lower()]
        except KeyError:
            raise ValueError(f"Argument `{argument}` must be one of {sorted(names)} or a "
                             f"{enum.DESCRIPTOR.name}. Received: {argument}={value!r}") from None
    if value not in enum.values():
        raise ValueError(f"Argument `{argument}` is not a {enum.DESCRIPTOR.name} value. "
                         f"Received: {argument}={value!r}")
    return value


def apply_options(request: Message, options: ChangeOptions) -> Message:
    """Set `options` on a change request (of any change RPC); unset options (None) stay unset,
    and a request with no `request_id` gets a new UUID4. An option the request lacks (`force`
    and `preview_steps` apply to learning-rate changes only) must keep its default."""
    fields = request.DESCRIPTOR.fields_by_name
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        name = _PROTO_NAMES.get(field.name, field.name)
        if name not in fields:
            if value != field.default:
                raise ValueError(f"Argument `{field.name}` does not apply to "
                                 f"{request.DESCRIPTOR.name}. Received: {field.name}={value!r}")
            continue
        if value is not None:
            setattr(request, name, value)
    if options.request_id is None:
        request.request_id = uuid.uuid4().hex  # type: ignore[attr-defined]
    return request


def change_request(
    change: Pin | Scale | Swap | Parameters, options: ChangeOptions
) -> pb.SetLearningRateRequest | pb.SwapScheduleRequest | pb.SetOptimizerParametersRequest:
    """The request that makes `change` with `options`."""
    request: pb.SetLearningRateRequest | pb.SwapScheduleRequest | pb.SetOptimizerParametersRequest
    if isinstance(change, Parameters):
        request = pb.SetOptimizerParametersRequest(
            parameters={str(name): float(value) for name, value in change.parameters.items()})
    elif isinstance(change, Pin):
        request = pb.SetLearningRateRequest(learning_rate=change.learning_rate)
    elif isinstance(change, Scale):
        request = pb.SetLearningRateRequest(scale=change.factor)
    elif isinstance(change, Swap):
        request = pb.SwapScheduleRequest(
            schedule=to_schedule(change.schedule), origin=origin_value(change.origin),
            schedule_start_step=change.schedule_start_step, scale=change.scale)
    else:
        raise TypeError(f"A change is Scale, Pin, Swap or Parameters. Received: {change!r}")
    apply_options(request, options)
    return request


def rpc_of(request: Message) -> str:
    """The RPC that takes `request`: `SwapScheduleRequest` goes to SwapSchedule."""
    return request.DESCRIPTOR.name.removesuffix("Request")


def check_one_of(request_id: str | None, version: int | None) -> None:
    if (request_id is None) == (version is None):
        raise ValueError("Give exactly one of `request_id` and `version`.")


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def watch_request(min_interval: float, every_steps: int = 0, on_epoch_end: bool = False,
                  changes_only: bool = False, view: View = "full") -> pb.WatchStateRequest:
    return pb.WatchStateRequest(min_interval=duration(min_interval), every_steps=every_steps,
                                on_epoch_end=on_epoch_end, changes_only=changes_only,
                                view=view_value(view))


def filter_naming(request_id: str | None, version: int | None) -> str:
    """The ListChanges filter that finds the change sent with `request_id` (or applied as
    `version`)."""
    if request_id is not None:
        return 'request_id = "{}"'.format(request_id.replace("\\", "\\\\").replace('"', '\\"'))
    return f"version = {version}"
