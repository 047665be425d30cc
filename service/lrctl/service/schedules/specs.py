"""Schedule specs: immutable, validated descriptions of a learning-rate schedule.

One frozen dataclass per kind, with Keras's argument names and defaults. Validation
runs in the constructor, so an invalid spec cannot exist; this is the one place that
validates schedule parameters. No TensorFlow here: gRPC threads build specs freely.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from lrctl.service.control.errors import InvalidArgumentError

#: Most boundaries (PiecewiseConstantDecay) or knots (PiecewiseLinear) one schedule may have.
#: Variable-length parameters live in fixed-size variables so that a swap never retraces.
CAPACITY = 64
#: Steps are stored exactly in int64 and float64 variables, so they stay below 2**53.
MAX_STEP = 2**53
#: The engine computes in float32: a larger magnitude is inf there.
FLOAT32_MAX = 3.4028234663852886e38


def _learning_rate(field: str, value: object) -> float:
    return check_number(field, value, minimum=0)


def check_number(field: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    """A number >= `minimum` (> with `inclusive=False`) that is finite in float32, the
    precision the engine computes in; otherwise an InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(field, "must be a number", value)
    ok = value >= minimum if inclusive else value > minimum
    if not math.isfinite(value) or not ok:
        raise InvalidArgumentError(field, f"must be finite and {'>=' if inclusive else '>'} {minimum:g}", value)
    if abs(value) > FLOAT32_MAX:
        raise InvalidArgumentError(field, f"must be finite in float32 (at most {FLOAT32_MAX:.8g})", value)
    return float(value)


def _step(field: str, value: object, *, minimum: int) -> int:
    """An integer step count. Integral floats (Keras configs often hold 1000.0) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(field, "must be an integer", value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidArgumentError(field, "must be an integer", value)
    step = int(value)
    if step < minimum:
        raise InvalidArgumentError(field, f"must be >= {minimum}" if minimum != 1 else "must be > 0", value)
    if step > MAX_STEP:
        raise InvalidArgumentError(field, f"must be <= {MAX_STEP}", value)
    return step


def _strictly_increasing(field: str, steps: list[int]) -> None:
    for a, b in itertools.pairwise(steps):
        if b <= a:
            raise InvalidArgumentError(field, "must be strictly increasing", steps)


class _Spec:
    """Shared behaviour: normalise-and-validate in `__post_init__`, Keras-style config."""

    keras_name: ClassVar[str]

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def to_config(self) -> dict[str, Any]:
        """The Keras `get_config()` of the equivalent Keras schedule (tuples become lists)."""
        config = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(map(list, v)) if k == "knots" else (list(v) if isinstance(v, tuple) else v)
                for k, v in config.items()}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items())
        return f"{self.keras_name}({args})"


@dataclass(frozen=True)
class Constant(_Spec):
    """A fixed learning rate: `lr(step) = learning_rate`. What a pinned LR becomes."""

    keras_name: ClassVar[str] = "Constant"
    learning_rate: float

    def __post_init__(self) -> None:
        self._set("learning_rate", _learning_rate("learning_rate", self.learning_rate))


@dataclass(frozen=True)
class ExponentialDecay(_Spec):
    """`initial_learning_rate * decay_rate ** (step / decay_steps)`, floored exponent if staircase."""

    keras_name: ClassVar[str] = "ExponentialDecay"
    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", _learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", _step("decay_steps", self.decay_steps, minimum=1))
        self._set("decay_rate", check_number("decay_rate", self.decay_rate, minimum=0, inclusive=False))
        self._set("staircase", bool(self.staircase))


@dataclass(frozen=True)
class PiecewiseConstantDecay(_Spec):
    """`values[0]` while `step <= boundaries[0]`, `values[i]` in `(boundaries[i-1], boundaries[i]]`."""

    keras_name: ClassVar[str] = "PiecewiseConstantDecay"
    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        boundaries = [_step(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(self.boundaries)]
        values = [_learning_rate(f"values[{i}]", v) for i, v in enumerate(self.values)]
        if len(boundaries) > CAPACITY:
            raise InvalidArgumentError(
                "boundaries", f"must have at most {CAPACITY} entries", f"{len(boundaries)} entries"
            )
        _strictly_increasing("boundaries", boundaries)
        if len(values) != len(boundaries) + 1:
            raise InvalidArgumentError(
                "values",
                f"must have len(boundaries) + 1 = {len(boundaries) + 1} entries",
                f"{len(values)} entries",
            )
        self._set("boundaries", tuple(boundaries))
        self._set("values", tuple(values))


@dataclass(frozen=True)
class PolynomialDecay(_Spec):
    """`(initial - end) * (1 - min(step, decay_steps) / decay_steps) ** power + end`."""

    keras_name: ClassVar[str] = "PolynomialDecay"
    initial_learning_rate: float
    decay_steps: int
    end_learning_rate: float = 0.0001
    power: float = 1.0
    cycle: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", _learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", _step("decay_steps", self.decay_steps, minimum=1))
        self._set("end_learning_rate", _learning_rate("end_learning_rate", self.end_learning_rate))
        self._set("power", check_number("power", self.power, minimum=0, inclusive=False))
        self._set("cycle", bool(self.cycle))


@dataclass(frozen=True)
class InverseTimeDecay(_Spec):
    """`initial_learning_rate / (1 + decay_rate * step / decay_steps)`, floored if staircase."""

    keras_name: ClassVar[str] = "InverseTimeDecay"
    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", _learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", _step("decay_steps", self.decay_steps, minimum=1))
        self._set("decay_rate", check_number("decay_rate", self.decay_rate, minimum=0))
        self._set("staircase", bool(self.staircase))


@dataclass(frozen=True)
class CosineDecay(_Spec):
    """Optional linear warmup to `warmup_target`, then cosine decay to `alpha` times the peak."""

    keras_name: ClassVar[str] = "CosineDecay"
    initial_learning_rate: float
    decay_steps: int
    alpha: float = 0.0
    warmup_target: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", _learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", _step("decay_steps", self.decay_steps, minimum=1))
        self._set("alpha", _fraction("alpha", self.alpha))
        if self.warmup_target is not None:
            self._set("warmup_target", _learning_rate("warmup_target", self.warmup_target))
        self._set("warmup_steps", _step("warmup_steps", self.warmup_steps, minimum=0))


@dataclass(frozen=True)
class CosineDecayRestarts(_Spec):
    """SGDR: cosine decay restarted every period; periods grow by `t_mul`, peaks by `m_mul`."""

    keras_name: ClassVar[str] = "CosineDecayRestarts"
    initial_learning_rate: float
    first_decay_steps: int
    t_mul: float = 2.0
    m_mul: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", _learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("first_decay_steps", _step("first_decay_steps", self.first_decay_steps, minimum=1))
        # Keras's period is log(1 - fraction * (1 - t_mul)) / log(t_mul): with t_mul < 1 the
        # periods shrink to a finite sum, and past it the log is of a negative number (NaN).
        self._set("t_mul", check_number("t_mul", self.t_mul, minimum=1))
        self._set("m_mul", check_number("m_mul", self.m_mul, minimum=0, inclusive=False))
        self._set("alpha", _fraction("alpha", self.alpha))


@dataclass(frozen=True)
class PiecewiseLinear(_Spec):
    """Linear interpolation between `(step, learning_rate)` knots; flat before the first and after
    the last. Covers linear warmup, warmup-stable-decay cooldowns and 1cycle."""

    keras_name: ClassVar[str] = "PiecewiseLinear"
    knots: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        knots = list(self.knots)
        if not 1 <= len(knots) <= CAPACITY:
            raise InvalidArgumentError("knots", f"must have 1 to {CAPACITY} entries", f"{len(knots)} entries")
        steps = [_step(f"knots[{i}].step", k[0], minimum=0) for i, k in enumerate(knots)]
        rates = [_learning_rate(f"knots[{i}].learning_rate", k[1]) for i, k in enumerate(knots)]
        _strictly_increasing("knots", steps)
        self._set("knots", tuple(zip(steps, rates)))


def _fraction(field: str, value: object) -> float:
    number = check_number(field, value, minimum=0)
    if number > 1:
        raise InvalidArgumentError(field, "must be in [0, 1]", value)
    return number


ScheduleSpec = (
    Constant
    | ExponentialDecay
    | PiecewiseConstantDecay
    | PolynomialDecay
    | InverseTimeDecay
    | CosineDecay
    | CosineDecayRestarts
    | PiecewiseLinear
)

SPEC_TYPES: tuple[type[ScheduleSpec], ...] = (
    Constant,
    ExponentialDecay,
    PiecewiseConstantDecay,
    PolynomialDecay,
    InverseTimeDecay,
    CosineDecay,
    CosineDecayRestarts,
    PiecewiseLinear,
)
_BY_KERAS_NAME = {t.keras_name: t for t in SPEC_TYPES}


def spec_from_config(class_name: str, config: Mapping[str, Any]) -> ScheduleSpec:
    """Build a spec from a Keras class name and `get_config()` dict (unknown keys such as
    `name` are ignored; missing keys take Keras's defaults)."""
    spec_type = _BY_KERAS_NAME.get(class_name)
    if spec_type is None:
        raise InvalidArgumentError(
            "class_name", f"must be one of {sorted(_BY_KERAS_NAME)}", class_name
        )
    known = {f.name for f in dataclasses.fields(spec_type)}
    kwargs = {k: v for k, v in config.items() if k in known}
    if spec_type is PiecewiseLinear:
        kwargs["knots"] = tuple(tuple(k) for k in kwargs.get("knots", ()))
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
