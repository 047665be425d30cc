"""ListChanges filters (`lrctl.service.control.filters`): what parses, what each condition
matches, and that anything else is refused naming `filter` and saying what is allowed. Pure
Python: no TensorFlow, no gRPC."""

from __future__ import annotations

import pytest

from lrctl.service.control.changes import Change, ChangeRequest, ChangeStatus, PinLearningRate
from lrctl.service.control.filters import parse_filter
from lrctl.service.control.limits import MAX_FILTER_BYTES
from lrctl.service.errors import InvalidArgumentError


def change(status: ChangeStatus, version: int = 0, request_id: str = "") -> Change:
    return Change(id=1, request=ChangeRequest(PinLearningRate(0.1), request_id=request_id), status=status,
                  requested_step=0, requested_time=0.0, version=version)


PENDING = change(ChangeStatus.PENDING, request_id="a")
APPLIED_3 = change(ChangeStatus.APPLIED, 3, request_id='say "hi"')
APPLIED_12 = change(ChangeStatus.APPLIED, 12)
CANCELLED = change(ChangeStatus.CANCELLED, request_id="b")
ALL = [PENDING, APPLIED_3, APPLIED_12, CANCELLED]

MATCHES = [
    ("", ALL),
    ("   ", ALL),
    ("status = PENDING", [PENDING]),
    ("status=pending", [PENDING]),
    ("status = CHANGE_STATUS_APPLIED", [APPLIED_3, APPLIED_12]),
    ('status = "cancelled"', [CANCELLED]),
    ("status != APPLIED", [PENDING, CANCELLED]),
    ("version >= 12", [APPLIED_12]),
    ("version > 3", [APPLIED_12]),
    ("version <= 3", [PENDING, APPLIED_3, CANCELLED]),
    ("version < 3", [PENDING, CANCELLED]),
    ("version = 3", [APPLIED_3]),
    ("version != 0", [APPLIED_3, APPLIED_12]),
    ('request_id = "a"', [PENDING]),
    (r'request_id = "say \"hi\""', [APPLIED_3]),
    ('request_id != ""', [PENDING, APPLIED_3, CANCELLED]),
    ("status = APPLIED AND version >= 12", [APPLIED_12]),
    ("status = applied and version > 0 AnD version < 12", [APPLIED_3]),
    ('status = APPLIED AND request_id = "a"', []),
]


@pytest.mark.parametrize(("text", "expected"), MATCHES)
def test_a_filter_matches_what_it_says(text: str, expected: list[Change]) -> None:
    where = parse_filter(text)
    assert where.text == text
    assert [c for c in ALL if where.matches(c)] == expected


def test_equality_on_request_id_or_version_is_exposed_for_the_index() -> None:
    assert parse_filter('status = PENDING AND request_id = "x"').request_id == "x"
    assert parse_filter('request_id != "x"').request_id is None
    assert parse_filter("version = 7 AND status = APPLIED").version == 7
    assert parse_filter("version >= 7").version is None
    assert (parse_filter("").request_id, parse_filter("").version) == (None, None)


BAD = [
    ("status > PENDING", "status cannot be compared with '>'"),
    ("status = DONE", "unknown status 'DONE'"),
    ("status = 3", "unknown status '3'"),
    ("version >= x", "version must be compared with an int64 integer, not 'x'"),
    ('version >= "3"', "version must be compared with an int64 integer"),
    ("version >= 123456789012345678901234", "version must be compared with an int64 integer"),
    ("version >= 9223372036854775808", "version must be compared with an int64 integer"),
    ("request_id = abc", "request_id must be compared with a double-quoted string"),
    ('request_id > "a"', "request_id cannot be compared with '>'"),
    ('color = "red"', "unknown field 'color'"),
    ("status = PENDING OR version = 3", "expected AND, got 'OR'"),
    ("status = PENDING AND", "a condition is incomplete"),
    ("status =", "a condition is incomplete"),
    ("version >= 1 version <= 3", "expected AND, got 'version'"),
    ('request_id = "unterminated', "unexpected '\"'"),
    ("status = PENDING;", "unexpected ';'"),
    ("version => 3", "version must be compared with an int64 integer, not '>'"),
    ("(status = PENDING)", "unexpected '('"),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_anything_else_is_refused_naming_filter_and_saying_what_is_allowed(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_filter(text)
    assert info.value.field == "filter"
    assert problem in str(info.value)
    message = str(info.value)
    assert "conditions joined by AND" in message and "`version OP N`" in message
    assert message.endswith(f"Received: filter={text!r}")


def test_a_filter_longer_than_the_limit_is_refused_before_it_is_read() -> None:
    text = "status = PENDING AND " * (MAX_FILTER_BYTES // 10)
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_FILTER_BYTES} bytes") as info:
        parse_filter(text)
    assert info.value.field == "filter"
