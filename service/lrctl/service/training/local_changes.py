"""Keras's own LR callbacks beside lrctl: a float assigned to `optimizer.learning_rate`
(ReduceLROnPlateau, LearningRateScheduler, user code) on an optimizer a TrainingControl owns
becomes a local change, pinned at once and checked like a client's."""

from __future__ import annotations

import logging
import sys
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from lrctl.service.control.changes import Change, ChangeRequest, ChangeStatus, PinLearningRate
from lrctl.service.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from lrctl.service.observability.logs import short
from lrctl.service.schedules import forms
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.kinds import Constant

if TYPE_CHECKING:
    from lrctl.service.training.integration import TrainingControl

logger = logging.getLogger("lrctl")

#: The TrainingControl that owns each schedule (weakly both ways): where a float assigned to
#: its optimizer's `learning_rate` goes.
_CONTROLS: weakref.WeakKeyDictionary[ControllableSchedule, weakref.ReferenceType[TrainingControl]] = \
    weakref.WeakKeyDictionary()


def route_learning_rate_assignments(control: TrainingControl) -> None:
    """Make `optimizer.learning_rate = 0.001` work on `control`'s optimizer: Keras's
    ReduceLROnPlateau and LearningRateScheduler do exactly that, and Keras's setter raises
    TypeError for any optimizer whose learning rate is a schedule, as lrctl's is.

    `learning_rate` is a property of Keras's BaseOptimizer, and a property cannot be overridden
    on an instance, so its setter is wrapped on the class, once per process. For an optimizer no
    TrainingControl owns, Keras's own setter runs, unchanged. (A per-instance subclass, swapped
    in with `__class__`, would change the optimizer's type: Keras would serialize it as a
    custom class in get_config and `.keras` files, and pickling by reference would break.)
    A LossScaleOptimizer's setter forwards to its inner optimizer, which holds the schedule.
    """
    _CONTROLS[control.schedule] = weakref.ref(control)
    base = next(c for c in keras.optimizers.Optimizer.__mro__ if "learning_rate" in vars(c))
    keras_property = vars(base)["learning_rate"]
    if getattr(keras_property.fset, "lrctl_routed", False):
        return

    def set_learning_rate(optimizer: keras.optimizers.Optimizer, value: Any) -> None:
        schedule = getattr(optimizer, "_learning_rate", None)
        ref = _CONTROLS.get(schedule) if isinstance(schedule, ControllableSchedule) else None
        owner = ref() if ref is not None else None
        if owner is None:
            keras_property.fset(optimizer, value)
        else:
            owner.assign_learning_rate(value, source=_assigner(sys._getframe(1)))

    set_learning_rate.lrctl_routed = True  # type: ignore[attr-defined]
    setattr(base, "learning_rate", property(keras_property.fget, set_learning_rate,  # noqa: B010
                                            keras_property.fdel, keras_property.__doc__))


def _assigner(frame: types.FrameType | None) -> str:
    """Who assigned `optimizer.learning_rate`: the class of the first caller that is not an
    optimizer (a LossScaleOptimizer forwards), e.g. "ReduceLROnPlateau"; else the calling
    function. A few frame reads, at each assignment (an epoch end), never per step."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.optimizers.Optimizer):
            frame = frame.f_back
            continue
        if owner is not None:
            return type(owner).__name__
        code = frame.f_code
        return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
    return "unknown caller"


def assign_learning_rate(control: TrainingControl, value: Any, source: str,
                         apply_due: Callable[[int], list[Change]]) -> Change | None:
    """`source` assigned `value` to the optimizer's `learning_rate` on the training thread,
    between steps. It becomes a local change, pinned at this step boundary at once (`apply_due`
    applies what is due at a step): validated and checked by the guardrails (rate limit
    included) like a client's, with a version, a record whose reason names `source`, and a
    journal line if the server has a journal.

    A refusal never raises (it would crash `fit`): it is logged as a warning naming `source`
    and the rule, and the learning rate stays. A value that is already the pinned learning
    rate changes nothing (a LearningRateScheduler assigns every epoch). Returns the applied
    record, or None."""
    try:
        lr = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{source} assigned {value!r} to optimizer.learning_rate, which lrctl controls: "
            "assign a Python float, between steps (not inside a tf.function), or change the "
            "schedule through lrctl (e.g. a SwapSchedule change)") from None
    request = ChangeRequest(PinLearningRate(lr), reason=f"local: {source} set optimizer.learning_rate")
    controller = control.controller
    if control.workers is not None:
        error: Exception = FailedPreconditionError(
            "a local change in a multi-worker job would reach one worker only; change the "
            "learning rate through the chief's API")
        logger.warning("%s set optimizer.learning_rate = %g; not applied, the learning rate "
                       "stays: %s", source, lr, error)
        _observe(control, request, error)
        return None
    step = control.step
    control.resync()
    state, _ = controller.engine_state
    if isinstance(state.spec, Constant) and \
            np.float32(forms.learning_rate(state, step)) == np.float32(lr):
        return None
    control.publish(force=True)  # the guardrails compare with the LR at this step
    try:
        pending = controller.submit(request)
    except (InvalidArgumentError, FailedPreconditionError, ResourceExhaustedError) as e:
        logger.warning("%s set optimizer.learning_rate = %g at step %d; lrctl refused it and the "
                       "learning rate stays %g: %s", source, lr, step,
                       forms.learning_rate(state, step), e)
        _observe(control, request, e)
        return None
    finished = apply_due(step)
    record = next((c for c in finished if c.id == pending.id), pending)
    _observe(control, request, record)
    return record if record.status is ChangeStatus.APPLIED else None


def _observe(control: TrainingControl, request: ChangeRequest, outcome: Change | Exception) -> None:
    for observe in list(control.controller.local_observers):
        try:
            observe(request, outcome)
        except Exception:  # the change stands; a broken journal must not crash fit
            logger.exception("could not journal a local change: %s", short(request.reason))
