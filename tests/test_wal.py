"""The write-ahead log: its file format, that every acceptance and ending
is durable before it is answered, and the controller's replay after a crash. Pure Python: the
controller runs on tests/fakes.py's MemoryTarget."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import MemoryTarget

from lrctl.service.control.changes import (
    Change,
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    ScaleLearningRate,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.wal import WriteAheadLog, after
from lrctl.service.errors import (
    FailedPreconditionError,
    UnavailableError,
    VersionConflictError,
)
from lrctl.service.rpc.journal import Journal, read
from lrctl.service.schedules import specs

_START = specs.ActiveSchedule(specs.Constant(0.1))


# --- the file ---


def test_append_numbers_records_and_open_reads_them_back(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal.jsonl", lineage="L")
    assert log.append([{"a": 1}, {"a": 2}]) == 2 and log.append([{"a": 3}]) == 3
    log.close()
    again = WriteAheadLog(tmp_path / "wal.jsonl")
    assert [(r["seq"], r["lineage"], r["a"]) for r in again.records] == [(1, "L", 1), (2, "L", 2), (3, "L", 3)]
    assert again.seq == 3 and again.append([{"a": 4}]) == 4


@pytest.mark.parametrize("tail", [b'{"seq": 3, "lineage": "L", "a"', b"\x00\x00\x00\n", b'{"seq": 3, "a": 3\n'])
def test_a_torn_tail_is_truncated_on_open_and_logged(tmp_path: Path, tail: bytes,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "wal.jsonl"
    log = WriteAheadLog(path, lineage="L")
    log.append([{"a": 1}, {"a": 2}])
    log.close()
    clean = path.read_bytes()
    with open(path, "ab") as f:
        f.write(tail)  # a kill during a write: never fsynced, never answered
    with caplog.at_level(logging.WARNING, logger="lrctl.wal"):
        again = WriteAheadLog(path)
    assert [r["a"] for r in again.records] == [1, 2]
    assert "truncating" in caplog.text and str(path) in caplog.text
    assert path.read_bytes() == clean
    # The next record starts on a clean line: it is not glued to the torn one.
    again.append([{"a": 3}])
    again.close()
    assert [r["a"] for r in WriteAheadLog(path).records] == [1, 2, 3]


def test_a_failed_append_counts_for_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "wal.jsonl"
    log = WriteAheadLog(path)
    log.append([{"a": 1}])

    fsync = os.fsync
    calls: list[int] = []

    def full_once(fd: int) -> None:  # the write's fsync fails; the cut back succeeds
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr("lrctl.service.control.wal.os.fsync", full_once)
    with pytest.raises(OSError):
        log.append([{"a": 2}, {"a": 3}])
    monkeypatch.undo()
    assert log.seq == 1 and log.append([{"a": 4}]) == 2
    assert [(r["seq"], r["a"]) for r in WriteAheadLog(path).records] == [(1, 1), (2, 4)]


def test_a_batch_that_cannot_be_cut_back_refuses_every_later_append(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = WriteAheadLog(tmp_path / "wal.jsonl")

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("lrctl.service.control.wal.os.fsync", broken)
    with pytest.raises(OSError):
        log.append([{"a": 1}])
    monkeypatch.undo()
    with pytest.raises(OSError, match="unusable since an earlier write failed"):
        log.append([{"a": 2}])


def test_compact_keeps_what_it_is_told_atomically(tmp_path: Path) -> None:
    path = tmp_path / "wal.jsonl"
    log = WriteAheadLog(path, lineage="L")
    log.append([{"a": i} for i in range(5)])
    assert log.compact(lambda r: r["seq"] > 3) == 3
    log.append([{"a": 9}])
    assert [r["seq"] for r in WriteAheadLog(path).records] == [4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wal.jsonl"]


def test_the_journal_ends_a_torn_line_before_appending(tmp_path: Path) -> None:
    """A torn last line used to swallow the next record: both became one unparsable line."""
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.record(event="first")
    journal.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"time": "x", "event": "to')  # a crash mid-line
    journal = Journal(path)
    journal.record(event="second")
    journal.close()
    assert [e["event"] for e in read(path)] == ["first", "second"]


# --- the controller writes before it answers ---


class _Log:
    """A write-ahead log that records what it was given, in order, among the engine's loads;
    `fail` makes it refuse like a full disk."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.records: list[Mapping[str, Any]] = []
        self.fail = False

    @property
    def seq(self) -> int:
        return len(self.records)

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.records.extend(records)
        self.events.append(("wal", [(r["change"]["request"]["request_id"], r["change"]["status"])
                                    for r in records]))
        return self.seq


class _Target(MemoryTarget):
    def __init__(self, events: list[tuple[str, Any]]) -> None:
        super().__init__(_START)
        self.events = events

    def load(self, state: specs.ActiveSchedule, version: int) -> None:
        self.events.append(("load", version))
        super().load(state, version)


def _logged() -> tuple[Controller, _Log, list[tuple[str, Any]]]:
    events: list[tuple[str, Any]] = []
    controller = Controller(_Target(events))
    log = _Log(events)
    controller.wal = log
    return controller, log, events


def test_acceptance_and_application_are_logged_before_they_are_answered() -> None:
    events: list[tuple[str, Any]] = []
    target = _Target(events)
    controller = Controller(target)
    controller.wal = _Log(events)
    pending = controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    assert events == [("wal", [("a", "pending")])] and pending.status is ChangeStatus.PENDING

    seen: list[ChangeStatus] = []
    original = target.load

    def load(state: specs.ActiveSchedule, version: int) -> None:  # nobody has been told yet
        seen.append(controller.list_changes(10)[0][0].status)
        original(state, version)

    target.load = load  # type: ignore[method-assign]
    (applied,) = controller.apply_due(3)
    assert events == [("wal", [("a", "pending")]), ("wal", [("a", "applied")]), ("load", 1)]
    assert seen == [ChangeStatus.PENDING] and (applied.version, applied.applied_step) == (1, 3)
    controller.submit(ChangeRequest(PinLearningRate(0.3), request_id="b"))
    controller.cancel(request_id="b")
    assert events[-2:] == [("wal", [("b", "pending")]), ("wal", [("b", "cancelled")])]


def test_a_refused_write_answers_unavailable_and_queues_nothing() -> None:
    controller, log, events = _logged()
    log.fail = True
    with pytest.raises(UnavailableError, match="write-ahead log"):
        controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    assert controller.list_changes(10)[0] == [] and controller.snapshot().pending_count == 0
    assert controller.apply_due(5) == [] and events == []
    log.fail = False  # the disk has room again: the retry is a first attempt
    assert controller.submit(ChangeRequest(PinLearningRate(0.2), request_id="a")).status is ChangeStatus.PENDING

    log.fail = True
    with pytest.raises(UnavailableError):
        controller.cancel(request_id="a")
    assert controller.snapshot().pending_count == 1


def test_a_refused_write_at_a_boundary_keeps_the_change_pending_until_the_next() -> None:
    controller, log, events = _logged()
    controller.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="a"))
    log.fail = True
    assert controller.apply_due(3) == []
    assert controller.snapshot().version == 0 and ("load", 1) not in events
    assert [c.status for c in controller.list_changes(10)[0]] == [ChangeStatus.PENDING]
    log.fail = False
    (applied,) = controller.apply_due(4)
    assert (applied.status, applied.version, applied.applied_step) == (ChangeStatus.APPLIED, 1, 4)
    assert events[-2:] == [("wal", [("a", "applied")]), ("load", 1)]


# --- replay ---


def _same(change: Change) -> tuple[object, ...]:
    return (change.id, change.status, change.version, change.applied_step, change.learning_rate_after,
            change.schedule_after, change.request)


def test_replay_puts_back_pending_changes_and_reapplies_applied_ones_at_their_step(tmp_path: Path) -> None:
    path = tmp_path / "wal.jsonl"
    first = Controller(MemoryTarget(_START))
    first.wal = WriteAheadLog(path, lineage="L")
    first.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    first.apply_due(2)
    first.publish(step=3, learning_rate=0.2)
    checkpoint = json.loads(json.dumps(first.export_state(3)))
    engine_at_checkpoint = first.engine_state
    first.submit(ChangeRequest(ScaleLearningRate(0.5), request_id="b"))
    first.submit(ChangeRequest(PinLearningRate(0.3), apply_at_step=8, request_id="c"))
    first.submit(ChangeRequest(PinLearningRate(0.05), apply_at_step=100, request_id="d"))
    first.submit(ChangeRequest(PinLearningRate(0.9), request_id="e"))
    first.cancel(request_id="e")
    first.apply_due(5)
    first.apply_due(8)
    first.submit(ChangeRequest(PinLearningRate(0.07), request_id="f"))
    answered = {c.request.request_id: c for c in first.list_changes(100)[0]}
    # A crash here: the checkpoint at step 3 and the log are all that is left.

    target = MemoryTarget(engine_at_checkpoint[0])
    target.version = engine_at_checkpoint[1]
    second = Controller(target)
    second.import_state(checkpoint)
    records = WriteAheadLog(path).records
    assert second.replay(after(records, checkpoint["wal_seq"], "L")) == 5  # b..f

    # The ledger holds every answer as it was given; retries return them.
    assert {rid: _same(c) for rid, c in answered.items()} == {
        c.request.request_id: _same(c) for c in second.list_changes(100)[0]}
    for rid in "abcdef":
        assert _same(second.submit(answered[rid].request)) == _same(answered[rid])
    assert [c.request.request_id for c in second.snapshot().pending] == ["d", "f"]
    # Clients see the newest version acknowledged (3), never an older one, while the engine
    # holds the checkpoint's (1) until training reaches the replays' steps.
    assert second.snapshot().version == 3 and second.engine_state[1] == 1
    # A change meets the state after the replays and the pending f (0.07), not the
    # checkpoint's (0.2): 0.07 -> 0.04 is within a factor of 2, 0.2 -> 0.04 is not.
    second.guardrails = dataclasses.replace(second.guardrails, max_change_factor=2.0)
    second.submit(ChangeRequest(PinLearningRate(0.04), expected_version=3), validate_only=True)
    second.guardrails = dataclasses.replace(second.guardrails, max_change_factor=None)

    # A new change cannot land among the steps being replayed; it meets the last replay's version.
    with pytest.raises(FailedPreconditionError, match="until step 8") as refused:
        second.submit(ChangeRequest(PinLearningRate(0.01), apply_at_step=7, request_id="g"))
    assert refused.value.field == "apply_at_step"
    with pytest.raises(VersionConflictError):
        second.submit(ChangeRequest(PinLearningRate(0.01), expected_version=1), validate_only=True)
    second.submit(ChangeRequest(PinLearningRate(0.01), expected_version=3), validate_only=True)

    # Training repeats steps 3.. : each replay lands at its step with its version, nothing else.
    assert not second.at_boundary(4) and second.apply_due(4) == []
    assert second.apply_due(5) == [] and target.read() == (answered["b"].schedule_after, 2)
    assert second.snapshot().version == 3  # never goes back while the replays land
    (applied,) = second.apply_due(8)
    assert target.read()[1] == 4 and (applied.request.request_id, applied.version) == ("f", 4)
    assert second.snapshot().version == 4
    versions = [c.version for c in second.list_changes(100)[0] if c.version]
    assert sorted(versions) == [1, 2, 3, 4]  # never handed out twice
    assert second.submit(ChangeRequest(PinLearningRate(0.02))).id > max(c.id for c in answered.values())


def test_outstanding_replays_survive_a_checkpoint_taken_among_them(tmp_path: Path) -> None:
    first = Controller(MemoryTarget(_START))
    first.wal = WriteAheadLog(tmp_path / "wal.jsonl", lineage="L")
    checkpoint = json.loads(json.dumps(first.export_state(0)))
    first.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    first.apply_due(2)
    first.submit(ChangeRequest(PinLearningRate(0.3), request_id="b"))
    first.apply_due(6)

    second = Controller(MemoryTarget(_START))
    second.import_state(checkpoint)
    second.replay(after(WriteAheadLog(tmp_path / "wal.jsonl").records, 0, "L"))
    second.apply_due(2)
    again = json.loads(json.dumps(second.export_state(4)))  # b is still to be re-applied at 6
    assert again["replay"] == [2]

    target = MemoryTarget(second.engine_state[0])
    target.version = 1
    third = Controller(target)
    third.import_state(again)
    assert third.apply_due(5) == [] and target.version == 1
    third.apply_due(6)
    assert target.read() == (specs.ActiveSchedule(specs.Constant(0.3), specs.Origin.RESTART, 6), 2)


def test_a_seq_is_never_handed_out_twice_even_after_compacting_everything(tmp_path: Path) -> None:
    path = tmp_path / "wal.jsonl"
    log = WriteAheadLog(path, lineage="L")
    assert log.append([{"n": 1}, {"n": 2}, {"n": 3}]) == 3
    log.compact(lambda record: False)  # every record is in a checkpoint: only the last stays
    log.close()
    again = WriteAheadLog(path, lineage="L")
    assert [r["seq"] for r in again.records] == [3]
    again.advance(7)  # a checkpoint said it includes records up to 7
    assert again.append([{"n": 4}]) == 8
    again.close()
    with pytest.raises(OSError):  # a closed log refuses like a disk that refuses
        again.append([{"n": 5}])


def test_a_restore_during_the_replay_window_never_reuses_a_replayed_version(tmp_path: Path) -> None:
    first = Controller(MemoryTarget(_START))
    first.wal = WriteAheadLog(tmp_path / "wal.jsonl", lineage="L")
    checkpoint = json.loads(json.dumps(first.export_state(0)))
    first.submit(ChangeRequest(PinLearningRate(0.2), request_id="a"))
    first.apply_due(5)
    second = Controller(MemoryTarget(_START))
    second.import_state(checkpoint)
    second.replay(after(WriteAheadLog(tmp_path / "wal.jsonl").records, 0, "L"))
    # A change meets the replayed state (0.2), not the checkpoint's (0.1): 0.2 -> 0.3 is within
    # a factor of 2, 0.1 -> 0.3 is not.
    second.guardrails = dataclasses.replace(second.guardrails, max_change_factor=2.0)
    second.submit(ChangeRequest(PinLearningRate(0.3)), validate_only=True)
    restored = second.restored(specs.ActiveSchedule(specs.Constant(0.4)), 0, step=1)
    assert restored == 2  # above the replay's version 1, which stays its own
