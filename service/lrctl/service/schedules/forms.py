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
from typing import Any, NamedTuple

import numpy as np

from lrctl.service.schedules import specs
from lrctl.service.schedules.specs import CAPACITY, ActiveSchedule

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


class _StepsHostOps:
    """`_HostOps` for a vector of steps: in the table forms each step is compared with the
    whole table (`greater(local, steps)`, `less_equal(steps, local)`), one row per step."""

    cos, log, floor, ceil, power = np.cos, np.log, np.floor, np.ceil, np.power
    minimum, maximum, where, take = np.minimum, np.maximum, np.where, np.take
    cast = staticmethod(_HostOps.cast)

    @staticmethod
    def greater(local: Any, steps: Any) -> Any:
        return np.greater(np.expand_dims(local, -1), steps)

    @staticmethod
    def less_equal(steps: Any, local: Any) -> Any:
        return np.less_equal(steps, np.expand_dims(local, -1))

    @staticmethod
    def sum(value: Any) -> Any:
        return np.sum(value, axis=-1)


def learning_rates(state: ActiveSchedule, steps: np.ndarray) -> np.ndarray:
    """`learning_rate` at each of a vector of `steps` (int64), in float32."""
    derived = derive(state)
    form = FORMS[derived.form]
    local = np.maximum(np.asarray(steps, np.int64).ravel() - state.origin_step, 0)
    c = derived.tables()
    with np.errstate(all="ignore"):
        return np.broadcast_to(np.asarray(form.compute(_StepsHostOps, c, local), np.float32), local.shape)


class Extremes(NamedTuple):
    """The smallest and largest learning rate over a range of steps, and a step giving each.
    A non-finite learning rate anywhere is reported as both (NaN compares false: it fails any
    bounds check)."""

    min_step: int
    min_lr: float
    max_step: int
    max_lr: float


def extremes(state: ActiveSchedule, start: int, end: int) -> Extremes:
    """The exact extremes of `state`'s learning rate over every step in [start, end].

    Each form is monotone, or piecewise monotone with known turning points, so the extremes
    lie among a few candidate steps (the range's ends, boundaries and knots, period starts
    and ends, the end of a warmup, each with its neighbours); the host formula is evaluated
    there, in float32 as the engine computes. No sampling: a one-step spike is found.
    """
    if end < start:
        raise ValueError(f"end ({end}) < start ({start})")
    origin = state.origin_step
    a, b = max(start - origin, 0), max(end - origin, 0)  # the local steps the range covers
    local = np.unique(np.clip(_candidates(derive(state), a, b), a, b))
    steps = np.clip(local + origin, start, end)  # local 0 covers every step up to the origin
    lrs = learning_rates(state, steps)
    bad = ~np.isfinite(lrs) | (np.abs(lrs) > specs.FLOAT32_MAX)
    if bad.any():
        i = int(np.argmax(bad))
        return Extremes(int(steps[i]), float(lrs[i]), int(steps[i]), float(lrs[i]))
    lo, hi = int(np.argmin(lrs)), int(np.argmax(lrs))
    return Extremes(int(steps[lo]), float(lrs[lo]), int(steps[hi]), float(lrs[hi]))


def _candidates(derived: Derived, a: int, b: int) -> np.ndarray:
    """Local steps in [a, b] (clipped by the caller) among which the extremes lie."""
    c = derived.coefficients
    ends = [a, b]
    match derived.form:
        case "constant" | "exponential" | "exponential_staircase" | "inverse_time" \
                | "inverse_time_staircase" | "polynomial" | "cosine":
            return np.array(ends, np.int64)  # monotone in the step (flat past decay_steps)
        case "cosine_warmup":  # linear up (or down) to the peak at warmup_steps, then cosine down
            w = int(c["warmup_steps"])
            return np.array([*ends, w - 1, w], np.int64)
        case "polynomial_cycle":
            # Monotone within each cycle ((k-1)D, kD]; cycle k's first value moves monotonically
            # with k and every cycle ends at `end`: the first cycle end and start in range count.
            d = int(c["decay_steps"])
            k = max(-(-a // d), 1)  # the first cycle end at or after a (cycle 1 holds step 0)
            return np.array([*ends, k * d - 1, k * d, k * d + 1], np.int64)
        case "cosine_restarts_linear" | "cosine_restarts":
            # Each period peaks at its start and falls to its end. With t_mul == 1 every period
            # is alike, scaled by m_mul**k (monotone in k): the first and last period starts in
            # range hold the extremes. With t_mul > 1 periods differ in length: all of them.
            linear = derived.form == "cosine_restarts_linear"
            tables = derived.tables()

            def period(steps: np.ndarray) -> np.ndarray:
                with np.errstate(all="ignore"):
                    fn = _restarts_linear_period if linear else _restarts_period
                    return np.asarray(fn(_HostOps, tables, steps)[1], np.float64)

            first, last = period(np.array([a, b], np.int64))
            wanted = np.array([first + 1, last]) if linear else np.arange(first + 1, last + 1)
            starts = _first_steps(period, wanted, a, b)
            return np.concatenate([ends, starts - 1, starts])
        case "piecewise_constant" | "piecewise_linear":
            # Constant between boundaries (values change after one); linear between knots.
            knots = derived.steps[(derived.steps >= a) & (derived.steps <= b)]
            return np.concatenate([ends, knots, knots + 1])
    raise AssertionError(derived.form)


def _first_steps(period: Callable[[np.ndarray], np.ndarray], wanted: np.ndarray, a: int, b: int) -> np.ndarray:
    """For each period index in `wanted`, the first step in [a, b] (b + 1: none) whose period,
    as the float32 formula computes it (non-decreasing in the step), is at least that index:
    a bisection on the formula itself, so float32 rounding cannot move a boundary unseen."""
    lo = np.full(wanted.shape, a, np.int64)
    hi = np.full(wanted.shape, b + 1, np.int64)
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        reached = period(mid) >= wanted
        hi = np.where(open_ & reached, mid, hi)
        lo = np.where(open_ & ~reached, mid + 1, lo)
    return lo


def is_finite_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= specs.FLOAT32_MAX
