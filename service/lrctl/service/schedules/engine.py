"""The schedule engine: a Keras `LearningRateSchedule` whose every parameter is a variable.

The compiled train step reads these variables each step, so swapping the schedule, pinning
or scaling the LR is a handful of variable assignments: no retrace, under `jit_compile`,
`steps_per_execution` and `tf.distribute` alike. The LR is computed with `keras.ops` by the
active form of `forms.FORMS` (picked by a switch on a variable) from float32 coefficients
that `load` derives on the host, scale included, so a step runs a Keras schedule's few ops.
"""

from __future__ import annotations

import dataclasses
import math
import random
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import keras
import numpy as np
from keras import ops

from lrctl.service.schedules import forms, specs
from lrctl.service.schedules.packing import PackedVariables
from lrctl.service.schedules.registry import CAPACITY, NUM_COEFFICIENTS, Form
from lrctl.service.schedules.specs import ActiveSchedule, Origin, ScheduleSpec

_NUM_PARAMS = 8
_FORMS = tuple(forms.FORMS.values())
_FORM_INDEX = {name: i for i, name in enumerate(forms.FORMS)}
#: Reading a scalar field back from float64 (which holds every valid value exactly).
_FROM_FLOAT64: dict[str, Callable[[float], Any]] = {
    "float": float, "int": round, "bool": bool, "float | None": lambda x: None if math.isnan(x) else x,
}


def _encode(state: ActiveSchedule) -> dict[str, np.ndarray]:
    """`state.spec` as the values of the engine's variables of the same names.

    `params`, `values` and `count` hold the spec as given, only to read it back: a scalar kind's
    fields in declaration order (None as NaN) or a knot kind's values. The graph reads the
    derived float32 `coefficients`, `rates` and `slopes` (see `forms.derive`) and `steps`.
    """
    spec = state.spec
    derived = forms.derive(state)
    params = np.zeros(_NUM_PARAMS, np.float64)
    values = np.zeros(CAPACITY + 1, np.float64)
    count = 0
    match spec:
        case specs.PiecewiseConstantDecay():
            count, raw = len(spec.boundaries), spec.values
        case specs.PiecewiseLinear():
            count, raw = len(spec.knots), tuple(v for _, v in spec.knots)
        case _:
            raw = ()
            fields = [getattr(spec, f.name) for f in dataclasses.fields(spec)]
            params[: len(fields)] = [math.nan if v is None else float(v) for v in fields]
    if raw:
        values[:] = raw[-1]
        values[: len(raw)] = raw
    coefficients = np.zeros(NUM_COEFFICIENTS, np.float32)
    coefficients[: len(derived.coefficients)] = [
        derived.coefficients[name] for name in forms.FORMS[derived.form].coefficients
    ]
    return {
        "kind": np.asarray(_FORM_INDEX[derived.form], np.int32), "params": params,
        "steps": derived.steps, "values": values, "count": np.asarray(count, np.int32),
        "coefficients": coefficients, "rates": derived.rates, "slopes": derived.slopes,
    }


def _decode(kind: int, params: np.ndarray, steps: np.ndarray, values: np.ndarray, count: int) -> ScheduleSpec:
    spec_type = _FORMS[kind].spec_type
    if spec_type is specs.PiecewiseConstantDecay:
        return specs.PiecewiseConstantDecay(
            tuple(int(s) for s in steps[:count]), tuple(float(v) for v in values[: count + 1])
        )
    if spec_type is specs.PiecewiseLinear:
        return specs.PiecewiseLinear(tuple((int(s), float(v)) for s, v in zip(steps[:count], values[:count])))
    fields = dataclasses.fields(spec_type)
    return spec_type(**{f.name: _FROM_FLOAT64[str(f.type)](float(x)) for f, x in zip(fields, params)})


#: A clamp counts when the LR is beyond a bound by more than this (relative): the host check and
#: the graph agree to float32 rounding, not bit for bit, so an LR at a bound may land an ulp out.
CLAMP_TOLERANCE = 2.0**-14


def _bounds_of(lo: float, hi: float) -> np.ndarray:
    """The `bounds` variable's value: the clamp's [lo, hi], then the range beyond which it counts."""
    return np.array([lo, hi, lo * (1 - CLAMP_TOLERANCE), hi * (1 + CLAMP_TOLERANCE)], np.float32)


def _new_stamp() -> int:
    return random.getrandbits(63)


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
        enc = _encode(state)

        def variable(value: object, dtype: str, suffix: str) -> keras.Variable:
            # Non-trainable and assigned only in cross-replica context (between steps), so
            # every replica reads the same value at the same step.
            return keras.Variable(
                value, dtype=dtype, trainable=False, name=f"{name}_{suffix}",
                aggregation="only_first_replica",
            )

        self._kind = variable(enc["kind"], "int32", "kind")
        self._origin_step = variable(state.origin_step, "int64", "origin_step")
        self._scale = variable(state.scale, "float64", "scale")
        self._params = variable(enc["params"], "float64", "params")
        self._steps = variable(enc["steps"], "int64", "steps")
        self._values = variable(enc["values"], "float64", "values")
        self._count = variable(enc["count"], "int32", "count")
        self._version = variable(0, "int64", "version")
        # The origin kind is not needed to compute the LR, only to report it; keep it as a flag.
        self._restart = variable(state.origin is Origin.RESTART, "bool", "restart")
        # What the graph computes from, derived from the above (scale included) by `load`.
        self._coefficients = variable(enc["coefficients"], "float32", "coefficients")
        self._rates = variable(enc["rates"], "float32", "rates")
        self._slopes = variable(enc["slopes"], "float32", "slopes")
        # A random id written by every load and restored with the rest by any restore: if it
        # still holds what the last load wrote, nothing replaced the schedule since (one
        # scalar read, instead of reading everything before each change).
        self._stamp = variable(_new_stamp(), "int64", "stamp")
        # Defence in depth behind the controller's checks: the LR is clamped into the trainer's
        # bounds in the graph (variables, so setting them never retraces), and every evaluation
        # that needed it is counted. Not part of `variables`: a schedule load leaves them alone.
        self._bounds = variable(_bounds_of(0.0, math.inf), "float32", "bounds")
        self._clamp_count = variable(0, "int64", "clamp_count")

    @property
    def variables(self) -> list[keras.Variable]:
        """Everything a checkpoint must hold to resume with the same learning rate."""
        return [self._kind, self._origin_step, self._scale, self._params, self._steps,
                self._values, self._count, self._version, self._restart,
                self._coefficients, self._rates, self._slopes, self._stamp]

    @property
    def guard_variables(self) -> list[keras.Variable]:
        """The clamp's bounds and count: checkpointed with the optimizer, never loaded by `load`."""
        return [self._bounds, self._clamp_count]

    @property
    def checkpointed(self) -> list[keras.Variable]:
        """Every variable of the schedule that the optimizer tracks and checkpoints."""
        return [*self.variables, *self.guard_variables]

    @property
    def clamp_count_variable(self) -> keras.Variable:
        return self._clamp_count

    # -- training thread only -------------------------------------------------------------
    def set_bounds(self, min_learning_rate: float, max_learning_rate: float) -> None:
        """Clamp every learning rate this schedule gives to [min, max] from the next step on; a
        non-finite one becomes `min_learning_rate` (the safe side: a step too small is undone
        by the next, a step too large or NaN may wreck the weights)."""
        self._bounds.assign(_bounds_of(min_learning_rate, max_learning_rate))

    def clamp_count(self) -> int:
        """How many evaluations found the LR out of bounds (or not finite) and clamped it."""
        return int(self._clamp_count.numpy())

    def values_of(self, state: ActiveSchedule, version: int) -> list[np.ndarray]:
        """What `variables` must hold for `state` at `version`, converted (a value that does
        not fit raises here, before anything is assigned)."""
        enc = _encode(state)
        return [enc["kind"], np.asarray(state.origin_step, np.int64), np.asarray(state.scale, np.float64),
                enc["params"], enc["steps"], enc["values"], enc["count"], np.asarray(version, np.int64),
                np.asarray(state.origin is Origin.RESTART), enc["coefficients"], enc["rates"], enc["slopes"],
                np.asarray(_new_stamp(), np.int64)]

    @staticmethod
    def state_of(values: list[Any]) -> tuple[ActiveSchedule, int]:
        """The inverse of `values_of`: the schedule and version that `variables` hold."""
        kind, origin_step, scale, params, steps, stored, count, version, restart = \
            (np.asarray(v) for v in values[:9])
        spec = _decode(int(kind), params, steps, stored, int(count))
        origin = Origin.RESTART if bool(restart) else Origin.GLOBAL
        return ActiveSchedule(spec, origin, int(origin_step), float(scale)), int(version)

    def load(self, state: ActiveSchedule, version: int) -> None:
        """Make `state` the schedule of every following step. Call between steps only.
        All or nothing (see `load_packed`): a value that does not fit raises before anything
        is assigned."""
        self.load_packed(self.pack(state, version))

    def pack(self, state: ActiveSchedule, version: int) -> np.ndarray:
        """What `variables` must hold for `state` at `version`, as one packed vector."""
        return self._packed.packer.pack(self.values_of(state, version))

    def load_packed(self, vector: np.ndarray, previous: np.ndarray | None = None) -> None:
        """Every load of the engine comes here: one compiled call assigns all `variables` from
        one int64 vector (`packing`), so no step sees half of one schedule and half of another.
        If it fails, `previous` (default: what the variables hold now) is put back."""
        self._packed.assign(vector, previous)

    def read_packed(self) -> np.ndarray:
        """What `variables` hold, as one packed vector (one compiled call)."""
        return self._packed.read()

    def state_in(self, vector: np.ndarray) -> tuple[ActiveSchedule, int]:
        """The schedule and version a packed vector holds (host only, no TensorFlow)."""
        return self.state_of(self._packed.packer.unpack(vector))

    def offset_of(self, variable: keras.Variable) -> int:
        """Where a scalar variable (the stamp, the version) sits in a packed vector."""
        return self._packed.packer.offset_of(variable)

    @property
    def _packed(self) -> PackedVariables:
        # Built on first use, not in __init__: a schedule that is only configured or copied
        # never creates its compiled functions.
        packed = self.__dict__.get("_packed_variables")
        if packed is None:
            packed = self.__dict__["_packed_variables"] = PackedVariables(self.variables)
        return packed

    @property
    def version_variable(self) -> keras.Variable:
        return self._version

    @property
    def stamp_variable(self) -> keras.Variable:
        return self._stamp

    def set_version(self, version: int) -> None:
        self._version.assign(version)
        self._stamp.assign(_new_stamp())

    def stamp(self) -> int:
        """The id of the last load (or set_version), as the variables hold it now."""
        return int(self._packed.read_one(self._stamp))

    def read(self) -> tuple[ActiveSchedule, int]:
        """Decode the variables (e.g. after a checkpoint restore) into the active schedule."""
        return self.state_in(self.read_packed())

    # -- in the graph ---------------------------------------------------------------------
    def __call__(self, step: Any) -> Any:
        return self.bounded(step, count=True)

    def bounded(self, step: Any, *, count: bool) -> Any:
        """The learning rate at `step`, clamped into the bounds; with `count`, an evaluation out
        of bounds (beyond float32 rounding) or not finite adds one to the clamp count."""
        lr = self.unbounded(step)
        lo, hi, lo_count, hi_count = ops.unstack(ops.convert_to_tensor(self._bounds), 4)
        finite = ops.isfinite(lr)
        if count:  # NaN fails every comparison: counted
            inside = ops.logical_and(ops.greater_equal(lr, lo_count), ops.less_equal(lr, hi_count))
            self._clamp_count.assign_add(ops.cast(ops.logical_not(ops.logical_and(finite, inside)), "int64"))
        return ops.where(finite, ops.clip(lr, lo, hi), lo)

    def unbounded(self, step: Any) -> Any:
        """The schedule's own learning rate at `step`, as `forms.learning_rate` computes it on the host."""
        local = ops.maximum(ops.cast(step, "int64") - self._origin_step, 0)
        # Only the active form's ops run: a switch on a variable, so still no retrace. The switch
        # is most of the cost left (its lowered Switch/Merge passes a dead tensor through every
        # op of every other form), so what all forms share is done once, outside it.
        coefficients = ops.convert_to_tensor(self._coefficients)
        return ops.switch(self._kind, [self._branch(form, coefficients) for form in _FORMS], local)

    def _branch(self, form: Form, coefficients: Any) -> Callable[[Any], Any]:
        def compute(local: Any) -> Any:
            c = SimpleNamespace(steps=self._steps, rates=self._rates, slopes=self._slopes)
            if form.coefficients:
                c.__dict__.update(zip(form.coefficients, ops.unstack(coefficients, NUM_COEFFICIENTS)))
            return form.compute(ops, c, local)

        return compute

    # -- the `.keras` format (see lrctl.service.training.keras_file) -----------------------------
    #: Set by `attach`: the optimizer that holds this schedule and tracks its variables.
    optimizer_ref: weakref.ReferenceType[Any] | None = None
    #: Set by `attach`: variables of that optimizer that hold no state (the float LR replaced).
    retired: tuple[keras.Variable, ...] = ()
    #: Set by `from_config`: where this schedule's variables and the retired ones sat in the
    #: saved optimizer's variable list. keras.models.load_model cannot restore that list (its
    #: count differs from the rebuilt optimizer's); lrctl.service.load_model can with this
    #: layout, then clears it. While it is set, `attach` refuses the optimizer.
    saved_optimizer_layout: dict[str, Any] | None = None
    #: Set by the training layer: the optimizer's live hyperparameter variables by name
    #: (`training/hyperparams.py`), whose places in the list the layout records too.
    hyperparameters: dict[str, keras.Variable] | None = None

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
                "count": len(index), "schedule": [index[id(v)] for v in self.checkpointed if id(v) in index],
                "retired": [index[id(v)] for v in self.retired if id(v) in index],
                "hyperparameters": {name: index[id(v)] for name, v in (self.hyperparameters or {}).items()
                                    if id(v) in index},
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
