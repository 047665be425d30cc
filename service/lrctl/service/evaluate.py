"""The engine's arithmetic, written once, and the learning rate computed on the host with it.

Every schedule is computed in one of a few *forms* (`FORMS`): a short float32 formula over
named coefficients that `derive` computes from the spec on the host, with the scale and every
constant expression (`pi / decay_steps`, `(1 - alpha) / 2`, ...) folded in. The engine keeps
the coefficients in variables and runs the active form's function in the graph with
`keras.ops`; `learning_rate` runs the same function here with numpy float32 and no TensorFlow.
So the host agrees with the graph to float32 precision (tested), except exactly at a
CosineDecayRestarts period boundary, where a float32 log may put the step in either period.
The controller uses it to report `learning_rate_after` and to refuse a change whose learning
rate would not be finite, without touching a device: gRPC threads may call it, and a burst of
changes at one step boundary costs no engine evaluation per change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from lrctl.service import specs
from lrctl.service.specs import CAPACITY, ActiveSchedule

#: Most coefficients a form has.
NUM_COEFFICIENTS = 8
#: Padding of the step table: `step > pad` and `pad <= step` are never true.
PAD_STEP = np.iinfo(np.int64).max
_PI = np.float32(math.pi)

# -- the forms: `x` is keras.ops in the graph, `_HostOps` here; `c` holds the form's named
# -- coefficients and the tables (`steps`, `rates`, `slopes`); `local` is the int64 step.


def _constant(x: Any, c: Any, local: Any) -> Any:
    return c.rate


def _exponential(x: Any, c: Any, local: Any) -> Any:
    return c.initial * x.power(c.decay_rate, x.cast(local, "float32") / c.decay_steps)


def _exponential_staircase(x: Any, c: Any, local: Any) -> Any:
    return c.initial * x.power(c.decay_rate, x.floor(x.cast(local, "float32") / c.decay_steps))


def _inverse_time(x: Any, c: Any, local: Any) -> Any:
    return c.initial / (1.0 + c.decay_rate * (x.cast(local, "float32") / c.decay_steps))


def _inverse_time_staircase(x: Any, c: Any, local: Any) -> Any:
    return c.initial / (1.0 + c.decay_rate * x.floor(x.cast(local, "float32") / c.decay_steps))


def _polynomial(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.decay_steps)
    return c.span * x.power(1.0 - s / c.decay_steps, c.power) + c.end


def _polynomial_cycle(x: Any, c: Any, local: Any) -> Any:
    # The first multiple of decay_steps at or after the step (decay_steps itself at step 0).
    s = x.cast(local, "float32")
    steps = c.decay_steps * x.maximum(x.ceil(s / c.decay_steps), 1.0)
    return c.span * x.power(1.0 - s / steps, c.power) + c.end


def _cosine(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.decay_steps)
    return c.mid + c.half_range * x.cos(c.pi_over_decay_steps * s)


def _cosine_warmup(x: Any, c: Any, local: Any) -> Any:
    s = x.minimum(x.cast(local, "float32"), c.end)
    warmup = c.initial + c.warmup_slope * s
    return x.where(s < c.warmup_steps, warmup,
                   c.mid + c.half_range * x.cos(c.pi_over_decay_steps * (s - c.warmup_steps)))


def _cosine_restarts(x: Any, c: Any, local: Any) -> Any:
    # Keras's own operations for the period, so that a step near a period boundary falls in
    # the same period as with Keras.
    fraction = x.cast(local, "float32") / c.first_decay_steps
    period = x.floor(x.log(1.0 - fraction * c.one_minus_t_mul) / x.log(c.t_mul))
    t_mul_power = x.power(c.t_mul, period)
    within = (fraction - (1.0 - t_mul_power) / c.one_minus_t_mul) / t_mul_power
    return c.floor + c.half_range * x.power(c.m_mul, period) * (1.0 + x.cos(_PI * within))


def _cosine_restarts_linear(x: Any, c: Any, local: Any) -> Any:  # t_mul == 1
    fraction = x.cast(local, "float32") / c.first_decay_steps
    period = x.floor(fraction)
    return c.floor + c.half_range * x.power(c.m_mul, period) * (1.0 + x.cos(_PI * (fraction - period)))


def _piecewise_constant(x: Any, c: Any, local: Any) -> Any:
    # rates[i] for boundaries[i-1] < step <= boundaries[i]; padding never counts.
    return x.take(c.rates, x.sum(x.greater(local, c.steps)))


def _piecewise_linear(x: Any, c: Any, local: Any) -> Any:
    # From the last knot at or before the step, along the slope of the segment after it (0
    # before the first knot and after the last).
    index = x.sum(x.less_equal(c.steps, local))
    knot = x.maximum(index - 1, 0)
    offset = x.cast(local - x.take(c.steps, knot), "float32")
    return x.take(c.rates, knot) + x.take(c.slopes, index) * offset


@dataclass(frozen=True)
class Form:
    """One way the engine computes a learning rate: one branch of its switch."""

    spec_type: type[specs.ScheduleSpec]
    #: The coefficients' names, in the order the engine stores them.
    coefficients: tuple[str, ...]
    #: `compute(x, c, local)`: the learning rate at the (int64, >= 0) local step.
    compute: Callable[[Any, Any, Any], Any]


_DECAY = ("initial", "decay_steps", "decay_rate")
_POLYNOMIAL = ("span", "end", "decay_steps", "power")
_COSINE = ("mid", "half_range", "decay_steps", "pi_over_decay_steps")
_RESTARTS = ("floor", "half_range", "first_decay_steps", "t_mul", "one_minus_t_mul", "m_mul")

#: Every form, by name; the engine's `kind` variable holds the index of one in this order.
FORMS: dict[str, Form] = {
    "constant": Form(specs.Constant, ("rate",), _constant),
    "exponential": Form(specs.ExponentialDecay, _DECAY, _exponential),
    "exponential_staircase": Form(specs.ExponentialDecay, _DECAY, _exponential_staircase),
    "inverse_time": Form(specs.InverseTimeDecay, _DECAY, _inverse_time),
    "inverse_time_staircase": Form(specs.InverseTimeDecay, _DECAY, _inverse_time_staircase),
    "polynomial": Form(specs.PolynomialDecay, _POLYNOMIAL, _polynomial),
    "polynomial_cycle": Form(specs.PolynomialDecay, _POLYNOMIAL, _polynomial_cycle),
    "cosine": Form(specs.CosineDecay, _COSINE, _cosine),
    "cosine_warmup": Form(specs.CosineDecay, ("initial", "warmup_slope", "warmup_steps", "end", *_COSINE),
                          _cosine_warmup),
    "cosine_restarts": Form(specs.CosineDecayRestarts, _RESTARTS, _cosine_restarts),
    "cosine_restarts_linear": Form(specs.CosineDecayRestarts, _RESTARTS, _cosine_restarts_linear),
    "piecewise_constant": Form(specs.PiecewiseConstantDecay, (), _piecewise_constant),
    "piecewise_linear": Form(specs.PiecewiseLinear, (), _piecewise_linear),
}
assert all(len(form.coefficients) <= NUM_COEFFICIENTS for form in FORMS.values())


@dataclass(frozen=True)
class Derived:
    """What the engine computes a schedule from: its form and float32 coefficients, and the
    tables of the knot kinds (padded to CAPACITY; unused otherwise)."""

    form: str
    coefficients: dict[str, np.float32]
    steps: np.ndarray  # int64[CAPACITY]: boundaries or knot steps, then PAD_STEP
    rates: np.ndarray  # float32[CAPACITY + 1]: values or knot learning rates, then the last
    slopes: np.ndarray  # float32[CAPACITY + 1]: per step after knot i - 1 (PiecewiseLinear)

    def tables(self) -> SimpleNamespace:
        """The `c` argument of the form's function, on the host."""
        return SimpleNamespace(**self.coefficients, steps=self.steps, rates=self.rates, slopes=self.slopes)


@functools.lru_cache(maxsize=256)
def derive(state: ActiveSchedule) -> Derived:
    """The form and coefficients of `scale * spec`. Pure numpy; cached (treat as read-only)."""
    with np.errstate(over="ignore"):  # a scaled rate past float32 is inf, refused by the caller
        return _derive(state.spec, state.scale)


def _derive(spec: specs.ScheduleSpec, k: float) -> Derived:
    steps: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    slopes: tuple[float, ...] = ()
    match spec:
        case specs.Constant():
            form, c = "constant", {"rate": spec.learning_rate * k}
        case specs.ExponentialDecay() | specs.InverseTimeDecay():
            kind = "exponential" if isinstance(spec, specs.ExponentialDecay) else "inverse_time"
            form = f"{kind}_staircase" if spec.staircase else kind
            c = {"initial": spec.initial_learning_rate * k, "decay_steps": spec.decay_steps,
                 "decay_rate": spec.decay_rate}
        case specs.PolynomialDecay():
            form = "polynomial_cycle" if spec.cycle else "polynomial"
            c = {"span": (spec.initial_learning_rate - spec.end_learning_rate) * k,
                 "end": spec.end_learning_rate * k, "decay_steps": spec.decay_steps, "power": spec.power}
        case specs.CosineDecay():
            # Keras decays from warmup_target after a warmup, from the initial LR without one
            # (it ignores warmup_steps without a warmup_target).
            peak = spec.initial_learning_rate if spec.warmup_target is None else spec.warmup_target
            c = {"mid": peak * k * (1.0 + spec.alpha) / 2, "half_range": peak * k * (1.0 - spec.alpha) / 2,
                 "decay_steps": spec.decay_steps, "pi_over_decay_steps": math.pi / spec.decay_steps}
            form = "cosine"
            if spec.warmup_target is not None and spec.warmup_steps > 0:
                form = "cosine_warmup"
                c |= {"initial": spec.initial_learning_rate * k, "warmup_steps": spec.warmup_steps,
                      "warmup_slope": (spec.warmup_target - spec.initial_learning_rate) * k / spec.warmup_steps,
                      "end": spec.warmup_steps + spec.decay_steps}
        case specs.CosineDecayRestarts():
            form = "cosine_restarts_linear" if spec.t_mul == 1.0 else "cosine_restarts"
            c = {"floor": spec.initial_learning_rate * k * spec.alpha,
                 "half_range": spec.initial_learning_rate * k * (1.0 - spec.alpha) / 2,
                 "first_decay_steps": spec.first_decay_steps, "t_mul": spec.t_mul, "m_mul": spec.m_mul,
                 # In float32 arithmetic, as Keras computes it.
                 "one_minus_t_mul": float(np.float32(1.0) - np.float32(spec.t_mul))}
        case specs.PiecewiseConstantDecay():
            form, c = "piecewise_constant", {}
            steps, rates = spec.boundaries, tuple(v * k for v in spec.values)
        case specs.PiecewiseLinear():
            form, c = "piecewise_linear", {}
            steps, rates = tuple(s for s, _ in spec.knots), tuple(v * k for _, v in spec.knots)
            slopes = (0.0, *((b - a) * k / (t - s) for (s, a), (t, b) in zip(spec.knots, spec.knots[1:])), 0.0)
    names = FORMS[form].coefficients
    assert set(c) == set(names), (form, sorted(c))
    return Derived(
        form, {name: np.float32(c[name]) for name in names},
        _padded(steps, CAPACITY, PAD_STEP, np.int64),
        _padded(rates, CAPACITY + 1, rates[-1] if rates else 0.0, np.float32),
        _padded(slopes, CAPACITY + 1, 0.0, np.float32),
    )


def _padded(values: tuple[float, ...], size: int, pad: float, dtype: type) -> np.ndarray:
    out: np.ndarray = np.full(size, pad, dtype)
    out[: len(values)] = values
    out.flags.writeable = False
    return out


class _HostOps:
    """The operations the forms use, in numpy, under the names keras.ops gives them."""

    cos, log, floor, ceil, power = np.cos, np.log, np.floor, np.ceil, np.power
    minimum, maximum, where, take, sum = np.minimum, np.maximum, np.where, np.take, np.sum
    greater, less_equal = np.greater, np.less_equal

    @staticmethod
    def cast(value: Any, dtype: str) -> Any:
        return np.asarray(value).astype(dtype)[()]


def learning_rate(state: ActiveSchedule, step: int) -> float:
    """`scale * spec(max(step - origin_step, 0))` in float32, as the engine computes it."""
    derived = derive(state)
    local = np.int64(max(step - state.origin_step, 0))
    with np.errstate(all="ignore"):  # overflow to inf is reported by the caller, not warned
        return float(FORMS[derived.form].compute(_HostOps, derived.tables(), local))


def is_finite_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= specs.FLOAT32_MAX
