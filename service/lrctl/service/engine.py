"""The schedule engine: a Keras `LearningRateSchedule` whose every parameter is a variable.

The compiled train step reads these variables each step, so swapping the schedule, pinning
or scaling the LR is a handful of variable assignments: no retrace, under `jit_compile`,
`steps_per_execution` and `tf.distribute` alike. The LR is computed with `keras.ops`,
branch-free: every kind is evaluated from the same few scalars and the active one is
picked with a gather, so there is no data-dependent control flow for XLA or replicas.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from lrctl.service import specs
from lrctl.service.specs import CAPACITY, ActiveSchedule, Origin, ScheduleSpec

_NUM_PARAMS = 8
_PAD_STEP = np.iinfo(np.int64).max  # padding: `step > pad` and `pad <= step` are never true
_KIND_ID = {t: i for i, t in enumerate(specs.SPEC_TYPES)}


class _Encoded:
    """A spec laid out in the engine's fixed-size arrays (host side, numpy)."""

    def __init__(self, spec: ScheduleSpec) -> None:
        self.kind = _KIND_ID[type(spec)]
        self.params = np.zeros(_NUM_PARAMS, np.float64)
        self.steps = np.full(CAPACITY, _PAD_STEP, np.int64)
        self.values = np.zeros(CAPACITY + 1, np.float64)
        points: tuple[tuple[int, ...], tuple[float, ...]] = ((), ())
        match spec:
            case specs.Constant():
                self._set(spec.learning_rate)
            case specs.ExponentialDecay() | specs.InverseTimeDecay():
                self._set(spec.initial_learning_rate, spec.decay_steps, spec.decay_rate, spec.staircase)
            case specs.PolynomialDecay():
                self._set(spec.initial_learning_rate, spec.decay_steps, spec.end_learning_rate,
                          spec.power, spec.cycle)
            case specs.CosineDecay():
                has_warmup = spec.warmup_target is not None
                # Without warmup Keras decays from the initial LR; target=initial, 0 warmup steps
                # is the same function, so one formula serves both.
                target = spec.warmup_target if spec.warmup_target is not None else spec.initial_learning_rate
                self._set(spec.initial_learning_rate, spec.decay_steps, spec.alpha, target,
                          spec.warmup_steps if has_warmup else 0, has_warmup)
            case specs.CosineDecayRestarts():
                self._set(spec.initial_learning_rate, spec.first_decay_steps, spec.t_mul, spec.m_mul,
                          spec.alpha)
            case specs.PiecewiseConstantDecay():
                points = (spec.boundaries, spec.values)
            case specs.PiecewiseLinear():
                points = (tuple(s for s, _ in spec.knots), tuple(v for _, v in spec.knots))
        steps, values = points
        self.count = len(steps)
        self.steps[: len(steps)] = steps
        if values:
            self.values[: len(values)] = values
            self.values[len(values):] = values[-1]

    def _set(self, *params: float) -> None:
        self.params[: len(params)] = params


def _decode(kind: int, params: np.ndarray, steps: np.ndarray, values: np.ndarray, count: int) -> ScheduleSpec:
    spec_type = specs.SPEC_TYPES[kind]
    p = [float(x) for x in params]
    step = [round(x) for x in p]  # integral params are stored exactly in float64
    if spec_type is specs.Constant:
        return specs.Constant(p[0])
    if spec_type in (specs.ExponentialDecay, specs.InverseTimeDecay):
        return spec_type(p[0], step[1], p[2], bool(p[3]))  # type: ignore[call-arg]
    if spec_type is specs.PolynomialDecay:
        return specs.PolynomialDecay(p[0], step[1], p[2], p[3], bool(p[4]))
    if spec_type is specs.CosineDecay:
        warm = bool(p[5])
        return specs.CosineDecay(p[0], step[1], p[2], p[3] if warm else None, step[4] if warm else 0)
    if spec_type is specs.CosineDecayRestarts:
        return specs.CosineDecayRestarts(p[0], step[1], p[2], p[3], p[4])
    if spec_type is specs.PiecewiseConstantDecay:
        return specs.PiecewiseConstantDecay(
            tuple(int(s) for s in steps[:count]), tuple(float(v) for v in values[: count + 1])
        )
    return specs.PiecewiseLinear(tuple((int(s), float(v)) for s, v in zip(steps[:count], values[:count])))


@keras.saving.register_keras_serializable(package="lrctl")
class ControllableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule that can be replaced while the train step stays compiled.

    `lr(step) = scale * spec(max(step - origin_step, 0))`, where `spec` is any Keras built-in
    schedule or `PiecewiseLinear`. Step arithmetic is int64 and the local step is cast to
    float32 only after subtracting the origin, so a schedule restarted at step 20,000,000 is
    exact (Keras casts the global step, which is exact only up to 2**24).

    Only the training thread may call `load` (between steps); the controller makes sure of it.

    Example:
        >>> schedule = ControllableSchedule(keras.optimizers.schedules.ExponentialDecay(0.001, 10, 0.96))
        >>> optimizer = keras.optimizers.Adam(learning_rate=schedule)
    """

    def __init__(self, initial: object = 0.001, *, name: str = "lrctl") -> None:
        super().__init__()
        self.name = name
        state = initial if isinstance(initial, ActiveSchedule) else ActiveSchedule(specs.as_spec(initial))
        enc = _Encoded(state.spec)

        def variable(value: object, dtype: str, suffix: str) -> keras.Variable:
            # Non-trainable and assigned only in cross-replica context (between steps), so
            # every replica reads the same value at the same step.
            return keras.Variable(
                value, dtype=dtype, trainable=False, name=f"{name}_{suffix}",
                aggregation="only_first_replica",
            )

        self._kind = variable(enc.kind, "int32", "kind")
        self._origin_step = variable(state.origin_step, "int64", "origin_step")
        self._scale = variable(state.scale, "float64", "scale")
        self._params = variable(enc.params, "float64", "params")
        self._steps = variable(enc.steps, "int64", "steps")
        self._values = variable(enc.values, "float64", "values")
        self._count = variable(enc.count, "int32", "count")
        self._version = variable(0, "int64", "version")
        # The origin kind is not needed to compute the LR, only to report it; keep it as a flag.
        self._restart = variable(state.origin is Origin.RESTART, "bool", "restart")

    @property
    def variables(self) -> list[keras.Variable]:
        """Everything a checkpoint must hold to resume with the same learning rate."""
        return [self._kind, self._origin_step, self._scale, self._params, self._steps,
                self._values, self._count, self._version, self._restart]

    # -- training thread only -------------------------------------------------------------
    def load(self, state: ActiveSchedule, version: int) -> None:
        """Make `state` the schedule of every following step. Call between steps only."""
        enc = _Encoded(state.spec)
        self._kind.assign(enc.kind)
        self._origin_step.assign(state.origin_step)
        self._scale.assign(state.scale)
        self._params.assign(enc.params)
        self._steps.assign(enc.steps)
        self._values.assign(enc.values)
        self._count.assign(enc.count)
        self._version.assign(version)
        self._restart.assign(state.origin is Origin.RESTART)

    def read(self) -> tuple[ActiveSchedule, int]:
        """Decode the variables (e.g. after a checkpoint restore) into the active schedule."""
        spec = _decode(
            int(self._kind.numpy()), np.asarray(self._params.numpy()), np.asarray(self._steps.numpy()),
            np.asarray(self._values.numpy()), int(self._count.numpy()),
        )
        origin = Origin.RESTART if bool(self._restart.numpy()) else Origin.GLOBAL
        state = ActiveSchedule(spec, origin, int(self._origin_step.numpy()), float(self._scale.numpy()))
        return state, int(self._version.numpy())

    # -- in the graph ---------------------------------------------------------------------
    def __call__(self, step: Any) -> Any:
        local = ops.maximum(ops.cast(step, "int64") - self._origin_step, 0)
        s = ops.cast(local, "float32")
        p0, p1, p2, p3, p4, _, _, _ = ops.unstack(ops.cast(self._params, "float32"), _NUM_PARAMS)
        one = ops.cast(1.0, "float32")
        pi = ops.cast(math.pi, "float32")

        # ExponentialDecay and InverseTimeDecay: (initial, decay_steps, decay_rate, staircase).
        q = s / p1
        q = ops.where(p3 > 0.5, ops.floor(q), q)
        exponential = p0 * ops.power(p2, q)
        inverse_time = p0 / (one + p2 * q)

        # PolynomialDecay: (initial, decay_steps, end, power, cycle).
        cycle = p4 > 0.5
        cycled_steps = p1 * ops.where(ops.equal(s, 0.0), one, ops.ceil(s / p1))
        poly_steps = ops.where(cycle, cycled_steps, p1)
        poly_s = ops.where(cycle, s, ops.minimum(s, p1))
        polynomial = (p0 - p2) * ops.power(one - poly_s / poly_steps, p3) + p2

        # CosineDecay: (initial, decay_steps, alpha, warmup_target, warmup_steps).
        cs = ops.minimum(s, p1 + p4)
        warmup = (p3 - p0) * (cs / p4) + p0
        decayed = (one - p2) * (0.5 * (one + ops.cos(pi * ((cs - p4) / p1)))) + p2
        cosine = ops.where(cs < p4, warmup, p3 * decayed)

        # CosineDecayRestarts: (initial, first_decay_steps, t_mul, m_mul, alpha).
        fraction = s / p1
        i_geometric = ops.floor(ops.log(one - fraction * (one - p2)) / ops.log(p2))
        sum_r = (one - ops.power(p2, i_geometric)) / (one - p2)
        f_geometric = (fraction - sum_r) / ops.power(p2, i_geometric)
        i_linear = ops.floor(fraction)
        linear = ops.equal(p2, 1.0)
        i_restart = ops.where(linear, i_linear, i_geometric)
        f_restart = ops.where(linear, fraction - i_linear, f_geometric)
        restart_peak = 0.5 * ops.power(p3, i_restart) * (one + ops.cos(pi * f_restart))
        restarts = p0 * ((one - p4) * restart_peak + p4)

        # PiecewiseConstantDecay: values[i] for boundaries[i-1] < step <= boundaries[i].
        values = ops.cast(self._values, "float32")
        piecewise_constant = ops.take(values, ops.sum(ops.cast(local > self._steps, "int32")))

        # PiecewiseLinear: interpolate between the knots around the step; flat outside.
        at_or_before = ops.sum(ops.cast(self._steps <= local, "int32"))
        lo = ops.maximum(at_or_before - 1, 0)
        hi = ops.minimum(at_or_before, self._count - 1)
        t_lo, t_hi = ops.take(self._steps, lo), ops.take(self._steps, hi)
        v_lo, v_hi = ops.take(values, lo), ops.take(values, hi)
        span = ops.cast(ops.maximum(t_hi - t_lo, 1), "float32")
        frac = ops.clip(ops.cast(local - t_lo, "float32") / span, 0.0, 1.0)
        piecewise_linear = v_lo + (v_hi - v_lo) * frac

        # Same order as specs.SPEC_TYPES. Values of inactive kinds may be NaN; take() drops them.
        candidates = ops.stack([
            p0, exponential, piecewise_constant, polynomial, inverse_time, cosine, restarts,
            piecewise_linear,
        ])
        return ops.take(candidates, self._kind) * ops.cast(self._scale, "float32")

    def get_config(self) -> dict[str, Any]:
        state, _ = self.read()
        return {"name": self.name, "schedule": {"class_name": state.spec.keras_name,
                                                "config": state.spec.to_config()}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ControllableSchedule:
        return cls(config["schedule"], name=config.get("name", "lrctl"))
