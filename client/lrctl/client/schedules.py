"""Build `lrctl.v1.Schedule` messages with the names, arguments and defaults of Keras.

`ExponentialDecay(0.01, 1000, 0.96)` here takes the same arguments as
`keras.optimizers.schedules.ExponentialDecay` and returns a `Schedule` message.
`from_keras_config` accepts `keras.optimizers.schedules.serialize(...)` output and
`to_keras_config` is its inverse. This module converts shapes and types only; the
server is the single authority on which values are valid.
"""

# The builders are CamelCase functions on purpose: they mirror the
# keras.optimizers.schedules class names, so `ExponentialDecay(0.1, 1000, 0.96)`
# reads the same in both. Naming lints are silenced for this file for that reason:
# pylint: disable=invalid-name
# (ruff: N802 is ignored for this file in pyproject.toml [tool.ruff.lint.per-file-ignores].)

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from lrctl.client.errors import InvalidArgument
from lrctl.v1 import training_control_pb2 as pb

# Conversion problems are InvalidArgument (a ValueError too), never a bare ValueError.
_invalid = InvalidArgument.from_message

__all__ = [
    "SUPPORTED_CLASS_NAMES",
    "Constant",
    "CosineDecay",
    "CosineDecayRestarts",
    "ExponentialDecay",
    "InverseTimeDecay",
    "PiecewiseConstantDecay",
    "PiecewiseLinear",
    "PolynomialDecay",
    "ScheduleLike",
    "describe_schedule",
    "from_keras_config",
    "to_keras_config",
    "to_schedule",
]

KindMessage = (
    pb.Constant
    | pb.ExponentialDecay
    | pb.PiecewiseConstantDecay
    | pb.PolynomialDecay
    | pb.InverseTimeDecay
    | pb.CosineDecay
    | pb.CosineDecayRestarts
    | pb.PiecewiseLinear
)
#: Everything `to_schedule` accepts: a Schedule, one kind message (e.g.
#: `ExponentialDecay`), a Keras `serialize()` dict or `{"class_name", "config"}` dict,
#: a Keras schedule object (anything with `get_config()`), or a number (Constant).
ScheduleLike = pb.Schedule | KindMessage | Mapping[str, Any] | float | Any

_KERAS_MODULE = "keras.optimizers.schedules"
_LRCTL_MODULE = "lrctl.client.schedules"


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # "float" | "int" | "bool" | "ints" | "floats" | "knots"
    help: str  # `lrctl swap KIND --help` text; the CLI appends the default
    required: bool = False
    # Keras default; also what an unset `optional` proto field means.
    default: Any = None
    # True for proto3 `optional` fields (explicit presence).
    presence: bool = False


@dataclass(frozen=True)
class _Kind:
    class_name: str  # the Keras class name (or ours for Constant/PiecewiseLinear)
    oneof_field: str  # field name in Schedule.kind
    message: type[Message]
    args: tuple[_Field, ...]  # the builder's arguments, in signature order
    keras_name: str | None  # default `name` Keras puts in get_config(); None if not Keras
    help: str  # one line for `lrctl swap --help`

    @property
    def module(self) -> str:
        return _KERAS_MODULE if self.keras_name is not None else _LRCTL_MODULE

    @property
    def builder(self) -> Callable[..., pb.Schedule]:
        # The builders below are named after class_name; they are defined after
        # the table (they use it), so look them up when asked.
        builder: Callable[..., pb.Schedule] = globals()[self.class_name]
        return builder


_ILR = _Field("initial_learning_rate", "float", "learning rate at the schedule's step 0", True)

_KINDS: tuple[_Kind, ...] = (
    _Kind(
        "Constant",
        "constant",
        pb.Constant,
        (_Field("learning_rate", "float", "the learning rate", True),),
        None,
        "a constant learning rate",
    ),
    _Kind(
        "ExponentialDecay",
        "exponential_decay",
        pb.ExponentialDecay,
        (
            _ILR,
            _Field("decay_steps", "int", "steps per decay period", True),
            _Field("decay_rate", "float", "decay factor per period", True),
            _Field("staircase", "bool", "decay in discrete intervals", default=False),
        ),
        "ExponentialDecay",
        "initial_learning_rate * decay_rate ** (step / decay_steps)",
    ),
    _Kind(
        "PiecewiseConstantDecay",
        "piecewise_constant_decay",
        pb.PiecewiseConstantDecay,
        (
            _Field("boundaries", "ints", "comma-separated steps, e.g. 100,200", True),
            _Field("values", "floats", "comma-separated LRs, one more than boundaries", True),
        ),
        "PiecewiseConstant",
        "a step function: values[i] up to boundaries[i]",
    ),
    _Kind(
        "PolynomialDecay",
        "polynomial_decay",
        pb.PolynomialDecay,
        (
            _ILR,
            _Field("decay_steps", "int", "steps to decay over", True),
            _Field(
                "end_learning_rate", "float", "final learning rate", default=0.0001, presence=True
            ),
            _Field("power", "float", "polynomial power", default=1.0, presence=True),
            _Field("cycle", "bool", "restart the decay after decay_steps", default=False),
        ),
        "PolynomialDecay",
        "polynomial decay to end_learning_rate over decay_steps",
    ),
    _Kind(
        "InverseTimeDecay",
        "inverse_time_decay",
        pb.InverseTimeDecay,
        (
            _ILR,
            _Field("decay_steps", "int", "how often to apply decay", True),
            _Field("decay_rate", "float", "decay rate", True),
            _Field("staircase", "bool", "decay in discrete intervals", default=False),
        ),
        "InverseTimeDecay",
        "initial_learning_rate / (1 + decay_rate * step / decay_steps)",
    ),
    _Kind(
        "CosineDecay",
        "cosine_decay",
        pb.CosineDecay,
        (
            _ILR,
            _Field("decay_steps", "int", "steps to decay over (after warmup)", True),
            _Field("alpha", "float", "minimum LR as a fraction of the peak", default=0.0),
            _Field("warmup_target", "float", "LR reached at the end of warmup", presence=True),
            _Field("warmup_steps", "int", "number of warmup steps", default=0),
        ),
        "CosineDecay",
        "cosine decay with optional linear warmup",
    ),
    _Kind(
        "CosineDecayRestarts",
        "cosine_decay_restarts",
        pb.CosineDecayRestarts,
        (
            _ILR,
            _Field("first_decay_steps", "int", "steps in the first period", True),
            _Field("t_mul", "float", "period length multiplier", default=2.0, presence=True),
            _Field(
                "m_mul", "float", "initial LR multiplier per period", default=1.0, presence=True
            ),
            _Field("alpha", "float", "minimum LR as a fraction of the initial", default=0.0),
        ),
        "SGDRDecay",
        "cosine decay with warm restarts (SGDR)",
    ),
    _Kind(
        "PiecewiseLinear",
        "piecewise_linear",
        pb.PiecewiseLinear,
        (_Field("knots", "knots", "comma-separated STEP:LR pairs, e.g. 0:0.0,100:0.1", True),),
        None,
        "linear interpolation between STEP:LR knots (warmup, WSD, 1cycle)",
    ),
)

_BY_CLASS_NAME = {k.class_name: k for k in _KINDS}
_BY_ONEOF = {k.oneof_field: k for k in _KINDS}
_BY_MESSAGE: dict[type[Message], _Kind] = {k.message: k for k in _KINDS}

#: The `class_name`s accepted by `from_keras_config`, in proto field order.
SUPPORTED_CLASS_NAMES: tuple[str, ...] = tuple(k.class_name for k in _KINDS)


# --- conversions (types and shapes only; values are the server's business) ---


def _to_float(arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Argument `{arg}` must be a number. Received: {arg}={value!r}")
    return float(value)


def _to_int(arg: str, value: Any) -> int:
    # Integral floats (decay_steps=1000.0) are common in configs; accept them.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Argument `{arg}` must be an integer. Received: {arg}={value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    as_float = float(value)
    if not (math.isfinite(as_float) and as_float.is_integer()):
        raise _invalid(f"Argument `{arg}` must be an integer. Received: {arg}={value!r}")
    return int(as_float)


def _to_bool(arg: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    raise TypeError(f"Argument `{arg}` must be a bool. Received: {arg}={value!r}")


def _to_list(arg: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"Argument `{arg}` must be a list. Received: {arg}={value!r}")
    return list(value)


def _to_knots(arg: str, value: Any) -> list[pb.Knot]:
    knots: list[pb.Knot] = []
    for i, item in enumerate(_to_list(arg, value)):
        if isinstance(item, pb.Knot):
            knots.append(pb.Knot(step=item.step, learning_rate=item.learning_rate))
            continue
        pair = _to_list(f"{arg}[{i}]", item)
        if len(pair) != 2:
            raise _invalid(
                f"Argument `{arg}` must hold (step, learning_rate) pairs. "
                f"Received: {arg}[{i}]={item!r}"
            )
        knots.append(
            pb.Knot(
                step=_to_int(f"{arg}[{i}].step", pair[0]),
                learning_rate=_to_float(f"{arg}[{i}].learning_rate", pair[1]),
            )
        )
    return knots


def _set_field(message: Message, field: _Field, value: Any) -> None:
    name = field.name
    if field.kind == "float":
        setattr(message, name, _to_float(name, value))
    elif field.kind == "int":
        setattr(message, name, _to_int(name, value))
    elif field.kind == "bool":
        setattr(message, name, _to_bool(name, value))
    elif field.kind == "ints":
        values = _to_list(name, value)
        getattr(message, name).extend(_to_int(f"{name}[{i}]", v) for i, v in enumerate(values))
    elif field.kind == "floats":
        values = _to_list(name, value)
        getattr(message, name).extend(_to_float(f"{name}[{i}]", v) for i, v in enumerate(values))
    elif field.kind == "knots":
        getattr(message, name).extend(_to_knots(name, value))
    else:  # pragma: no cover - table error
        raise AssertionError(field.kind)


def _get_field(message: Message, field: _Field) -> Any:
    if field.presence and not message.HasField(field.name):
        return field.default
    value = getattr(message, field.name)
    if field.kind == "ints":
        return [int(v) for v in value]
    if field.kind == "floats":
        return [float(v) for v in value]
    if field.kind == "knots":
        return [[int(k.step), float(k.learning_rate)] for k in value]
    return value


def _build(kind: _Kind, values: Mapping[str, Any]) -> pb.Schedule:
    message = kind.message()
    for field in kind.args:
        value = values.get(field.name)
        # None means "not given": Keras uses None for an unset warmup_target.
        if value is None:
            if field.required:
                raise _invalid(
                    f"{kind.class_name}: missing required argument `{field.name}`."
                )
            continue
        _set_field(message, field, value)
    schedule = pb.Schedule()
    getattr(schedule, kind.oneof_field).CopyFrom(message)
    return schedule


# --- builders mirroring keras.optimizers.schedules ---


def Constant(learning_rate: float) -> pb.Schedule:
    """A constant learning rate: `lr(step) = learning_rate` (not a Keras class)."""
    return _build(_BY_CLASS_NAME["Constant"], {"learning_rate": learning_rate})


def ExponentialDecay(
    initial_learning_rate: float,
    decay_steps: int,
    decay_rate: float,
    staircase: bool = False,
    name: str | None = None,
) -> pb.Schedule:
    """`initial_learning_rate * decay_rate ** (step / decay_steps)`, as in Keras.

    With `staircase=True`, `step / decay_steps` is an integer division. `name` is
    accepted for Keras compatibility and ignored.

    >>> ExponentialDecay(0.1, decay_steps=1000, decay_rate=0.96)  # doctest: +SKIP
    """
    del name
    return _build(
        _BY_CLASS_NAME["ExponentialDecay"],
        {
            "initial_learning_rate": initial_learning_rate,
            "decay_steps": decay_steps,
            "decay_rate": decay_rate,
            "staircase": staircase,
        },
    )


def PiecewiseConstantDecay(
    boundaries: Iterable[int], values: Iterable[float], name: str | None = None
) -> pb.Schedule:
    """`values[0]` while `step <= boundaries[0]`, `values[1]` up to `boundaries[1]`, ...

    `len(values)` must be `len(boundaries) + 1` (checked by the server). `name` is
    ignored.
    """
    del name
    return _build(
        _BY_CLASS_NAME["PiecewiseConstantDecay"], {"boundaries": boundaries, "values": values}
    )


def PolynomialDecay(
    initial_learning_rate: float,
    decay_steps: int,
    end_learning_rate: float = 0.0001,
    power: float = 1.0,
    cycle: bool = False,
    name: str | None = None,
) -> pb.Schedule:
    """Polynomial decay from `initial_learning_rate` to `end_learning_rate`, as in Keras.

    `(initial - end) * (1 - min(step, decay_steps) / decay_steps) ** power + end`.
    `name` is ignored.
    """
    del name
    return _build(
        _BY_CLASS_NAME["PolynomialDecay"],
        {
            "initial_learning_rate": initial_learning_rate,
            "decay_steps": decay_steps,
            "end_learning_rate": end_learning_rate,
            "power": power,
            "cycle": cycle,
        },
    )


def InverseTimeDecay(
    initial_learning_rate: float,
    decay_steps: int,
    decay_rate: float,
    staircase: bool = False,
    name: str | None = None,
) -> pb.Schedule:
    """`initial_learning_rate / (1 + decay_rate * step / decay_steps)`, as in Keras.

    `name` is ignored.
    """
    del name
    return _build(
        _BY_CLASS_NAME["InverseTimeDecay"],
        {
            "initial_learning_rate": initial_learning_rate,
            "decay_steps": decay_steps,
            "decay_rate": decay_rate,
            "staircase": staircase,
        },
    )


def CosineDecay(
    initial_learning_rate: float,
    decay_steps: int,
    alpha: float = 0.0,
    name: str | None = None,
    warmup_target: float | None = None,
    warmup_steps: int = 0,
) -> pb.Schedule:
    """Cosine decay with optional linear warmup, as in Keras.

    Without warmup: `initial * ((1 - alpha) * 0.5 * (1 + cos(pi * step / decay_steps)) + alpha)`.
    With `warmup_target`, the LR rises linearly from `initial_learning_rate` to
    `warmup_target` over `warmup_steps`, then decays. `name` is ignored.
    """
    del name
    return _build(
        _BY_CLASS_NAME["CosineDecay"],
        {
            "initial_learning_rate": initial_learning_rate,
            "decay_steps": decay_steps,
            "alpha": alpha,
            "warmup_target": warmup_target,
            "warmup_steps": warmup_steps,
        },
    )


def CosineDecayRestarts(
    initial_learning_rate: float,
    first_decay_steps: int,
    t_mul: float = 2.0,
    m_mul: float = 1.0,
    alpha: float = 0.0,
    name: str | None = None,
) -> pb.Schedule:
    """Cosine decay with warm restarts (SGDR), as in Keras. `name` is ignored."""
    del name
    return _build(
        _BY_CLASS_NAME["CosineDecayRestarts"],
        {
            "initial_learning_rate": initial_learning_rate,
            "first_decay_steps": first_decay_steps,
            "t_mul": t_mul,
            "m_mul": m_mul,
            "alpha": alpha,
        },
    )


def PiecewiseLinear(knots: Iterable[tuple[int, float] | pb.Knot]) -> pb.Schedule:
    """Linear interpolation between `(step, learning_rate)` knots (not a Keras class).

    Before the first knot the LR is the first knot's, after the last it is the last
    knot's. Linear warmup then decay: `PiecewiseLinear([(0, 0.0), (100, 0.1), (1000, 0.001)])`.
    """
    return _build(_BY_CLASS_NAME["PiecewiseLinear"], {"knots": knots})


# --- Keras config <-> Schedule ---


def from_keras_config(config: Mapping[str, Any]) -> pb.Schedule:
    """Convert `keras.optimizers.schedules.serialize(schedule)` output to a `Schedule`.

    Accepts `{"module": ..., "class_name": ..., "config": {...}, "registered_name": ...}`
    and the plain `{"class_name": ..., "config": {...}}` form. `name` in the config is
    ignored. Raises `lrctl.client.InvalidArgument` (a ValueError) for an unknown
    `class_name` or unknown/missing arguments, TypeError for values of the wrong type.
    """
    if not isinstance(config, Mapping) or "class_name" not in config:
        raise _invalid(
            "Expected a Keras schedule config with `class_name` and `config` keys. "
            f"Received: {config!r}"
        )
    class_name = config["class_name"]
    kind = _BY_CLASS_NAME.get(class_name) if isinstance(class_name, str) else None
    if kind is None:
        raise _invalid(
            f"Unknown learning-rate schedule class_name {class_name!r}. "
            f"Supported: {', '.join(SUPPORTED_CLASS_NAMES)}",
            [("class_name", f"unknown schedule class {class_name!r}")],
        )
    args = config.get("config", {})
    if not isinstance(args, Mapping):
        raise TypeError(f"{class_name}: `config` must be a dict. Received: config={args!r}")
    known = {f.name for f in kind.args}
    unknown = sorted(set(args) - known - {"name"})
    if unknown:
        raise _invalid(
            f"{class_name}: unknown argument(s) {', '.join(unknown)}. "
            f"Expected: {', '.join(f.name for f in kind.args)}"
        )
    return _build(kind, args)


def _kind_of(schedule: pb.Schedule) -> _Kind:
    which = schedule.WhichOneof("kind")
    if which is None:
        raise _invalid("The schedule is empty: no kind is set.")
    return _BY_ONEOF[which]


def to_keras_config(schedule: pb.Schedule) -> dict[str, Any]:
    """The inverse of `from_keras_config`, in `keras.optimizers.schedules.serialize` form.

    Unset optional fields come out as their Keras defaults, and `name` as the Keras
    default name, so a Keras-built schedule round-trips to an equal dict. Constant and
    PiecewiseLinear have no Keras class; they use module `lrctl.client.schedules`.
    """
    kind = _kind_of(schedule)
    message = getattr(schedule, kind.oneof_field)
    args: dict[str, Any] = {f.name: _get_field(message, f) for f in kind.args}
    if kind.keras_name is not None:
        args["name"] = kind.keras_name
    return {
        "module": kind.module,
        "class_name": kind.class_name,
        "config": args,
        "registered_name": None,
    }


def to_schedule(value: ScheduleLike) -> pb.Schedule:
    """Convert any accepted form to a new `Schedule` message.

    Accepts a `Schedule`, a single kind message (`pb.ExponentialDecay(...)`), a Keras
    `serialize()` dict (or `{"class_name", "config"}`), a Keras schedule object (via
    its `get_config()`; Keras is not imported here), or a number (a Constant).
    """
    if isinstance(value, pb.Schedule):
        copy = pb.Schedule()
        copy.CopyFrom(value)
        return copy
    kind = _BY_MESSAGE.get(type(value)) if isinstance(value, Message) else None
    if kind is not None:
        schedule = pb.Schedule()
        getattr(schedule, kind.oneof_field).CopyFrom(value)
        return schedule
    if isinstance(value, Mapping):
        return from_keras_config(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Constant(float(value))
    get_config = getattr(value, "get_config", None)
    if callable(get_config):
        return from_keras_config({"class_name": type(value).__name__, "config": get_config()})
    raise TypeError(
        "Expected a Schedule, a schedule kind message, a Keras schedule config dict, "
        f"a Keras schedule or a number. Received: {value!r}"
    )


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def describe_schedule(schedule: pb.Schedule) -> str:
    """A one-line summary, e.g. `ExponentialDecay(initial_learning_rate=0.1, ...)`."""
    if schedule.WhichOneof("kind") is None:
        return "(none)"
    config = to_keras_config(schedule)
    args = ", ".join(
        f"{k}={_format_value(v)}" for k, v in config["config"].items() if k != "name"
    )
    return f"{config['class_name']}({args})"
