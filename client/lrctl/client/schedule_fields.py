"""The fields of a schedule kind, as the client sees them: read from the proto (types, and help
from its comments in the stub), and converted from Python values (types and shapes only; which
values are valid is the server's business)."""

from __future__ import annotations

import ast
import functools
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lrctl.client.errors import InvalidArgument
from lrctl.v1 import training_control_pb2 as pb

# Conversion problems are InvalidArgument (a ValueError too), never a bare ValueError.
_invalid = InvalidArgument.from_message

# How each proto field type converts (see set_field); repeated ones add an "s".
_SCALARS = {
    FieldDescriptor.CPPTYPE_DOUBLE: "float",
    FieldDescriptor.CPPTYPE_FLOAT: "float",
    FieldDescriptor.CPPTYPE_INT32: "int",
    FieldDescriptor.CPPTYPE_INT64: "int",
    FieldDescriptor.CPPTYPE_UINT32: "int",
    FieldDescriptor.CPPTYPE_UINT64: "int",
    FieldDescriptor.CPPTYPE_BOOL: "bool",
}

@functools.cache
def proto_docs() -> dict[str, str]:
    """`{"Message": doc, "Message.field": doc}`: the proto comments, from the stub."""
    try:
        tree = ast.parse(Path(pb.__file__).with_suffix(".pyi").read_text(encoding="utf-8"))
    except OSError:  # installed without the stub: help falls back to names
        return {}
    docs: dict[str, str] = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        docs[cls.name] = ast.get_docstring(cls) or ""
        for stmt, after in zip(cls.body, [*cls.body[1:], None]):
            match stmt, after:  # `field: type` and its docstring, or a documented property
                case ast.AnnAssign(target=ast.Name(id=name)), ast.Expr(
                    value=ast.Constant(value=str(doc))
                ):
                    docs[f"{cls.name}.{name}"] = doc
                case ast.FunctionDef(name=name, decorator_list=[ast.Attribute(attr="property")]), _:
                    docs[f"{cls.name}.{name}"] = ast.get_docstring(stmt) or ""
    return {key: " ".join(doc.split()) for key, doc in docs.items()}


# What `lrctl swap` expects for a list (see cli_parser._int_list, _float_list and _knots).
_CLI_FORMATS = {
    "ints": "Comma-separated, e.g. 100,200.",
    "floats": "Comma-separated, e.g. 0.1,0.01,0.001.",
    "knots": "Comma-separated STEP:LR pairs, e.g. 0:0.0,100:0.1.",
}


def help_text(key: str, fallback: str, suffix: str = "") -> str:
    # argparse formats help with %, so a literal % is doubled.
    return f"{proto_docs().get(key) or fallback} {suffix}".strip().replace("%", "%%")

@dataclass(frozen=True)
class Field:
    message: str  # the proto message this is a field of
    name: str
    kind: str  # from the proto type: "float" | "int" | "bool" | "ints" | "floats" | "knots"
    required: bool  # no default in the builder's signature
    default: Any  # the builder's (Keras) default; also what an unset `optional` field means
    presence: bool  # proto3 `optional` (explicit presence)

    @property
    def help(self) -> str:
        """`lrctl swap KIND --help` text; the CLI appends the default."""
        name = self.name.replace("_", " ")
        return help_text(f"{self.message}.{self.name}", name, _CLI_FORMATS.get(self.kind, ""))

def field_kind(field: FieldDescriptor) -> str:
    if field.message_type is pb.Knot.DESCRIPTOR and field.is_repeated:
        return "knots"
    kind = _SCALARS.get(field.cpp_type)
    if kind is None or (kind == "bool" and field.is_repeated):
        raise TypeError(f"lrctl.client.schedules cannot convert field {field.full_name}")
    return kind + "s" if field.is_repeated else kind

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


def set_field(message: Message, field: Field, value: Any) -> None:
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


def get_field(message: Message, field: Field) -> Any:
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
