"""Every schedule kind, each in one place: its spec (Keras's arguments, defaults and
validation), its forms (the float32 formula the engine and the host both run), its `derive`
(the coefficients, scale folded in) and where its extremes lie (for the guardrails).

To add a kind: add its message to the proto's `Schedule.kind` oneof (named after the class),
then append one `@register`ed spec here. Append only: checkpoints save a form's index in
registration order. tests/test_specs.py checks that the proto and the registry agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrctl.service.errors import InvalidArgumentError
from lrctl.service.schedules.registry import (
    CAPACITY,
    Derived,
    Form,
    HostOps,
    Spec,
    Terms,
    check_fraction,
    check_increasing,
    check_learning_rate,
    check_number,
    check_step,
    first_steps,
    monotone,
    register,
)

# In the forms, `x` is keras.ops in the graph and `HostOps` on the host; `c` holds the form's
# named coefficients and the tables (`steps`, `rates`, `slopes`); `local` is the int64 step.
_PI = np.float32(math.pi)


# -- Constant ------------------------------------------------------------------------------------
def _constant(x: Any, c: Any, local: Any) -> Any:
    return c.rate


@register(constant=Form(("rate",), _constant, monotone))
@dataclass(frozen=True)
class Constant(Spec):
    """A fixed learning rate: `lr(step) = learning_rate`. What a pinned LR becomes."""

    learning_rate: float

    def __post_init__(self) -> None:
        self._set("learning_rate", check_learning_rate("learning_rate", self.learning_rate))

    def derive(self, scale: float) -> Terms:
        return Terms("constant", {"rate": self.learning_rate * scale})


# -- ExponentialDecay ----------------------------------------------------------------------------
def _exponential(x: Any, c: Any, local: Any) -> Any:
    return c.initial * x.power(c.decay_rate, x.cast(local, "float32") / c.decay_steps)


def _exponential_staircase(x: Any, c: Any, local: Any) -> Any:
    return c.initial * x.power(c.decay_rate, x.floor(x.cast(local, "float32") / c.decay_steps))


_DECAY = ("initial", "decay_steps", "decay_rate")


@register(exponential=Form(_DECAY, _exponential, monotone),
          exponential_staircase=Form(_DECAY, _exponential_staircase, monotone))
@dataclass(frozen=True)
class ExponentialDecay(Spec):
    """`initial_learning_rate * decay_rate ** (step / decay_steps)`, floored exponent if staircase."""

    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", check_learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", check_step("decay_steps", self.decay_steps, minimum=1))
        self._set("decay_rate", check_number("decay_rate", self.decay_rate, minimum=0, inclusive=False))
        self._set("staircase", bool(self.staircase))

    def derive(self, scale: float) -> Terms:
        return Terms("exponential_staircase" if self.staircase else "exponential",
                     {"initial": self.initial_learning_rate * scale, "decay_steps": self.decay_steps,
                      "decay_rate": self.decay_rate})


# -- InverseTimeDecay ----------------------------------------------------------------------------
def _inverse_time(x: Any, c: Any, local: Any) -> Any:
    return c.initial / (1.0 + c.decay_rate * (x.cast(local, "float32") / c.decay_steps))


def _inverse_time_staircase(x: Any, c: Any, local: Any) -> Any:
    return c.initial / (1.0 + c.decay_rate * x.floor(x.cast(local, "float32") / c.decay_steps))


@register(inverse_time=Form(_DECAY, _inverse_time, monotone),
          inverse_time_staircase=Form(_DECAY, _inverse_time_staircase, monotone))
@dataclass(frozen=True)
class InverseTimeDecay(Spec):
    """`initial_learning_rate / (1 + decay_rate * step / decay_steps)`, floored if staircase."""

    initial_learning_rate: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", check_learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", check_step("decay_steps", self.decay_steps, minimum=1))
        self._set("decay_rate", check_number("decay_rate", self.decay_rate, minimum=0))
        self._set("staircase", bool(self.staircase))

    def derive(self, scale: float) -> Terms:
        return Terms("inverse_time_staircase" if self.staircase else "inverse_time",
                     {"initial": self.initial_learning_rate * scale, "decay_steps": self.decay_steps,
                      "decay_rate": self.decay_rate})


# -- PolynomialDecay -----------------------------------------------------------------------------
def _polynomial(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.decay_steps)
    return c.span * x.power(1.0 - s / c.decay_steps, c.power) + c.end


def _polynomial_cycle(x: Any, c: Any, local: Any) -> Any:
    # The first multiple of decay_steps at or after the step (decay_steps itself at step 0).
    s = x.cast(local, "float32")
    steps = c.decay_steps * x.maximum(x.ceil(s / c.decay_steps), 1.0)
    return c.span * x.power(1.0 - s / steps, c.power) + c.end


def _cycle_candidates(derived: Derived, a: int, b: int) -> list[int]:
    # Monotone within each cycle ((k-1)D, kD]; cycle k's first value moves monotonically with
    # k and every cycle ends at `end`: the first cycle end and start in range count.
    d = int(derived.coefficients["decay_steps"])
    k = max(-(-a // d), 1)  # the first cycle end at or after a (cycle 1 holds step 0)
    return [a, b, k * d - 1, k * d, k * d + 1]


_POLYNOMIAL = ("span", "end", "decay_steps", "power")


@register(polynomial=Form(_POLYNOMIAL, _polynomial, monotone),
          polynomial_cycle=Form(_POLYNOMIAL, _polynomial_cycle, _cycle_candidates))
@dataclass(frozen=True)
class PolynomialDecay(Spec):
    """`(initial - end) * (1 - min(step, decay_steps) / decay_steps) ** power + end`."""

    initial_learning_rate: float
    decay_steps: int
    end_learning_rate: float = 0.0001
    power: float = 1.0
    cycle: bool = False

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", check_learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", check_step("decay_steps", self.decay_steps, minimum=1))
        self._set("end_learning_rate", check_learning_rate("end_learning_rate", self.end_learning_rate))
        self._set("power", check_number("power", self.power, minimum=0, inclusive=False))
        self._set("cycle", bool(self.cycle))

    def derive(self, scale: float) -> Terms:
        return Terms("polynomial_cycle" if self.cycle else "polynomial",
                     {"span": (self.initial_learning_rate - self.end_learning_rate) * scale,
                      "end": self.end_learning_rate * scale, "decay_steps": self.decay_steps,
                      "power": self.power})


# -- CosineDecay ---------------------------------------------------------------------------------
def _cosine(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.decay_steps)
    return c.mid + c.half_range * x.cos(c.pi_over_decay_steps * s)


def _cosine_warmup(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.end)
    warmup = c.initial + c.warmup_slope * s
    return x.where(s < c.warmup_steps, warmup,
                   c.mid + c.half_range * x.cos(c.pi_over_decay_steps * (s - c.warmup_steps)))


def _warmup_candidates(derived: Derived, a: int, b: int) -> list[int]:
    # Linear up (or down) to the peak at warmup_steps, then cosine down.
    w = int(derived.coefficients["warmup_steps"])
    return [a, b, w - 1, w]


_COSINE = ("mid", "half_range", "decay_steps", "pi_over_decay_steps")


@register(cosine=Form(_COSINE, _cosine, monotone),
          cosine_warmup=Form(("initial", "warmup_slope", "warmup_steps", "end", *_COSINE), _cosine_warmup,
                             _warmup_candidates))
@dataclass(frozen=True)
class CosineDecay(Spec):
    """Optional linear warmup to `warmup_target`, then cosine decay to `alpha` times the peak."""

    initial_learning_rate: float
    decay_steps: int
    alpha: float = 0.0
    warmup_target: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", check_learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("decay_steps", check_step("decay_steps", self.decay_steps, minimum=1))
        self._set("alpha", check_fraction("alpha", self.alpha))
        if self.warmup_target is not None:
            self._set("warmup_target", check_learning_rate("warmup_target", self.warmup_target))
        self._set("warmup_steps", check_step("warmup_steps", self.warmup_steps, minimum=0))

    def derive(self, scale: float) -> Terms:
        # Keras decays from warmup_target after a warmup, from the initial LR without one (it
        # ignores warmup_steps without a warmup_target).
        peak = self.initial_learning_rate if self.warmup_target is None else self.warmup_target
        c = {"mid": peak * scale * (1.0 + self.alpha) / 2, "half_range": peak * scale * (1.0 - self.alpha) / 2,
             "decay_steps": self.decay_steps, "pi_over_decay_steps": math.pi / self.decay_steps}
        if self.warmup_target is None or self.warmup_steps == 0:
            return Terms("cosine", c)
        return Terms("cosine_warmup", c | {
            "initial": self.initial_learning_rate * scale, "warmup_steps": self.warmup_steps,
            "warmup_slope": (self.warmup_target - self.initial_learning_rate) * scale / self.warmup_steps,
            "end": self.warmup_steps + self.decay_steps})


# -- CosineDecayRestarts -------------------------------------------------------------------------
def _restarts_period(x: Any, c: Any, local: Any) -> tuple[Any, Any]:
    # Keras's own operations for the period, so that a step near a period boundary falls in
    # the same period as with Keras.
    fraction = x.cast(local, "float32") / c.first_decay_steps
    return fraction, x.floor(x.log(1.0 - fraction * c.one_minus_t_mul) / x.log(c.t_mul))


def _cosine_restarts(x: Any, c: Any, local: Any) -> Any:
    fraction, period = _restarts_period(x, c, local)
    t_mul_power = x.power(c.t_mul, period)
    within = (fraction - (1.0 - t_mul_power) / c.one_minus_t_mul) / t_mul_power
    return c.floor + c.half_range * x.power(c.m_mul, period) * (1.0 + x.cos(_PI * within))


def _restarts_linear_period(x: Any, c: Any, local: Any) -> tuple[Any, Any]:
    fraction = x.cast(local, "float32") / c.first_decay_steps
    return fraction, x.floor(fraction)


def _cosine_restarts_linear(x: Any, c: Any, local: Any) -> Any:  # t_mul == 1
    fraction, period = _restarts_linear_period(x, c, local)
    return c.floor + c.half_range * x.power(c.m_mul, period) * (1.0 + x.cos(_PI * (fraction - period)))


def _restarts_candidates(derived: Derived, a: int, b: int) -> np.ndarray:
    # Each period peaks at its start and falls to its end. With t_mul == 1 every period is
    # alike, scaled by m_mul**k (monotone in k): the first and last period starts in range hold
    # the extremes. With t_mul > 1 periods differ in length: all of them.
    linear = derived.form == "cosine_restarts_linear"
    tables = derived.tables()

    def period(steps: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            fn = _restarts_linear_period if linear else _restarts_period
            return np.asarray(fn(HostOps, tables, steps)[1], np.float64)

    first, last = period(np.array([a, b], np.int64))
    wanted = np.array([first + 1, last]) if linear else np.arange(first + 1, last + 1)
    starts = first_steps(period, wanted, a, b)
    return np.concatenate([[a, b], starts - 1, starts])


_RESTARTS = ("floor", "half_range", "first_decay_steps", "t_mul", "one_minus_t_mul", "m_mul")


@register(cosine_restarts=Form(_RESTARTS, _cosine_restarts, _restarts_candidates),
          cosine_restarts_linear=Form(_RESTARTS, _cosine_restarts_linear, _restarts_candidates))
@dataclass(frozen=True)
class CosineDecayRestarts(Spec):
    """SGDR: cosine decay restarted every period; periods grow by `t_mul`, peaks by `m_mul`."""

    initial_learning_rate: float
    first_decay_steps: int
    t_mul: float = 2.0
    m_mul: float = 1.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        self._set("initial_learning_rate", check_learning_rate("initial_learning_rate", self.initial_learning_rate))
        self._set("first_decay_steps", check_step("first_decay_steps", self.first_decay_steps, minimum=1))
        # Keras's period is log(1 - fraction * (1 - t_mul)) / log(t_mul): with t_mul < 1 the
        # periods shrink to a finite sum, and past it the log is of a negative number (NaN).
        self._set("t_mul", check_number("t_mul", self.t_mul, minimum=1))
        self._set("m_mul", check_number("m_mul", self.m_mul, minimum=0, inclusive=False))
        self._set("alpha", check_fraction("alpha", self.alpha))

    def derive(self, scale: float) -> Terms:
        return Terms("cosine_restarts_linear" if self.t_mul == 1.0 else "cosine_restarts", {
            "floor": self.initial_learning_rate * scale * self.alpha,
            "half_range": self.initial_learning_rate * scale * (1.0 - self.alpha) / 2,
            "first_decay_steps": self.first_decay_steps, "t_mul": self.t_mul, "m_mul": self.m_mul,
            # In float32 arithmetic, as Keras computes it.
            "one_minus_t_mul": float(np.float32(1.0) - np.float32(self.t_mul))})


# -- the table kinds: PiecewiseConstantDecay, PiecewiseLinear ---------------------------------
def _table_candidates(derived: Derived, a: int, b: int) -> np.ndarray:
    # Constant between boundaries (values change after one); linear between knots.
    knots = derived.steps[(derived.steps >= a) & (derived.steps <= b)]
    return np.concatenate([[a, b], knots, knots + 1])


def _piecewise_constant(x: Any, c: Any, local: Any) -> Any:
    # rates[i] for boundaries[i-1] < step <= boundaries[i]; padding never counts.
    return x.take(c.rates, x.sum(x.greater(local, c.steps)))


@register(piecewise_constant=Form((), _piecewise_constant, _table_candidates))
@dataclass(frozen=True)
class PiecewiseConstantDecay(Spec):
    """`values[0]` while `step <= boundaries[0]`, `values[i]` in `(boundaries[i-1], boundaries[i]]`."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        boundaries = [check_step(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(self.boundaries)]
        values = [check_learning_rate(f"values[{i}]", v) for i, v in enumerate(self.values)]
        if len(boundaries) > CAPACITY:
            raise InvalidArgumentError(
                "boundaries", f"must have at most {CAPACITY} entries", f"{len(boundaries)} entries"
            )
        check_increasing("boundaries", boundaries)
        if len(values) != len(boundaries) + 1:
            raise InvalidArgumentError(
                "values",
                f"must have len(boundaries) + 1 = {len(boundaries) + 1} entries",
                f"{len(values)} entries",
            )
        self._set("boundaries", tuple(boundaries))
        self._set("values", tuple(values))

    def derive(self, scale: float) -> Terms:
        return Terms("piecewise_constant", {}, self.boundaries, tuple(v * scale for v in self.values))


def _piecewise_linear(x: Any, c: Any, local: Any) -> Any:
    # From the last knot at or before the step, along the slope of the segment after it (0
    # before the first knot and after the last).
    index = x.sum(x.less_equal(c.steps, local))
    knot = x.maximum(index - 1, 0)
    offset = x.cast(local - x.take(c.steps, knot), "float32")
    return x.take(c.rates, knot) + x.take(c.slopes, index) * offset


@register(piecewise_linear=Form((), _piecewise_linear, _table_candidates))
@dataclass(frozen=True)
class PiecewiseLinear(Spec):
    """Linear interpolation between `(step, learning_rate)` knots; flat before the first and after
    the last. Covers linear warmup, warmup-stable-decay cooldowns and 1cycle."""

    knots: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        knots = list(self.knots)
        if not 1 <= len(knots) <= CAPACITY:
            raise InvalidArgumentError("knots", f"must have 1 to {CAPACITY} entries", f"{len(knots)} entries")
        steps = [check_step(f"knots[{i}].step", k[0], minimum=0) for i, k in enumerate(knots)]
        rates = [check_learning_rate(f"knots[{i}].learning_rate", k[1]) for i, k in enumerate(knots)]
        check_increasing("knots", steps)
        self._set("knots", tuple(zip(steps, rates)))

    def derive(self, scale: float) -> Terms:
        slopes = (0.0, *((b - a) * scale / (t - s) for (s, a), (t, b) in zip(self.knots, self.knots[1:])), 0.0)
        return Terms("piecewise_linear", {}, tuple(s for s, _ in self.knots),
                     tuple(v * scale for _, v in self.knots), slopes)
