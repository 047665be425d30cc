"""SetParameters in the pure controller (no TensorFlow): validation on arrival and at the
boundary, one load per boundary, versions and before/after, the write-ahead log's replay after a
crash (kill -9 after an acknowledged change), checkpoint export/import, restores read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import MemoryParameters, MemoryTarget

from lrctl.service.control.changes import (
    ChangeRequest,
    ChangeStatus,
    PinLearningRate,
    SetParameters,
)
from lrctl.service.control.controller import Controller
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.control.targets import ParameterSpec
from lrctl.service.control.wal import WriteAheadLog, after
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError
from lrctl.service.schedules import specs

_START = specs.ActiveSchedule(specs.as_spec(0.1))
_SPECS = (ParameterSpec("momentum", minimum=0.0, maximum=1.0, maximum_inclusive=False),
          ParameterSpec("clipnorm", live=False, fixed_reason="start it with SGD(clipnorm=1.0)"))


def _set(**values: float) -> SetParameters:
    return SetParameters(tuple(sorted(values.items())))


def _controller(**options: object) -> tuple[Controller, MemoryParameters]:
    controller = Controller(MemoryTarget(_START), **options)  # type: ignore[arg-type]
    params = MemoryParameters(_SPECS, {"momentum": 0.5, "clipnorm": 0.0})
    controller.attach_parameters(params)
    return controller, params


def test_applied_with_a_version_before_and_after_and_one_load_per_boundary() -> None:
    controller, params = _controller()
    controller.submit(ChangeRequest(_set(momentum=0.9)))
    controller.submit(ChangeRequest(PinLearningRate(0.2)))
    controller.submit(ChangeRequest(_set(momentum=0.7)))
    finals = controller.apply_due(3)
    assert [c.version for c in finals] == [1, 2, 3]
    assert [(u.before, u.after) for u in finals[0].parameter_updates] == [(0.5, pytest.approx(0.9))]
    assert [(u.before, u.after) for u in finals[2].parameter_updates] == [
        (pytest.approx(0.9), pytest.approx(0.7))]
    assert params.loads == [{"momentum": pytest.approx(0.7)}]
    snap = controller.snapshot()
    assert snap.version == 3
    assert {h.name: h.value for h in snap.hyperparameters}["momentum"] == pytest.approx(0.7)


def test_refusals_on_arrival_and_at_the_boundary() -> None:
    controller, params = _controller(guardrails=Guardrails(parameter_bounds=(("momentum", 0.8, None),)))
    with pytest.raises(InvalidArgumentError) as unknown:
        controller.submit(ChangeRequest(_set(beta_1=0.5)))
    assert unknown.value.field == "parameters[beta_1]" and "(momentum, clipnorm)" in str(unknown.value)
    with pytest.raises(InvalidArgumentError, match=r"parameters\[momentum\]"):
        controller.submit(ChangeRequest(_set(momentum=1.0)))
    with pytest.raises(FailedPreconditionError) as structure:
        controller.submit(ChangeRequest(_set(clipnorm=1.0)))
    assert structure.value.kind == "OPTIMIZER_STRUCTURE" and "SGD(clipnorm=1.0)" in str(structure.value)
    with pytest.raises(FailedPreconditionError) as guard:
        controller.submit(ChangeRequest(_set(momentum=0.6)))
    assert guard.value.kind == "GUARDRAIL"
    with pytest.raises(InvalidArgumentError, match="parameters"):
        controller.submit(ChangeRequest(SetParameters(())))
    # Accepted, then the guardrails tighten before the boundary: FAILED there, nothing loaded.
    controller.submit(ChangeRequest(_set(momentum=0.85)))
    controller.guardrails = Guardrails(parameter_bounds=(("momentum", 0.9, None),))
    (final,) = controller.apply_due(1)
    assert final.status is ChangeStatus.FAILED and params.loads == [] and params.values["momentum"] == 0.5


def test_an_acknowledged_change_is_replayed_after_a_crash_and_survives_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "wal.jsonl"
    first, _ = _controller()
    first.wal = WriteAheadLog(path, lineage="L")
    first.publish(step=2, learning_rate=0.1)
    checkpoint = json.loads(json.dumps(first.export_state(2)))
    first.submit(ChangeRequest(_set(momentum=0.9), request_id="a"))
    (applied,) = first.apply_due(4)
    first.submit(ChangeRequest(_set(momentum=0.6), request_id="b"))  # acknowledged, pending
    # kill -9: the checkpoint at step 2 (momentum 0.5 in its variables) and the log remain.
    second = Controller(MemoryTarget(_START))
    params = MemoryParameters(_SPECS, {"momentum": 0.5, "clipnorm": 0.0})
    second.attach_parameters(params)
    second.import_state(checkpoint)
    assert second.replay(after(WriteAheadLog(path).records, checkpoint["wal_seq"], "L")) == 2
    replayed = second.get_change(applied.id)
    assert replayed.parameter_updates == applied.parameter_updates
    assert second.apply_due(3) == [] and params.values["momentum"] == 0.5
    finals = second.apply_due(4)  # the replay lands at its step, then b
    assert params.values["momentum"] == pytest.approx(0.6)
    assert [c.request.request_id for c in finals] == ["b"] and finals[0].version == 2
    assert finals[0].parameter_updates[0].before == pytest.approx(0.9)
    # Retries are answered from the ledger; the export carries the parameter updates.
    assert second.submit(ChangeRequest(_set(momentum=0.9), request_id="a")).version == 1
    exported = json.loads(json.dumps(second.export_state(4)))
    third = Controller(MemoryTarget(_START))
    third.import_state(exported)
    assert third.get_change(applied.id).parameter_updates == applied.parameter_updates


def test_a_restore_is_read_back_from_the_variables() -> None:
    controller, params = _controller()
    params.values["momentum"] = 0.25  # a checkpoint brought back another value
    assert controller.refresh_parameters()["momentum"] == 0.25
    assert {h.name: h.value for h in controller.snapshot().hyperparameters}["momentum"] == 0.25


def test_names_are_bounded_before_any_error_quotes_one() -> None:
    """An error names the parameter (`parameters[NAME]`, in the message and the BadRequest):
    a fuzzed 6 KiB name made a status larger than gRPC's 8 KiB of metadata. Refused first,
    with only its size quoted; so is a map of more names than any optimizer has."""
    controller, params = _controller()
    with pytest.raises(InvalidArgumentError) as long_name:
        controller.submit(ChangeRequest(SetParameters((("m" * 6000, 0.5),))))
    assert long_name.value.field == "parameters" and len(str(long_name.value)) < 300
    with pytest.raises(InvalidArgumentError, match="at most 64 parameters"):
        controller.submit(ChangeRequest(SetParameters(tuple((f"p{i:03}", 0.5) for i in range(65)))))
    assert controller.snapshot().pending_count == 0 and params.read()["momentum"] == 0.5


def test_the_name_and_count_bounds_are_exact() -> None:
    """At the edge of each bound: 64 names and 128-byte names pass the bounds (and are then
    judged as names: unknown here, named in the error); 65 names or a 129-byte name do not."""
    controller, params = _controller()
    name_128 = "é" * 63 + "mm"  # 128 bytes of UTF-8 in 65 characters: bytes are counted
    with pytest.raises(InvalidArgumentError) as at_edge:
        controller.submit(ChangeRequest(SetParameters(((name_128, 0.5),))))
    assert at_edge.value.field == f"parameters[{name_128}]"
    with pytest.raises(InvalidArgumentError, match="at most 128 bytes") as over:
        controller.submit(ChangeRequest(SetParameters((("é" * 64 + "m", 0.5),))))
    assert over.value.field == "parameters"
    with pytest.raises(InvalidArgumentError) as sixty_four:
        controller.submit(ChangeRequest(SetParameters(tuple((f"p{i:03}", 0.5) for i in range(64)))))
    assert sixty_four.value.field == "parameters[p000]"
    with pytest.raises(InvalidArgumentError, match="at most 64 parameters"):
        controller.submit(ChangeRequest(SetParameters(tuple((f"p{i:03}", 0.5) for i in range(65)))))
    assert controller.snapshot().pending_count == 0 and params.read()["momentum"] == 0.5
