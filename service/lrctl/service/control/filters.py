"""ListChanges filters (AIP-160, the small subset the proto names): conditions joined by AND,
each on a change's status, version or request id, e.g. `status = APPLIED AND version >= 12`.

Parsed once per call into a `ChangeFilter`, which the ledger's listing applies record by
record; its `request_id` and `version` say when one index lookup can answer the whole filter.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrctl.service.control.changes import Change, ChangeStatus
from lrctl.service.control.limits import MAX_FILTER_BYTES
from lrctl.service.errors import InvalidArgumentError

_ALLOWED = ('conditions joined by AND, each `status = NAME` (or !=; NAME a ChangeStatus such as '
            'PENDING or CHANGE_STATUS_APPLIED), `version OP N` (OP one of >=, >, <=, <, =, !=; N an '
            'integer) or `request_id = "ID"` (or !=)')
_TOKEN = re.compile(r'\s*(?:(?P<word>[A-Za-z_]\w*)|(?P<op>>=|<=|!=|=|<|>)|(?P<int>[-+]?\d+)'
                    r'|(?P<str>"(?:[^"\\]|\\.)*")|(?P<bad>\S))')
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_EQUALITY = frozenset({"=", "!="})
_STATUSES = {status.name: status for status in ChangeStatus}
_FIELDS: dict[str, Callable[[Change], object]] = {
    "status": operator.attrgetter("status"), "version": operator.attrgetter("version"),
    "request_id": operator.attrgetter("request.request_id")}


def _test(get: Callable[[Change], Any], op: Callable[[Any, Any], bool], value: object,
          change: Change) -> bool:
    return op(get(change), value)


@dataclass(frozen=True)
class Condition:
    field: str  #: "status", "version" or "request_id"
    op: str  #: one of _OPS
    value: ChangeStatus | int | str


@dataclass(frozen=True)
class ChangeFilter:
    """A parsed filter: `text` as given, and its conditions (none: every change matches)."""

    text: str = ""
    conditions: tuple[Condition, ...] = ()

    #: `matches`, bound once: a listing tests up to a thousand records under the controller's
    #: lock, so each condition's getter and operator are not looked up per record.
    _test: Callable[[Change], bool] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tests = [functools.partial(_test, _FIELDS[c.field], _OPS[c.op], c.value) for c in self.conditions]
        object.__setattr__(self, "_test", tests[0] if len(tests) == 1 else
                           (lambda change: all(test(change) for test in tests)))

    def matches(self, change: Change) -> bool:
        return self._test(change)

    def _equal(self, field: str) -> object | None:
        return next((c.value for c in self.conditions if c.field == field and c.op == "="), None)

    @property
    def request_id(self) -> str | None:
        """The request id every match has, if a condition fixes one (an index answers it)."""
        value = self._equal("request_id")
        return value if isinstance(value, str) else None

    @property
    def version(self) -> int | None:
        """The version every match has, if a condition fixes one."""
        value = self._equal("version")
        return value if isinstance(value, int) else None


def parse_filter(text: str) -> ChangeFilter:
    """Parse a ListChanges filter; "" (or blanks) matches every change. Raises
    InvalidArgumentError naming `filter`, saying what is allowed."""
    if len(text.encode()) > MAX_FILTER_BYTES:
        raise InvalidArgumentError("filter", f"must be at most {MAX_FILTER_BYTES} bytes",
                                   f"{len(text.encode())} bytes")
    tokens = _tokens(text)
    conditions: list[Condition] = []
    while tokens:
        if conditions:
            kind, value = tokens.pop(0)
            if kind != "word" or value.upper() != "AND":
                raise _invalid(f"expected AND, got {value!r}", text)
        conditions.append(_condition(tokens, text))
    return ChangeFilter(text, tuple(conditions))


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind is None:
            continue  # trailing blanks
        if kind == "bad":
            raise _invalid(f"unexpected {match.group(kind)!r}", text)
        tokens.append((kind, match.group(kind)))
    return tokens


def _condition(tokens: list[tuple[str, str]], text: str) -> Condition:
    if len(tokens) < 3:
        raise _invalid("a condition is incomplete", text)
    (field_kind, field), (op_kind, op), (value_kind, raw) = tokens[:3]
    del tokens[:3]
    if field_kind != "word" or field not in ("status", "version", "request_id"):
        raise _invalid(f"unknown field {field!r}", text)
    if op_kind != "op" or (field != "version" and op not in _EQUALITY):
        raise _invalid(f"{field} cannot be compared with {op!r}", text)
    if field == "status":
        name = (raw[1:-1] if value_kind == "str" else raw).upper().removeprefix("CHANGE_STATUS_")
        if value_kind not in ("word", "str") or name not in _STATUSES:
            raise _invalid(f"unknown status {raw!r} (one of {', '.join(_STATUSES)})", text)
        return Condition(field, op, _STATUSES[name])
    if field == "version":
        if value_kind != "int" or not -(2**63) <= int(raw) < 2**63:
            raise _invalid(f"version must be compared with an int64 integer, not {raw!r}", text)
        return Condition(field, op, int(raw))
    if value_kind != "str":
        raise _invalid(f'request_id must be compared with a double-quoted string, not {raw!r}', text)
    return Condition(field, op, re.sub(r"\\(.)", r"\1", raw[1:-1]))


def _invalid(problem: str, text: str) -> InvalidArgumentError:
    return InvalidArgumentError("filter", f"must be {_ALLOWED}: {problem}", repr(text[:200]))


__all__ = ["ChangeFilter", "Condition", "parse_filter"]
