"""Changes as resources, below gRPC: `Controller.get_change`, `Controller.list_changes` with a
filter (pages that cost what they hold, never a sort or a scan of the whole ledger), and the
conversions the servicer uses (names, views, page tokens bound to their filter). Pure Python on
tests/fakes.py's MemoryTarget: no TensorFlow, no server. tests/test_change_resources.py drives
the same through the real server and client."""

from __future__ import annotations

import base64

import pytest
from fakes import MemoryTarget

from lrctl.service.control import persistence
from lrctl.service.control.changes import (
    Change,
    ChangeRequest,
    ChangeStatus,
    Phase,
    PinLearningRate,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.filters import ChangeFilter, parse_filter
from lrctl.service.control.limits import DEDUP_WINDOW, LIST_SCAN_LIMIT
from lrctl.service.errors import InvalidArgumentError, NotFoundError
from lrctl.service.rpc import convert
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.specs import ActiveSchedule
from lrctl.v1 import training_control_pb2 as pb


def training(step: int = 10) -> Controller:
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))), run_id="run-a")
    controller.set_phase(Phase.TRAINING)
    controller.publish(step=step, learning_rate=0.1)
    return controller


def pin(rate: float, request_id: str = "", **fields: object) -> ChangeRequest:
    return ChangeRequest(PinLearningRate(rate), request_id=request_id, **fields)  # type: ignore[arg-type]


def every_page(controller: Controller, page_size: int, where: ChangeFilter | None = None) -> list[list[Change]]:
    pages, before = [], None
    while True:
        page, before = controller.list_changes(page_size, before, where=where)
        pages.append(page)
        if before is None:
            return pages


class Counting:
    """A filter that counts the records it is asked about: what a listing examined."""

    def __init__(self, text: str) -> None:
        self.inner, self.asked = parse_filter(text), 0
        self.text, self.request_id, self.version = text, None, None

    def matches(self, change: Change) -> bool:
        self.asked += 1
        return self.inner.matches(change)


def test_get_change_finds_pending_and_finished_changes_and_nothing_else() -> None:
    controller = training()
    applied = controller.submit(pin(0.05, "a"))
    pending = controller.submit(pin(0.02, "b", apply_at_step=100))
    controller.apply_due(10)
    assert controller.get_change(pending.id) == pending
    got = controller.get_change(applied.id)
    assert (got.id, got.status, got.version) == (applied.id, ChangeStatus.APPLIED, 1)
    validated = controller.submit(pin(0.5), validate_only=True)
    for unknown in (validated.id, pending.id + 100, 0, -1):
        with pytest.raises(NotFoundError, match=f"no change {unknown} is known"):
            controller.get_change(unknown)


def test_a_filter_pages_through_its_matches_newest_first() -> None:
    controller = training()
    ids = {}
    for i in range(9):
        ids[i] = controller.submit(pin(0.01 * (i + 1), f"r{i}", apply_at_step=None if i % 3 else 1000)).id
        controller.apply_due(10)  # i % 3 == 0 stays pending (due at step 1000), the others apply
    where = parse_filter("status = PENDING")
    pages = every_page(controller, 2, where)
    assert [[c.id for c in page] for page in pages] == [[ids[6], ids[3]], [ids[0]]]
    applied = [c for page in every_page(controller, 4, parse_filter("status = APPLIED AND version >= 3"))
               for c in page]
    assert [c.version for c in applied] == [6, 5, 4, 3]
    assert [c.id for page in every_page(controller, 3) for c in page] == sorted(ids.values(), reverse=True)
    # Equality on a request id or a version is one index lookup: a page of at most one change.
    assert controller.list_changes(5, where=parse_filter('request_id = "r4"')) == \
        ([controller.get_change(ids[4])], None)
    assert controller.list_changes(5, where=parse_filter("version = 2"))[0][0].request.request_id == "r2"
    assert controller.list_changes(5, where=parse_filter('request_id = "r4" AND status = PENDING')) == ([], None)
    assert controller.list_changes(5, ids[4], where=parse_filter('request_id = "r4"')) == ([], None)
    assert controller.list_changes(5, where=parse_filter('request_id = "nobody"')) == ([], None)
    with pytest.raises(InvalidArgumentError, match="page_size"):
        controller.list_changes(0)


def _remembered(count: int) -> dict[str, object]:
    """A checkpoint's control state with `count` applied changes remembered, one in a hundred
    of them cancelled instead."""
    schedule = ActiveSchedule(Constant(0.1))
    finished = []
    for i in range(1, count + 1):
        status = ChangeStatus.CANCELLED if i % 100 == 0 else ChangeStatus.APPLIED
        finished.append(Change(
            id=i, request=pin(0.1, f"r{i}"), status=status, requested_step=i, requested_time=float(i),
            version=i if status is ChangeStatus.APPLIED else 0, applied_time=float(i),
            applied_step=i if status is ChangeStatus.APPLIED else None,
            schedule_after=schedule if status is ChangeStatus.APPLIED else None))
    return persistence.state_to_json(run_id="run-a", step=count, epoch=0, schedule=schedule, version=count,
                                     pending=[], finished=finished, history=finished[-5:], replay=[],
                                     wal_seq=0)


def test_a_page_examines_what_it_returns_not_the_whole_ledger() -> None:
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))), run_id="run-a")
    controller.import_state(_remembered(11_000))  # a resume: the window keeps the newest 10,000
    controller.set_phase(Phase.TRAINING)
    pending = [controller.submit(pin(0.1, f"p{i}", apply_at_step=10**6)) for i in range(3)]
    known = DEDUP_WINDOW + len(pending)

    everything = Counting("")
    page, before = controller.list_changes(50, where=everything)  # type: ignore[arg-type]
    assert [c.id for c in page[:3]] == [c.id for c in reversed(pending)]
    assert everything.asked == 50 and before == page[-1].id
    page, _ = controller.list_changes(50, before, where=everything)  # type: ignore[arg-type]
    assert everything.asked == 100 and page[0].id == before - 1

    # A selective filter: each call examines at most LIST_SCAN_LIMIT records and says where to
    # go on, with a short (even empty) page; together the pages hold every match, once.
    cancelled = Counting("status = CANCELLED")
    pages, before, calls = [], None, 0
    while True:
        asked = cancelled.asked
        page, before = controller.list_changes(50, before, where=cancelled)  # type: ignore[arg-type]
        calls += 1
        assert cancelled.asked - asked <= LIST_SCAN_LIMIT
        pages.append(page)
        if before is None:
            break
    found = [c.id for page in pages for c in page]
    assert found == list(range(11_000, 1_000, -100)) and len(found) == 100
    assert cancelled.asked == known  # each record examined once over all the pages
    assert calls >= known // LIST_SCAN_LIMIT
    # The forgotten ones are gone from listings and lookups alike.
    assert controller.list_changes(50, where=parse_filter('request_id = "r1000"')) == ([], None)
    with pytest.raises(NotFoundError):
        controller.get_change(1000)
    assert controller.get_change(1001).request.request_id == "r1001"


def test_changes_the_window_forgets_leave_the_listing_as_new_ones_finish() -> None:
    controller = Controller(MemoryTarget(ActiveSchedule(Constant(0.1))), run_id="run-a")
    controller.import_state(_remembered(DEDUP_WINDOW))
    controller.set_phase(Phase.TRAINING)
    controller.publish(step=DEDUP_WINDOW, learning_rate=0.1)
    for i in range(3):
        controller.submit(pin(0.2, f"new{i}"))
    controller.apply_due(DEDUP_WINDOW)
    ids = [c.id for page in every_page(controller, 100) for c in page]
    assert len(ids) == DEDUP_WINDOW and ids == sorted(ids, reverse=True)
    assert ids[-1] == 4 and ids[0] == DEDUP_WINDOW + 3  # 1..3 forgotten
    with pytest.raises(NotFoundError):
        controller.get_change(3)


# -- the conversions the servicer uses ---------------------------------------------------------
def test_change_names() -> None:
    assert convert.change_name(7) == "changes/7"
    assert convert.parse_change_name("changes/7") == 7
    assert convert.parse_change_name(convert.change_name(2**63 - 1)) == 2**63 - 1
    with pytest.raises(InvalidArgumentError, match="must be set") as info:
        convert.parse_change_name("")
    assert info.value.field == "name"
    for bad in ("changes/0", "changes/-1", "changes/07", "changes/x", "changes/7/", "change/7", "7",
                " changes/7", "changes/1e3", f"changes/{2**63}", "changes/٣"):
        with pytest.raises(InvalidArgumentError, match='"changes/{id}"') as info:
            convert.parse_change_name(bad, "request.name")
        assert info.value.field == "request.name"


def test_a_change_carries_its_name_unless_it_is_only_validated() -> None:
    controller = training()
    queued = controller.submit(pin(0.05, "a"))
    assert convert.change_to_proto(queued).name == f"changes/{queued.id}"
    validated = controller.submit(pin(0.05), validate_only=True)
    assert convert.change_to_proto(validated).name == ""


def test_the_basic_view_leaves_out_the_change_lists() -> None:
    controller = training()
    controller.submit(pin(0.05))
    controller.apply_due(10)
    controller.submit(pin(0.02, apply_at_step=100))
    snap = controller.snapshot()
    full = convert.state_to_proto(snap)
    assert len(full.pending_changes) == 1 and len(full.recent_changes) == 1
    assert full.pending_changes[0].name and full.recent_changes[0].name
    for view in (pb.STATE_VIEW_UNSPECIFIED, pb.STATE_VIEW_FULL):
        assert convert.state_to_proto(snap, view=view) == full
    basic = convert.state_to_proto(snap, view=pb.STATE_VIEW_BASIC)
    assert not basic.pending_changes and not basic.recent_changes
    assert (basic.step, basic.learning_rate, basic.phase, basic.version, basic.pending_count) == \
        (full.step, full.learning_rate, full.phase, full.version, full.pending_count)
    with pytest.raises(InvalidArgumentError) as info:
        convert.state_to_proto(snap, view=7)
    assert info.value.field == "view"


def test_a_page_token_is_bound_to_its_run_and_its_filter() -> None:
    token = convert.encode_page_token(42, "run-a")
    assert convert.decode_page_token(token, "run-a") == 42
    # Tokens issued before filters existed read the same.
    assert convert.decode_page_token(base64.urlsafe_b64encode(b"run:a:42").decode(), "run:a") == 42
    filtered = convert.encode_page_token(42, "run-a", "status = PENDING")
    assert convert.decode_page_token(filtered, "run-a", "status = PENDING") == 42
    for other_filter, used in (("status = APPLIED", filtered), ("", filtered), ("status = PENDING", token)):
        with pytest.raises(InvalidArgumentError, match="same filter") as info:
            convert.decode_page_token(used, "run-a", other_filter)
        assert info.value.field == "page_token"
    for foreign in (convert.encode_page_token(42, "run-b", "status = PENDING"), "not-a-token", "",
                    base64.urlsafe_b64encode("run-a:٣".encode()).decode()):
        with pytest.raises(InvalidArgumentError, match="of this run") as info:
            convert.decode_page_token(foreign, "run-a", "status = PENDING")
        assert info.value.field == "page_token"
