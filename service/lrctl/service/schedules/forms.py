"""The engine's arithmetic, written once, and the learning rate computed on the host with it.

Every schedule is computed in one of a few *forms* (`FORMS`, each declared with its kind in
kinds.py): a short float32 formula over named coefficients that `derive` computes from the
spec on the host, with the scale and every constant expression (`pi / decay_steps`,
`(1 - alpha) / 2`, ...) folded in. The engine keeps the coefficients in variables and runs the
active form's function in the graph with `keras.ops`; `learning_rate` runs the same function
here with numpy float32 and no TensorFlow.
So the host agrees with the graph to float32 precision (tested), except exactly at a
CosineDecayRestarts period boundary, where a float32 log may put the step in either period.
The controller uses it to report `learning_rate_after` and to refuse a change whose learning
rate would not be finite, without touching a device: gRPC threads may call it, and a burst of
changes at one step boundary costs no engine evaluation per change.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from lrctl.service.schedules import specs
from lrctl.service.schedules.registry import (
    CAPACITY,
    FORMS,
    NUM_COEFFICIENTS,
    PAD_STEP,
    Derived,
    Form,
    HostOps,
)
from lrctl.service.schedules.specs import ActiveSchedule

__all__ = [
    "FORMS", "NUM_COEFFICIENTS", "PAD_STEP", "Derived", "Extremes", "Form", "derive", "extremes",
    "is_finite_float32", "learning_rate", "learning_rates",
]


@functools.lru_cache(maxsize=256)
def derive(state: ActiveSchedule) -> Derived:
    """The form and coefficients of `scale * spec`. Pure numpy; cached (treat as read-only)."""
    with np.errstate(over="ignore"):  # a scaled rate past float32 is inf, refused by the caller
        terms = state.spec.derive(state.scale)
    form = FORMS[terms.form]
    assert form.spec_type is type(state.spec), (terms.form, state.spec)
    assert set(terms.coefficients) == set(form.coefficients), (terms.form, sorted(terms.coefficients))
    rates = terms.rates
    return Derived(
        terms.form, {name: np.float32(terms.coefficients[name]) for name in form.coefficients},
        _padded(terms.steps, CAPACITY, PAD_STEP, np.int64),
        _padded(rates, CAPACITY + 1, rates[-1] if rates else 0.0, np.float32),
        _padded(terms.slopes, CAPACITY + 1, 0.0, np.float32),
    )


def _padded(values: tuple[float, ...], size: int, pad: float, dtype: type) -> np.ndarray:
    out: np.ndarray = np.full(size, pad, dtype)
    out[: len(values)] = values
    out.flags.writeable = False
    return out


def learning_rate(state: ActiveSchedule, step: int) -> float:
    """`scale * spec(max(step - origin_step, 0))` in float32, as the engine computes it.

    Computed as a one-step vector, by the same numpy code as `learning_rates` and `extremes`:
    on some CPUs (AVX-512) numpy's array loops for float32 power, cos and log round differently
    (by an ulp) from its scalar code, and the LR at a step must be the same whoever asks.
    """
    return float(learning_rates(state, np.array([step], np.int64))[0])


class _StepsHostOps:
    """`HostOps` for a vector of steps: in the table forms each step is compared with the
    whole table (`greater(local, steps)`, `less_equal(steps, local)`), one row per step."""

    cos, log, floor, ceil, power = np.cos, np.log, np.floor, np.ceil, np.power
    minimum, maximum, where, take = np.minimum, np.maximum, np.where, np.take
    cast = staticmethod(HostOps.cast)

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
    lie among a few candidate steps, which each form names (the range's ends, boundaries and knots, period starts
    and ends, the end of a warmup, each with its neighbours); the host formula is evaluated
    there, in float32 as the engine computes. No sampling: a one-step spike is found.
    It runs on every submit and at every boundary, on a few candidates: one vectorized
    evaluation, the rest in plain Python (a numpy call on a few elements costs more than
    its arithmetic).
    """
    if end < start:
        raise ValueError(f"end ({end}) < start ({start})")
    origin = state.origin_step
    a, b = max(start - origin, 0), max(end - origin, 0)  # the local steps the range covers
    derived = derive(state)
    form = FORMS[derived.form]
    candidates = form.candidates(derived, a, b)
    listed = candidates.tolist() if isinstance(candidates, np.ndarray) else candidates
    local = sorted({min(max(int(x), a), b) for x in listed})  # ascending: the lowest step wins a tie
    with np.errstate(all="ignore"):
        lrs = np.asarray(form.compute(_StepsHostOps, derived.tables(), np.asarray(local, np.int64)), np.float32)
    values = np.broadcast_to(lrs, (len(local),)).tolist()  # float32 to float: exact
    # Each local step in [a, b] stands for the step min(max(local + origin, start), end) (local
    # 0 covers every step up to the origin).
    steps = [min(max(x + origin, start), end) for x in local]
    for i, lr in enumerate(values):
        if not math.isfinite(lr):  # float32: beyond FLOAT32_MAX is inf
            return Extremes(steps[i], lr, steps[i], lr)
    lo = min(range(len(values)), key=values.__getitem__)
    hi = max(range(len(values)), key=values.__getitem__)
    return Extremes(steps[lo], values[lo], steps[hi], values[hi])


def is_finite_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= specs.FLOAT32_MAX
