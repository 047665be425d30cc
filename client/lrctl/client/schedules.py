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

import inspect
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from lrctl.client.errors import InvalidArgument
from lrctl.client.schedule_fields import Field, field_kind, get_field, help_text, set_field
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

#: Everything `to_schedule` accepts: a Schedule, one kind message (e.g.
#: `ExponentialDecay`), a Keras `serialize()` dict or `{"class_name", "config"}` dict,
#: a Keras schedule object (anything with `get_config()`), or a number (Constant).
ScheduleLike = pb.Schedule | Message | Mapping[str, Any] | float | Any

_KERAS_MODULE = "keras.optimizers.schedules"
_LRCTL_MODULE = "lrctl.client.schedules"

# The kinds are read from the proto: one per field of the `Schedule.kind` oneof, named
# after its message (which is the Keras class name), with that message's fields. The
# builders below add only what the proto cannot say: the Keras argument order and
# defaults (their signatures, which the server applies too) and whether the kind is a
# Keras class (the builder takes Keras's ignored `name`). Help text is the proto's
# comments, as mypy-protobuf copies them into training_control_pb2.pyi.

# The default `name` Keras puts in get_config(), where it is not the class name.
_KERAS_DEFAULT_NAMES = {
    "PiecewiseConstantDecay": "PiecewiseConstant",
    "CosineDecayRestarts": "SGDRDecay",
}

@dataclass(frozen=True)
class Kind:
    class_name: str  # the proto message name: the Keras class name (or ours)
    oneof_field: str  # field name in Schedule.kind
    message: type[Message]
    args: tuple[Field, ...]  # the message's fields, in proto (= builder argument) order
    keras_name: str | None  # default `name` Keras puts in get_config(); None if not Keras

    @property
    def help(self) -> str:
        """`lrctl swap --help` text: the first sentence of the message's proto comment."""
        first, dot, _ = help_text(self.class_name, self.class_name).partition(". ")
        return first + dot.strip()

    @property
    def module(self) -> str:
        return _KERAS_MODULE if self.keras_name is not None else _LRCTL_MODULE

    @property
    def builder(self) -> Callable[..., pb.Schedule]:
        # The public builder named after the kind, or a keyword-only stand-in for a kind
        # added to the proto without one (tests/test_schedules_client.py flags that).
        return _public_builder(self.class_name) or (lambda **kw: _build(self.class_name, kw))


def _public_builder(class_name: str) -> Callable[..., pb.Schedule] | None:
    # The builders are defined below the table's code (they use it): look them up by name.
    builder: Callable[..., pb.Schedule] | None = globals().get(class_name)
    return builder if class_name in __all__ else None


def _kind_from_proto(oneof_field: FieldDescriptor) -> Kind:
    message = oneof_field.message_type
    assert message is not None, oneof_field.full_name  # each Schedule.kind is a message
    builder = _public_builder(message.name)
    params = inspect.signature(builder).parameters if builder is not None else {}

    def field(f: FieldDescriptor) -> Field:
        default = params[f.name].default if f.name in params else None
        required = default is inspect.Parameter.empty
        kind = field_kind(f)
        return Field(
            message.name, f.name, kind, required, None if required else default, f.has_presence
        )

    args = tuple(map(field, message.fields))
    keras_name = _KERAS_DEFAULT_NAMES.get(message.name, message.name) if "name" in params else None
    return Kind(message.name, oneof_field.name, GetMessageClass(message), args, keras_name)



def _build(class_name: str, values: Mapping[str, Any]) -> pb.Schedule:
    # `values` may hold more than the kind's fields (a builder's ignored `name`).
    kind = _BY_CLASS_NAME[class_name]
    message = kind.message()
    for field in kind.args:
        value = values.get(field.name)
        # None means "not given": Keras uses None for an unset warmup_target.
        if value is None:
            if field.required:
                raise _invalid(f"{kind.class_name}: missing required argument `{field.name}`.")
            continue
        set_field(message, field, value)
    schedule = pb.Schedule()
    getattr(schedule, kind.oneof_field).CopyFrom(message)
    return schedule


# --- builders mirroring keras.optimizers.schedules ---


def Constant(learning_rate: float) -> pb.Schedule:
    """A constant learning rate: `lr(step) = learning_rate` (not a Keras class)."""
    return _build("Constant", locals())


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
    return _build("ExponentialDecay", locals())


def PiecewiseConstantDecay(
    boundaries: Iterable[int], values: Iterable[float], name: str | None = None
) -> pb.Schedule:
    """`values[0]` while `step <= boundaries[0]`, `values[1]` up to `boundaries[1]`, ...

    `len(values)` must be `len(boundaries) + 1` (checked by the server). `name` is
    ignored.
    """
    return _build("PiecewiseConstantDecay", locals())


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
    return _build("PolynomialDecay", locals())


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
    return _build("InverseTimeDecay", locals())


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
    return _build("CosineDecay", locals())


def CosineDecayRestarts(
    initial_learning_rate: float,
    first_decay_steps: int,
    t_mul: float = 2.0,
    m_mul: float = 1.0,
    alpha: float = 0.0,
    name: str | None = None,
) -> pb.Schedule:
    """Cosine decay with warm restarts (SGDR), as in Keras. `name` is ignored."""
    return _build("CosineDecayRestarts", locals())


def PiecewiseLinear(knots: Iterable[tuple[int, float] | pb.Knot]) -> pb.Schedule:
    """Linear interpolation between `(step, learning_rate)` knots (not a Keras class).

    Before the first knot the LR is the first knot's, after the last it is the last
    knot's. Linear warmup then decay: `PiecewiseLinear([(0, 0.0), (100, 0.1), (1000, 0.001)])`.
    """
    return _build("PiecewiseLinear", locals())


KINDS = tuple(map(_kind_from_proto, pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"].fields))
_BY_CLASS_NAME = {k.class_name: k for k in KINDS}
_BY_ONEOF = {k.oneof_field: k for k in KINDS}
_BY_MESSAGE: dict[type[Message], Kind] = {k.message: k for k in KINDS}

#: The `class_name`s accepted by `from_keras_config`, in proto field order.
SUPPORTED_CLASS_NAMES: tuple[str, ...] = tuple(k.class_name for k in KINDS)


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
    return _build(kind.class_name, args)


def _kind_of(schedule: pb.Schedule) -> Kind:
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
    args: dict[str, Any] = {f.name: get_field(message, f) for f in kind.args}
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
    args = ", ".join(f"{k}={_format_value(v)}" for k, v in config["config"].items() if k != "name")
    return f"{config['class_name']}({args})"
