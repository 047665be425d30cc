"""What the due changes become at their boundary: each one's final record, decided in pure
Python one after the other from the state and version the boundary meets, so that the engine
is loaded once for all of them. Applied; aborted on a version conflict; failed when its step
was missed (never applied late) or the rules, checked again over the whole horizon, now refuse
it. And if that one load fails, the applied ones turned FAILED. Pure numpy (`forms`), no
TensorFlow, no state.
"""

from __future__ import annotations

import dataclasses
import math

from lrctl.service.control import parameters
from lrctl.service.control.changes import Change, ChangeStatus, ParameterUpdate, SetParameters
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.control.policy import check_change
from lrctl.service.control.targets import ParameterSpace
from lrctl.service.errors import (
    ApplyError,
    FailedPreconditionError,
    InvalidArgumentError,
    VersionConflictError,
)
from lrctl.service.schedules import forms
from lrctl.service.schedules.specs import ActiveSchedule


def decide(due: list[Change], state: ActiveSchedule, version: int, step: int, now: float,
           limits: Guardrails, space: ParameterSpace = parameters.NO_PARAMETERS,
           values: dict[str, float] | None = None) -> tuple[list[Change], ActiveSchedule, int]:
    """Each due change's final record, applied one after the other from (`state`, `version`);
    returns them with the state and version they leave. `values`: the hyperparameters as the
    variables hold them (read at this boundary); each applied SetParameters updates it in
    place, so the next one's `before` is right."""
    finals = []
    values = {} if values is None else values
    for change in due:
        final = _final(change, state, version, step, now, limits, space, values)
        if final.status is ChangeStatus.APPLIED:
            assert final.schedule_after is not None
            state, version = final.schedule_after, final.version
        finals.append(final)
    return finals, state, version


def _final(change: Change, state: ActiveSchedule, version: int, step: int, now: float,
           limits: Guardrails, space: ParameterSpace, values: dict[str, float]) -> Change:
    if change.due_key and change.due_key < step:  # its boundary never came: never apply late
        return _failed(change, now, _late_error(change.due_key, step))
    expected = change.request.expected_version
    if expected is not None and expected != version:
        return dataclasses.replace(change, status=ChangeStatus.ABORTED, current_version=version,
                                   applied_time=now, error=VersionConflictError(expected, version, step=step))
    action = change.request.action
    try:  # as on arrival, from the state it meets now: the space and the guardrails may have moved
        if isinstance(action, SetParameters):
            parameters.check(action, space, limits)
            after, lr = state, forms.learning_rate(state, step)
        else:  # over the whole horizon from here
            after, lr = check_change(action, state, step, limits)
    except (InvalidArgumentError, FailedPreconditionError) as e:  # fine on arrival, not now
        return _failed(change, now, e if isinstance(e, FailedPreconditionError) else FailedPreconditionError(str(e)))
    updates = _parameter_updates(action, space, values) if isinstance(action, SetParameters) else ()
    return dataclasses.replace(change, status=ChangeStatus.APPLIED, version=version + 1, applied_step=step,
                               learning_rate_after=lr, schedule_after=after, applied_time=now,
                               parameter_updates=updates)


def _parameter_updates(action: SetParameters, space: ParameterSpace,
                       values: dict[str, float]) -> tuple[ParameterUpdate, ...]:
    """Each value's before and after (as its variable will hold it); `values` updated in place."""
    updates = []
    for name, value in action.values:
        spec = space.get(name)
        assert spec is not None
        after_value = parameters.held(spec, value)
        updates.append(ParameterUpdate(name, values.get(name, math.nan), after_value))
        values[name] = after_value
    return tuple(updates)


def _failed(change: Change, now: float, error: Exception) -> Change:
    return dataclasses.replace(change, status=ChangeStatus.FAILED, applied_time=now, error=error)


def _late_error(due: int, step: int) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"apply_at_step={due}: no step boundary fell on that step (the next one came at step "
        f"{step}: an epoch ended early, or the boundaries moved); the change was not applied late",
        field="apply_at_step")


def failed_load(finals: list[Change], error: Exception) -> tuple[list[Change], list[Change]]:
    """The engine could not load the outcome of `finals`: each APPLIED one becomes FAILED.
    Returns every final record and the ones that changed."""
    failure = ApplyError(f"the engine could not load the new schedule: {error!r}; nothing changed")
    corrected = [dataclasses.replace(f, status=ChangeStatus.FAILED, version=0, applied_step=None,
                                     learning_rate_after=None, schedule_after=None, error=failure,
                                     parameter_updates=())
                 for f in finals if f.status is ChangeStatus.APPLIED]
    failed = {f.id: f for f in corrected}
    return [failed.get(f.id, f) for f in finals], corrected
