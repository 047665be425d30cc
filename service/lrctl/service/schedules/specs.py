"""Schedule specs: immutable, validated descriptions of a learning-rate schedule.

One frozen dataclass per kind (kinds.py), with Keras's argument names and defaults, validated
in its constructor: an invalid spec cannot exist. This module is what the rest of lrctl uses
of them: the kinds by name, Keras configs (also lrctl's JSON form of a spec), and the schedule
the engine computes. No TensorFlow here: gRPC threads build specs freely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lrctl.service.errors import InvalidArgumentError
from lrctl.service.schedules.kinds import (
    Constant,
    CosineDecay,
    CosineDecayRestarts,
    ExponentialDecay,
    InverseTimeDecay,
    PiecewiseConstantDecay,
    PiecewiseLinear,
    PolynomialDecay,
)
from lrctl.service.schedules.registry import (
    CAPACITY,
    FLOAT32_MAX,
    KINDS,
    MAX_STEP,
    Spec,
    check_number,
)

__all__ = [
    "CAPACITY", "FLOAT32_MAX", "MAX_STEP", "SPEC_TYPES", "ActiveSchedule", "Constant", "CosineDecay",
    "CosineDecayRestarts", "ExponentialDecay", "InverseTimeDecay", "Origin", "PiecewiseConstantDecay",
    "PiecewiseLinear", "PolynomialDecay", "ScheduleSpec", "as_spec", "check_number", "spec_from_config",
]

#: Any kind's spec.
ScheduleSpec = Spec
#: Every kind's spec class, in registration order.
SPEC_TYPES: tuple[type[Spec], ...] = tuple(KINDS)
_BY_KERAS_NAME = {t.keras_name: t for t in SPEC_TYPES}


def spec_from_config(class_name: str, config: Mapping[str, Any]) -> ScheduleSpec:
    """Build a spec from a Keras class name and `get_config()` dict (unknown keys such as
    `name` are ignored; missing keys take Keras's defaults). Lists stand for tuples, so JSON
    round-trips: `spec_from_config(spec.keras_name, spec.to_config()) == spec`."""
    spec_type = _BY_KERAS_NAME.get(class_name)
    if spec_type is None:
        raise InvalidArgumentError(
            "class_name", f"must be one of {sorted(_BY_KERAS_NAME)}", class_name
        )
    known = {f.name for f in dataclasses.fields(spec_type)}
    kwargs = {k: v for k, v in config.items() if k in known}
    try:
        return spec_type(**kwargs)
    except TypeError as e:  # a required argument is missing
        raise InvalidArgumentError("config", f"is incomplete for {class_name} ({e})", dict(config)) from e


def as_spec(value: object) -> ScheduleSpec:
    """Accept a spec, a float (a constant), a Keras built-in schedule object, or the dict that
    `keras.optimizers.schedules.serialize()` returns."""
    if isinstance(value, SPEC_TYPES):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    if isinstance(value, Mapping):
        return spec_from_config(str(value.get("class_name")), value.get("config", {}))
    get_config = getattr(value, "get_config", None)
    if callable(get_config):
        try:
            config = get_config()
        except NotImplementedError as e:  # a custom Keras schedule without get_config()
            raise InvalidArgumentError(
                "schedule", "must be a float, a Keras schedule or a schedule spec", value
            ) from e
        return spec_from_config(type(value).__name__, config)
    raise InvalidArgumentError("schedule", "must be a float, a Keras schedule or a schedule spec", value)


class Origin(Enum):
    """Where a swapped-in schedule's step 0 lies."""

    RESTART = "restart"  #: at the step where the swap is applied (the schedule starts afresh)
    GLOBAL = "global"  #: at optimizer step 0, as Keras evaluates schedules


@dataclass(frozen=True)
class ActiveSchedule:
    """What the engine computes: `lr(step) = scale * spec(max(step - origin_step, 0))`."""

    spec: ScheduleSpec
    origin: Origin = Origin.GLOBAL
    origin_step: int = 0
    scale: float = 1.0
