"""The learning rate of a schedule at a step, computed on the host with no TensorFlow.

It mirrors `engine.ControllableSchedule.__call__` operation for operation in float32, so it
agrees with the graph to float32 precision (tested), except exactly at a CosineDecayRestarts
period boundary, where a float32 log may put the step in either period. The controller uses it to report
`learning_rate_after` and to refuse a change whose learning rate would not be finite,
without touching a device: gRPC threads may call it, and a burst of changes at one step
boundary costs no engine evaluation per change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lrctl.service import specs
from lrctl.service.specs import ActiveSchedule

_f32 = np.float32
_PI = _f32(math.pi)


def learning_rate(state: ActiveSchedule, step: int) -> float:
    """`scale * spec(max(step - origin_step, 0))` in float32, as the engine computes it."""
    local = max(step - state.origin_step, 0)
    with np.errstate(all="ignore"):  # overflow to inf is reported by the caller, not warned
        value = _KINDS[type(state.spec)](state.spec, local) * _f32(state.scale)
    return float(value)


def is_finite_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= specs.FLOAT32_MAX


def _constant(spec: Any, local: int) -> Any:
    return _f32(spec.learning_rate)


def _exponent(spec: Any, local: int) -> Any:
    q = _f32(local) / _f32(spec.decay_steps)
    return np.floor(q) if spec.staircase else q


def _exponential(spec: specs.ExponentialDecay, local: int) -> Any:
    return _f32(spec.initial_learning_rate) * np.power(_f32(spec.decay_rate), _exponent(spec, local))


def _inverse_time(spec: specs.InverseTimeDecay, local: int) -> Any:
    return _f32(spec.initial_learning_rate) / (_f32(1.0) + _f32(spec.decay_rate) * _exponent(spec, local))


def _polynomial(spec: specs.PolynomialDecay, local: int) -> Any:
    init, end, power = _f32(spec.initial_learning_rate), _f32(spec.end_learning_rate), _f32(spec.power)
    decay_steps, s = _f32(spec.decay_steps), _f32(local)
    if spec.cycle:
        steps = decay_steps * (_f32(1.0) if s == 0 else np.ceil(s / decay_steps))
    else:
        steps, s = decay_steps, min(s, decay_steps)
    return (init - end) * np.power(_f32(1.0) - s / steps, power) + end


def _cosine(spec: specs.CosineDecay, local: int) -> Any:
    init, decay_steps, alpha = _f32(spec.initial_learning_rate), _f32(spec.decay_steps), _f32(spec.alpha)
    warm = spec.warmup_target is not None
    target = _f32(spec.warmup_target) if spec.warmup_target is not None else init
    warmup_steps = _f32(spec.warmup_steps if warm else 0)
    s = min(_f32(local), decay_steps + warmup_steps)
    if s < warmup_steps:
        return (target - init) * (s / warmup_steps) + init
    cosine = _f32(0.5) * (_f32(1.0) + np.cos(_PI * ((s - warmup_steps) / decay_steps)))
    return target * ((_f32(1.0) - alpha) * cosine + alpha)


def _cosine_restarts(spec: specs.CosineDecayRestarts, local: int) -> Any:
    init, t_mul, m_mul = _f32(spec.initial_learning_rate), _f32(spec.t_mul), _f32(spec.m_mul)
    alpha, one = _f32(spec.alpha), _f32(1.0)
    fraction = _f32(local) / _f32(spec.first_decay_steps)
    if t_mul == one:
        i_restart = np.floor(fraction)
        f_restart = fraction - np.floor(fraction)
    else:
        i_restart = np.floor(np.log(one - fraction * (one - t_mul)) / np.log(t_mul))
        sum_r = (one - np.power(t_mul, i_restart)) / (one - t_mul)
        f_restart = (fraction - sum_r) / np.power(t_mul, i_restart)
    cosine = _f32(0.5) * np.power(m_mul, i_restart) * (one + np.cos(_PI * f_restart))
    return init * ((one - alpha) * cosine + alpha)


def _piecewise_constant(spec: specs.PiecewiseConstantDecay, local: int) -> Any:
    index = sum(1 for boundary in spec.boundaries if local > boundary)
    return _f32(spec.values[index])


def _piecewise_linear(spec: specs.PiecewiseLinear, local: int) -> Any:
    at_or_before = sum(1 for step, _ in spec.knots if step <= local)
    lo, hi = max(at_or_before - 1, 0), min(at_or_before, len(spec.knots) - 1)
    (t_lo, v_lo), (t_hi, v_hi) = spec.knots[lo], spec.knots[hi]
    span = _f32(max(t_hi - t_lo, 1))
    frac = np.clip(_f32(local - t_lo) / span, _f32(0.0), _f32(1.0))
    return _f32(v_lo) + (_f32(v_hi) - _f32(v_lo)) * frac


_KINDS: dict[type, Callable[[Any, int], Any]] = {
    specs.Constant: _constant,
    specs.ExponentialDecay: _exponential,
    specs.PiecewiseConstantDecay: _piecewise_constant,
    specs.PolynomialDecay: _polynomial,
    specs.InverseTimeDecay: _inverse_time,
    specs.CosineDecay: _cosine,
    specs.CosineDecayRestarts: _cosine_restarts,
    specs.PiecewiseLinear: _piecewise_linear,
}
