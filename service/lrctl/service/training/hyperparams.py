"""Optimizer hyperparameters beyond the learning rate, live: the controller's `ParameterTarget`.

Keras keeps `momentum`, `beta_1`, `beta_2`, `epsilon`, `weight_decay` and the clip values as
Python floats, used two ways by the traced train step:
- at **trace time**, as structure: `if self.momentum != 0` (SGD builds momentum slots),
  `if self.momentum > 0` (RMSprop), `if self.weight_decay is None` (no decay ops at all),
  `if self.clipnorm and self.clipnorm > 0` (`_clip_gradients`);
- at **run time**, as a value: `ops.cast(self.beta_1, dtype)`, `1 - self.beta_2`,
  `ops.add(v, self.epsilon)`, `clip_norm * ...`, `-v`, folded into the graph as constants.

So each is replaced by a `LiveValue`: it compares, hashes, formats and converts to `float` as
the number the optimizer was built with (every structural test sees what it saw at build
time), and converts to a tensor, or does arithmetic, by reading a variable (every use as a
value reads the live one). Assigning the variable between steps changes the next step, with
no retrace. A change the traced step cannot make (momentum on an optimizer built without
slots, clipping on one built without it) is refused with how to start the job instead.

The variables are created under the optimizer's strategy, tracked by the optimizer (so its
checkpoints carry them and a resume restores them), and assigned only by the training thread
between steps. User variables joined with `register` are loaded the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lrctl.service.control.targets import ParameterSpace, ParameterSpec
from lrctl.service.training.attach import lr_owner

Number = float | int


class LiveValue:
    """Where Keras keeps a float hyperparameter: the built number for Python's comparisons,
    the variable for TensorFlow."""

    def __init__(self, built: float, variable: keras.Variable) -> None:
        self.built = float(built)
        self.variable = variable

    def tensor(self, dtype: Any = None) -> tf.Tensor:
        value = tf.convert_to_tensor(self.variable)
        dtype = tf.as_dtype(dtype) if dtype is not None else None
        return value if dtype is None or dtype == value.dtype else tf.cast(value, dtype)

    # Python's view: the number it was built with (trace-time structure).
    def __float__(self) -> float:
        return self.built

    def __bool__(self) -> bool:
        return bool(self.built)

    def __hash__(self) -> int:
        return hash(self.built)

    def __eq__(self, other: object) -> bool:
        return self.built == _number(other)

    def __ne__(self, other: object) -> bool:
        return self.built != _number(other)

    def __lt__(self, other: object) -> bool:
        return self.built < _number(other)

    def __le__(self, other: object) -> bool:
        return self.built <= _number(other)

    def __gt__(self, other: object) -> bool:
        return self.built > _number(other)

    def __ge__(self, other: object) -> bool:
        return self.built >= _number(other)

    def __repr__(self) -> str:
        return repr(self.built)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # Eager only (a saved config, a summary): the live value, as the variable holds it.
        return np.asarray(self.variable.numpy(), dtype=dtype)

    def __format__(self, spec: str) -> str:
        return format(self.built, spec)

    # TensorFlow's view: the variable (run-time value).
    def __neg__(self) -> tf.Tensor:
        return -self.tensor()

    def __add__(self, other: Any) -> tf.Tensor:
        return self.tensor() + other

    def __radd__(self, other: Any) -> tf.Tensor:
        return other + self.tensor()

    def __sub__(self, other: Any) -> tf.Tensor:
        return self.tensor() - other

    def __rsub__(self, other: Any) -> tf.Tensor:
        return other - self.tensor()

    def __mul__(self, other: Any) -> tf.Tensor:
        return self.tensor() * other

    def __rmul__(self, other: Any) -> tf.Tensor:
        return other * self.tensor()

    def __truediv__(self, other: Any) -> tf.Tensor:
        return self.tensor() / other

    def __rtruediv__(self, other: Any) -> tf.Tensor:
        return other / self.tensor()

    def __pow__(self, other: Any) -> tf.Tensor:
        return self.tensor() ** other

    def __rpow__(self, other: Any) -> tf.Tensor:
        return other ** self.tensor()


def _number(other: object) -> Any:
    return other.built if isinstance(other, LiveValue) else other


tf.register_tensor_conversion_function(
    LiveValue, lambda value, dtype=None, name=None, as_ref=False: value.tensor(dtype))


def _companions(optimizer: keras.optimizers.Optimizer) -> dict[str, keras.Variable]:
    """Where the schedule's config records the hyperparameter variables' places (a `.keras`
    file's optimizer layout, for lrctl.service.load_model)."""
    schedule = optimizer._learning_rate
    if getattr(schedule, "hyperparameters", None) is None:
        schedule.hyperparameters = {}
    return schedule.hyperparameters  # type: ignore[no-any-return]


def _config_as_floats(optimizer: keras.optimizers.Optimizer) -> None:
    """`get_config` (a `.keras` file, `keras.optimizers.serialize`) writes each LiveValue as
    the float the optimizer was built with, so the file loads with plain Keras too: the
    live value rides in the optimizer's variables, as the learning rate's does."""
    if getattr(optimizer, "_lrctl_plain_config", False):
        return
    original = optimizer.get_config

    def get_config() -> dict[str, Any]:
        return {key: float(value) if isinstance(value, LiveValue) else value
                for key, value in original().items()}

    object.__setattr__(optimizer, "get_config", get_config)
    object.__setattr__(optimizer, "_lrctl_plain_config", True)


@dataclass(frozen=True)
class _Kind:
    """A hyperparameter's range and when a built optimizer can change it live."""

    minimum: float | None
    minimum_inclusive: bool
    maximum: float | None
    maximum_inclusive: bool
    #: (the optimizer, its built value) -> "" if live, else why not and how to start the job.
    fixed: Callable[[keras.optimizers.Optimizer, float | None, str], str]


def _momentum_fixed(optimizer: keras.optimizers.Optimizer, built: float | None, name: str) -> str:
    if built:
        return ""
    cls = type(optimizer).__name__
    return (f"{cls} was built with momentum=0: it has no momentum slots; start it with "
            f"{cls}(momentum=0.9) (any nonzero value) to change momentum live")


def _decay_fixed(optimizer: keras.optimizers.Optimizer, built: float | None, name: str) -> str:
    if built is not None:
        return ""
    cls = type(optimizer).__name__
    return (f"{cls} was built with weight_decay=None: its train step has no weight decay; start "
            f"it with {cls}(weight_decay=0.0) (any value >= 0) to change weight_decay live")


def _clip_fixed(optimizer: keras.optimizers.Optimizer, built: float | None, name: str) -> str:
    if built:
        return ""
    cls = type(optimizer).__name__
    others = [n for n in _CLIPS if n != name and getattr(optimizer, n, None)]
    if others:
        return (f"{cls} clips with {others[0]}, and Keras allows one clipping mode: start it with "
                f"{cls}({name}=1.0) instead of {others[0]} to change {name} live")
    return (f"{cls} was built without {name}: its train step does not clip; start it with "
            f"{cls}({name}=1.0) (any value > 0) to change {name} live")


def _always(optimizer: keras.optimizers.Optimizer, built: float | None, name: str) -> str:
    return ""


_UNIT = _Kind(0.0, True, 1.0, False, _always)  # betas: [0, 1)
_MOMENTUM = _Kind(0.0, True, 1.0, False, _momentum_fixed)
_EPSILON = _Kind(0.0, False, None, True, _always)
_DECAY = _Kind(0.0, True, None, True, _decay_fixed)
_CLIP = _Kind(0.0, False, None, True, _clip_fixed)
_CLIPS = ("clipnorm", "global_clipnorm", "clipvalue")
_BASE = {"weight_decay": _DECAY, **{name: _CLIP for name in _CLIPS}}
_ADAM_FAMILY = {"beta_1": _UNIT, "beta_2": _UNIT, "epsilon": _EPSILON}


def _kinds(optimizer: keras.optimizers.Optimizer) -> dict[str, _Kind]:
    """The hyperparameters lrctl can move for this optimizer's class (AdamW is an Adam)."""
    opt = keras.optimizers
    own: dict[str, _Kind] = {}
    if isinstance(optimizer, opt.SGD):
        own = {"momentum": _MOMENTUM}
    elif isinstance(optimizer, opt.RMSprop):
        own = {"momentum": _MOMENTUM, "epsilon": _EPSILON}
    elif isinstance(optimizer, (opt.Adam, opt.Adamax, opt.Nadam)):
        own = dict(_ADAM_FAMILY)
    return {**own, **_BASE}


@dataclass
class _Entry:
    spec: ParameterSpec
    variable: keras.Variable | None  #: None: fixed, nothing to load
    built: float | None


class OptimizerParameters:
    """The controller's `ParameterTarget`: the optimizer's live hyperparameters and the
    registered variables. Training thread only, between steps."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, *, unsupported: str = "") -> None:
        """Replace the hyperparameters of `optimizer` (its inner one under a LossScaleOptimizer)
        with live values, before its first step. `unsupported`: why no change can be made in
        this job (then nothing is replaced; the values are only reported)."""
        self._unsupported = unsupported
        self._entries: dict[str, _Entry] = {}
        owner = lr_owner(optimizer)
        strategy = getattr(owner, "_distribution_strategy", None) or tf.distribute.get_strategy()
        tracked = {id(v) for v in owner.variables}
        for name, kind in _kinds(owner).items():
            current = getattr(owner, name, None)
            built: float | None
            if isinstance(current, LiveValue):  # attached before: reuse (a resumed façade)
                variable, built = current.variable, current.built
            elif current is None or (isinstance(current, (int, float)) and not isinstance(current, bool)):
                built = None if current is None else float(current)
                variable = None
            else:  # a tensor or a callable beta: Keras evaluates it itself; leave it alone
                continue
            reason = kind.fixed(owner, built, name)
            if not reason and variable is None and not unsupported:
                assert built is not None
                with strategy.scope():
                    variable = keras.Variable(built, dtype="float32", trainable=False,
                                              name=f"lrctl_{name}", aggregation="only_first_replica")
                setattr(owner, name, LiveValue(built, variable))
                _config_as_floats(owner)
            if variable is not None and id(variable) not in tracked:
                owner._track_variable(variable)  # rides in the optimizer's checkpoints
            if variable is not None and not reason:
                _companions(owner)[name] = variable
            self._entries[name] = _Entry(
                ParameterSpec(name, live=not reason, fixed_reason=reason, minimum=kind.minimum,
                              minimum_inclusive=kind.minimum_inclusive, maximum=kind.maximum,
                              maximum_inclusive=kind.maximum_inclusive),
                variable if not reason else None, built)

    def register(self, name: str, variable: keras.Variable | tf.Variable,
                 bounds: tuple[float | None, float | None] = (None, None)) -> None:
        """A user's scalar floating variable, settable by name within `bounds` (inclusive)."""
        if name in self._entries:
            raise ValueError(f"a hyperparameter named {name!r} exists already: pick another name")
        if not name or not all(c.isalnum() or c in "_.-" for c in name):
            raise ValueError(f"register: name must be letters, digits, '_', '.', '-'. Received: {name!r}")
        dtype = tf.as_dtype(variable.dtype)
        if not dtype.is_floating or tuple(variable.shape) != ():
            raise ValueError(f"register({name!r}): the variable must be a floating scalar. "
                             f"Received: {variable.dtype} of shape {tuple(variable.shape)}")
        lo, hi = bounds
        if lo is not None and hi is not None and not hi >= lo:
            raise ValueError(f"register({name!r}): bounds must be (min, max) with max >= min. Received: {bounds}")
        self._entries[name] = _Entry(
            ParameterSpec(name, registered=True, minimum=lo, maximum=hi, dtype=dtype.name),
            variable, None)

    def variables(self) -> list[keras.Variable | tf.Variable]:
        """Every live variable, the registered ones included (what a LoadCheckpoint keeps
        unless it loads the checkpoint's hyperparameters)."""
        return [e.variable for e in self._entries.values() if e.variable is not None]

    def space(self) -> ParameterSpace:
        return ParameterSpace(tuple(e.spec for e in self._entries.values()), self._unsupported)

    def read(self) -> dict[str, float]:
        values = {}
        for name, entry in self._entries.items():
            if entry.variable is not None:
                values[name] = float(np.asarray(entry.variable.numpy()))
            else:
                values[name] = 0.0 if entry.built is None else entry.built  # None: off
        return values

    def load(self, values: Mapping[str, float]) -> None:
        """Assign each variable (cross-replica context: between steps); all or nothing."""
        previous = self.read()
        done = []
        try:
            for name, value in values.items():
                variable = self._entries[name].variable
                assert variable is not None, f"{name} is not live"
                variable.assign(value)
                done.append(name)
        except Exception:
            for name in done:
                variable = self._entries[name].variable
                if variable is not None:
                    variable.assign(previous[name])
            raise


__all__ = ["LiveValue", "OptimizerParameters"]
