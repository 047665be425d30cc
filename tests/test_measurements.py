"""The measurements ring (control/measurements.py) and its wiring into the controller: what is
recorded, pages by sequence number, the bound, `truncated`, and the counter across a restart.
No TensorFlow, no gRPC: a small ring and explicit clocks."""

from __future__ import annotations

import json

from fakes import MemoryTarget

from lrctl.service.control.changes import ChangeRequest, PinLearningRate
from lrctl.service.control.controller import Controller
from lrctl.service.control.limits import MAX_MEASUREMENTS
from lrctl.service.control.measurements import Measurements
from lrctl.service.schedules import specs


def _filled(ring: Measurements, count: int, *, first_step: int = 1) -> None:
    for i in range(count):
        ring.epoch_end(step=first_step + i, epoch=i, metrics={"loss": float(i)}, time=1000.0 + i)


def test_batches_are_throttled_but_a_change_and_epoch_ends_always_record() -> None:
    ring = Measurements(capacity=100, interval=1.0)
    record = ring.batch
    assert record(step=1, epoch=0, metrics={"loss": 1.0}, time=0, now=10.0, changed_step=-1) is not None
    assert record(step=2, epoch=0, metrics={"loss": 1.0}, time=0, now=10.5, changed_step=-1) is None
    assert record(step=3, epoch=0, metrics={}, time=0, now=12.0, changed_step=-1) is None  # no logs
    assert record(step=4, epoch=0, metrics={"loss": 1.0}, time=0, now=12.0, changed_step=-1) is not None
    # A change applied at step 4: logs taken at step 4 came before it; the first after it records.
    assert record(step=4, epoch=0, metrics={"loss": 1.0}, time=0, now=12.1, changed_step=4) is None
    after = record(step=5, epoch=0, metrics={"loss": 0.5}, time=0, now=12.2, changed_step=4)
    assert after is not None and after.step == 5 and not after.epoch_end
    assert record(step=6, epoch=0, metrics={"loss": 0.5}, time=0, now=12.3, changed_step=4) is None
    end = ring.epoch_end(step=6, epoch=0, metrics={"loss": 0.4, "val_loss": 0.6}, time=0)
    assert end.epoch_end and end.metrics["val_loss"] == 0.6
    assert [m.sequence for m in ring.page(None, 0, 10).items] == [1, 2, 3, 4]
    assert ring.last_sequence == 4


def test_pages_follow_tokens_and_miss_nothing() -> None:
    ring = Measurements(capacity=50)
    _filled(ring, 23)
    seen, after = [], None
    while True:
        page = ring.page(after, 0, 5)
        assert not page.truncated
        seen += [m.sequence for m in page.items]
        if not page.items:
            break
        after = page.after_sequence
    assert seen == list(range(1, 24))
    assert ring.page(after, 0, 5).after_sequence == 23  # nothing newer: the reader stays put
    _filled(ring, 2, first_step=24)
    assert [m.sequence for m in ring.page(after, 0, 5).items] == [24, 25]


def test_start_step_filters_and_a_first_page_starts_there() -> None:
    ring = Measurements(capacity=50)
    _filled(ring, 20)  # steps 1..20
    page = ring.page(None, 15, 3)
    assert [m.step for m in page.items] == [15, 16, 17] and not page.truncated
    assert [m.step for m in ring.page(page.after_sequence, 15, 10).items] == [18, 19, 20]
    nothing = ring.page(None, 100, 10)
    assert nothing.items == [] and nothing.after_sequence == 20
    # A token with a start_step: earlier steps are skipped, and a page examines at most its size.
    page = ring.page(0, 10, 4)
    assert page.items == [] and page.after_sequence == 4


def test_the_ring_is_bounded_and_says_what_a_reader_missed() -> None:
    ring = Measurements(capacity=10)
    _filled(ring, 8)
    reader = ring.page(None, 0, 3)
    assert [m.sequence for m in reader.items] == [1, 2, 3]
    _filled(ring, 9, first_step=9)  # 17 recorded: 1..7 dropped
    assert len(ring) == 10 and ring.oldest_sequence == 8
    late = ring.page(reader.after_sequence, 0, 4)
    assert late.truncated and [m.sequence for m in late.items] == [8, 9, 10, 11]
    assert not ring.page(late.after_sequence, 0, 4).truncated
    assert ring.page(None, 0, 4).truncated  # from the oldest: some were dropped before it
    assert not ring.page(None, 8, 4).truncated  # the dropped ones had steps 1..7
    assert ring.page(None, 7, 4).truncated


def test_the_default_bound() -> None:
    assert Measurements().capacity == MAX_MEASUREMENTS == 10_000


def test_the_controller_records_publishes_and_epochs_and_the_counter_survives_a_restart() -> None:
    controller = Controller(MemoryTarget(specs.ActiveSchedule(specs.Constant(0.1))))
    controller.publish(step=1, learning_rate=0.1, metrics={"loss": 3.0})  # the first records
    controller.publish(step=2, learning_rate=0.1, metrics={"loss": 2.5})  # throttled (< 1 s)
    controller.publish_epoch(epoch=0, metrics={"loss": 2.0, "val_loss": 2.2}, step=2)
    controller.submit(ChangeRequest(PinLearningRate(0.05)))
    controller.apply_due(2)
    controller.publish(step=3, learning_rate=0.05, metrics={"loss": 1.9})  # first after the change
    assert controller.snapshot().measurement_sequence == 3
    page = controller.list_measurements(after_sequence=None, same_process=True, start_step=0, page_size=10)
    assert [(m.step, m.epoch_end, dict(m.metrics)) for m in page.items] == [
        (1, False, {"loss": 3.0}), (2, True, {"loss": 2.0, "val_loss": 2.2}), (3, False, {"loss": 1.9})]

    exported = json.loads(json.dumps(controller.export_state(3)))
    assert exported["measurement_sequence"] == 3
    restarted = Controller(MemoryTarget(specs.ActiveSchedule(specs.Constant(0.1))))
    restarted.import_state(exported)
    assert restarted.snapshot().measurement_sequence == 3
    restarted.publish_epoch(epoch=1, metrics={"loss": 1.0}, step=4)
    # Numbering goes on; a new reader learns that earlier ones are not kept here.
    first = restarted.list_measurements(after_sequence=None, same_process=True, start_step=0, page_size=10)
    assert [m.sequence for m in first.items] == [4] and first.truncated
    # A reader of the old process that had read up to 3 misses nothing ...
    assert [m.sequence for m in restarted.list_measurements(
        after_sequence=3, same_process=False, start_step=0, page_size=10).items] == [4]
    # ... and one that had read past the checkpoint (5, lost with the old process) reads the
    # new numbering from the checkpoint on, instead of skipping it.
    assert [m.sequence for m in restarted.list_measurements(
        after_sequence=5, same_process=False, start_step=0, page_size=10).items] == [4]
