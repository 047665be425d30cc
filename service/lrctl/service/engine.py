"""The schedule engine: a Keras `LearningRateSchedule` whose every parameter is a variable.

The compiled train step reads these variables each step, so swapping the schedule, pinning
or scaling the LR is a handful of variable assignments: no retrace, under `jit_compile`,
`steps_per_execution` and `tf.distribute` alike. The LR is computed with `keras.ops`,
branch-free: every kind is evaluated from the same few scalars and the active one is
picked with a gather, so there is no data-dependent control flow for XLA or replicas.
"""

from __future__ import annotations

import math
import weakref
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
                # Keras ignores warmup_steps without a warmup_target; the last slot keeps it only
                # so that reading the variables back gives the spec that was loaded.
                target = spec.warmup_target if spec.warmup_target is not None else spec.initial_learning_rate
                self._set(spec.initial_learning_rate, spec.decay_steps, spec.alpha, target,
                          spec.warmup_steps if has_warmup else 0, has_warmup, spec.warmup_steps)
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
        return specs.CosineDecay(p[0], step[1], p[2], p[3] if warm else None, step[6])
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
        """Make `state` the schedule of every following step. Call between steps only.

        All or nothing: every value is converted first (a value that does not fit raises
        here), and if an assignment fails the previous values are put back, so no step ever
        sees half of one schedule and half of another.
        """
        enc = _Encoded(state.spec)
        new = [np.asarray(enc.kind, np.int32), np.asarray(state.origin_step, np.int64),
               np.asarray(state.scale, np.float64), enc.params, enc.steps, enc.values,
               np.asarray(enc.count, np.int32), np.asarray(version, np.int64),
               np.asarray(state.origin is Origin.RESTART)]
        old = [variable.numpy() for variable in self.variables]
        try:
            for variable, value in zip(self.variables, new, strict=True):
                variable.assign(value)
        except Exception:
            for variable, value in zip(self.variables, old, strict=True):
                variable.assign(value)
            raise

    def version(self) -> int:
        """The version variable alone: a cheap way to notice a checkpoint restore."""
        return int(self._version.numpy())

    def set_version(self, version: int) -> None:
        self._version.assign(version)

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
        kinds = [self._constant, self._exponential, self._piecewise_constant, self._polynomial,
                 self._inverse_time, self._cosine, self._cosine_restarts, self._piecewise_linear]
        # Only the active kind's few ops run: a switch on a variable, so still no retrace.
        return ops.switch(self._kind, kinds, local) * ops.cast(self._scale, "float32")

    def _p(self) -> list[Any]:
        return list(ops.unstack(ops.cast(self._params, "float32"), _NUM_PARAMS))

    def _constant(self, local: Any) -> Any:
        return self._p()[0]

    def _decay_exponent(self, local: Any) -> tuple[list[Any], Any]:
        p = self._p()
        q = ops.cast(local, "float32") / p[1]
        return p, ops.where(p[3] > 0.5, ops.floor(q), q)

    def _exponential(self, local: Any) -> Any:
        p, q = self._decay_exponent(local)
        return p[0] * ops.power(p[2], q)

    def _inverse_time(self, local: Any) -> Any:
        p, q = self._decay_exponent(local)
        return p[0] / (1.0 + p[2] * q)

    def _polynomial(self, local: Any) -> Any:
        init, decay_steps, end, power, cycle = self._p()[:5]
        s = ops.cast(local, "float32")
        cycled_steps = decay_steps * ops.where(ops.equal(s, 0.0), 1.0, ops.ceil(s / decay_steps))
        cycling = cycle > 0.5
        steps = ops.where(cycling, cycled_steps, decay_steps)
        s = ops.where(cycling, s, ops.minimum(s, decay_steps))
        return (init - end) * ops.power(1.0 - s / steps, power) + end

    def _cosine(self, local: Any) -> Any:
        init, decay_steps, alpha, target, warmup_steps = self._p()[:5]
        s = ops.minimum(ops.cast(local, "float32"), decay_steps + warmup_steps)
        warmup = (target - init) * (s / warmup_steps) + init
        cosine = 0.5 * (1.0 + ops.cos(math.pi * ((s - warmup_steps) / decay_steps)))
        return ops.where(s < warmup_steps, warmup, target * ((1.0 - alpha) * cosine + alpha))

    def _cosine_restarts(self, local: Any) -> Any:
        init, first_decay_steps, t_mul, m_mul, alpha = self._p()[:5]
        fraction = ops.cast(local, "float32") / first_decay_steps
        i_geometric = ops.floor(ops.log(1.0 - fraction * (1.0 - t_mul)) / ops.log(t_mul))
        sum_r = (1.0 - ops.power(t_mul, i_geometric)) / (1.0 - t_mul)
        f_geometric = (fraction - sum_r) / ops.power(t_mul, i_geometric)
        linear = ops.equal(t_mul, 1.0)
        i_restart = ops.where(linear, ops.floor(fraction), i_geometric)
        f_restart = ops.where(linear, fraction - ops.floor(fraction), f_geometric)
        cosine = 0.5 * ops.power(m_mul, i_restart) * (1.0 + ops.cos(math.pi * f_restart))
        return init * ((1.0 - alpha) * cosine + alpha)

    def _piecewise_constant(self, local: Any) -> Any:
        # values[i] for boundaries[i-1] < step <= boundaries[i]; padding never counts.
        index = ops.sum(ops.cast(ops.greater(local, self._steps), "int32"))
        return ops.cast(ops.take(self._values, index), "float32")

    def _piecewise_linear(self, local: Any) -> Any:
        # Interpolate between the knots around the step; flat outside them.
        at_or_before = ops.sum(ops.cast(ops.less_equal(self._steps, local), "int32"))
        lo = ops.maximum(at_or_before - 1, 0)
        hi = ops.minimum(at_or_before, self._count - 1)
        t_lo, t_hi = ops.take(self._steps, lo), ops.take(self._steps, hi)
        v_lo = ops.cast(ops.take(self._values, lo), "float32")
        v_hi = ops.cast(ops.take(self._values, hi), "float32")
        span = ops.cast(ops.maximum(t_hi - t_lo, 1), "float32")
        frac = ops.clip(ops.cast(local - t_lo, "float32") / span, 0.0, 1.0)
        return v_lo + (v_hi - v_lo) * frac

    # -- the `.keras` format (see lrctl.service.saving) ----------------------------------------
    #: Set by `attach`: the optimizer that holds this schedule and tracks its variables.
    optimizer_ref: weakref.ReferenceType[Any] | None = None
    #: Set by `attach`: variables of that optimizer that hold no state (the float LR replaced).
    retired: tuple[keras.Variable, ...] = ()
    #: Set by `from_config`: where this schedule's variables and the retired ones sat in the
    #: saved optimizer's variable list. keras.models.load_model cannot restore that list (its
    #: count differs from the rebuilt optimizer's); lrctl.service.load_model can with this
    #: layout, then clears it. While it is set, `attach` refuses the optimizer.
    saved_optimizer_layout: dict[str, Any] | None = None

    def get_config(self) -> dict[str, Any]:
        """The whole active state, so `from_config` resumes exactly, and the layout of a built
        optimizer's variable list, so lrctl.service.load_model can restore the optimizer."""
        state, version = self.read()
        config: dict[str, Any] = {
            "name": self.name,
            "schedule": {"class_name": state.spec.keras_name, "config": state.spec.to_config()},
            "origin": state.origin.value, "origin_step": state.origin_step, "scale": state.scale,
            "version": version,
        }
        optimizer = self.optimizer_ref() if self.optimizer_ref is not None else None
        if optimizer is not None and optimizer.built:  # unbuilt, it holds no state to restore
            index = {id(v): i for i, v in enumerate(optimizer.variables)}
            config["optimizer_layout"] = {
                "count": len(index), "schedule": [index[id(v)] for v in self.variables],
                "retired": [index[id(v)] for v in self.retired if id(v) in index],
            }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ControllableSchedule:
        # Configs saved before lrctl kept the state carry only "schedule": the defaults match.
        state = ActiveSchedule(specs.as_spec(config["schedule"]), Origin(config.get("origin", "global")),
                               int(config.get("origin_step", 0)), float(config.get("scale", 1.0)))
        schedule = cls(state, name=config.get("name", "lrctl"))
        schedule._version.assign(int(config.get("version", 0)))
        schedule.saved_optimizer_layout = config.get("optimizer_layout")
        return schedule
