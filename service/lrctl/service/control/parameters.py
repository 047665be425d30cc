"""SetParameters' rules, in pure Python: which names a trainer has, which of them its traced
train step lets change (structure), each one's range, and the guardrails' bounds; the value
a variable will hold (rounded to its dtype); and what GetState reports for each.

Checked on arrival and again at the boundary, like a schedule change (`policy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from lrctl.service.control.changes import Hyperparameter, SetParameters
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.control.limits import MAX_PARAMETER_NAME_BYTES, MAX_PARAMETERS
from lrctl.service.control.targets import ParameterSpace, ParameterSpec
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError

NO_PARAMETERS = ParameterSpace()


def field(name: str) -> str:
    return f"parameters[{name}]"


def held(spec: ParameterSpec, value: float) -> float:
    """`value` as the variable will hold it (rounded to its dtype)."""
    return float(np.asarray(value, dtype=spec.dtype))


def _range_text(spec: ParameterSpec) -> str:
    lo = "" if spec.minimum is None else f"{spec.minimum:g} {'<=' if spec.minimum_inclusive else '<'} "
    hi = "" if spec.maximum is None else f" {'<=' if spec.maximum_inclusive else '<'} {spec.maximum:g}"
    return f"must be {lo}{spec.name}{hi}" if lo or hi else "must be finite"


def check_value(spec: ParameterSpec, value: float) -> None:
    """INVALID_ARGUMENT naming `parameters[NAME]` if `value` is out of the range or not finite
    in the variable's dtype."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(field(spec.name), "must be a finite number", value)
    with np.errstate(over="ignore"):
        if not np.isfinite(np.asarray(value, dtype=spec.dtype)):
            raise InvalidArgumentError(field(spec.name), f"must be finite in {spec.dtype}, the "
                                       "variable's dtype", value)
    lo, hi = spec.minimum, spec.maximum
    if lo is not None and not (value >= lo if spec.minimum_inclusive else value > lo):
        raise InvalidArgumentError(field(spec.name), _range_text(spec), value)
    if hi is not None and not (value <= hi if spec.maximum_inclusive else value < hi):
        raise InvalidArgumentError(field(spec.name), _range_text(spec), value)


def check(action: SetParameters, space: ParameterSpace, limits: Guardrails) -> None:
    """Every rule a SetParameters must pass, in the order a client can act on: a job that
    cannot change any (FAILED_PRECONDITION), an unknown name (INVALID_ARGUMENT listing the
    known ones), a value out of range (INVALID_ARGUMENT), a parameter the traced step fixed
    (FAILED_PRECONDITION, OPTIMIZER_STRUCTURE, saying how to start the job), a guardrail."""
    if len(action.values) > MAX_PARAMETERS:
        raise InvalidArgumentError("parameters", f"must name at most {MAX_PARAMETERS} parameters",
                                   len(action.values))
    for name, _ in action.values:  # before any error quotes a name
        if len(name.encode()) > MAX_PARAMETER_NAME_BYTES:
            raise InvalidArgumentError("parameters", f"names must be at most {MAX_PARAMETER_NAME_BYTES} "
                                       "bytes", f"a name of {len(name.encode())} bytes")
    if space.unsupported:
        raise FailedPreconditionError(space.unsupported, field="parameters", kind="OPTIMIZER_STRUCTURE")
    for name, value in action.values:
        spec = space.get(name)
        if spec is None:
            known = ", ".join(space.names) or "none"
            raise InvalidArgumentError(field(name), f"must be a parameter this trainer has ({known})", value)
        check_value(spec, value)
    for name, value in action.values:
        spec = space.get(name)
        assert spec is not None
        if not spec.live:
            raise FailedPreconditionError(f"{name}: {spec.fixed_reason}", field=field(name),
                                          kind="OPTIMIZER_STRUCTURE")
        limits.check_parameter(name, value)


def report(space: ParameterSpace, values: Mapping[str, float], limits: Guardrails) -> tuple[Hyperparameter, ...]:
    """GetState's hyperparameters: each with its value, whether it is live, and the tightest
    bounds (the range's, the guardrail's)."""
    reported = []
    for spec in sorted(space.specs, key=lambda s: s.name):
        lo, hi = limits.parameter_bound(spec.name)
        low = _tighter(spec.minimum, lo, max)
        high = _tighter(spec.maximum, hi, min)
        reported.append(Hyperparameter(
            name=spec.name, value=float(values.get(spec.name, math.nan)), live=spec.live and not space.unsupported,
            fixed_reason=space.unsupported or spec.fixed_reason, registered=spec.registered,
            min_value=low, max_value=high))
    return tuple(reported)


def _tighter(a: float | None, b: float | None, pick: Callable[[float, float], float]) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return float(pick(a, b))
