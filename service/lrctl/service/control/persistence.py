"""The control state as JSON: how a change, its action, its error and a schedule are written
to a checkpoint (`Controller.export_state`) and to the write-ahead log, and read back.

One codec for both, kept apart from the controller so that the layout is read in one place and
`STATE_FORMAT` guards it: a new field is added here, with the default an older file implies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lrctl.service.control.changes import (
    Action,
    Change,
    ChangeRequest,
    ChangeStatus,
    LoadCheckpoint,
    ParameterUpdate,
    PauseTraining,
    PinLearningRate,
    ResumeTraining,
    RevertSchedule,
    SaveCheckpoint,
    ScaleLearningRate,
    SetParameters,
    StopTraining,
    SwapSchedule,
)
from lrctl.service.errors import ApplyError, FailedPreconditionError, VersionConflictError
from lrctl.service.schedules.specs import ActiveSchedule, Origin, spec_from_config

#: The layout of `Controller.export_state()`; `import_state` refuses any other.
STATE_FORMAT = 1


def schedule_to_json(state: ActiveSchedule) -> dict[str, Any]:
    return {"class_name": state.spec.keras_name, "config": state.spec.to_config(),
            "origin": state.origin.value, "origin_step": state.origin_step, "scale": state.scale}


def schedule_from_json(data: Mapping[str, Any]) -> ActiveSchedule:
    return ActiveSchedule(spec_from_config(data["class_name"], data["config"]), Origin(data["origin"]),
                          int(data["origin_step"]), float(data["scale"]))


#: The run actions with no fields, by their JSON key.
_BARE_RUN_ACTIONS: dict[str, type[ResumeTraining | SaveCheckpoint | StopTraining]] = {
    "resume": ResumeTraining, "save_checkpoint": SaveCheckpoint, "stop": StopTraining}


def action_to_json(action: Action) -> dict[str, Any]:
    if isinstance(action, PauseTraining):
        return {"pause": {"timeout": action.timeout}}
    if isinstance(action, LoadCheckpoint):
        return {"load_checkpoint": {"path": action.path,
                                    "load_hyperparameters": action.load_hyperparameters}}
    if isinstance(action, (ResumeTraining, SaveCheckpoint, StopTraining)):
        return {next(k for k, t in _BARE_RUN_ACTIONS.items() if isinstance(action, t)): {}}
    if isinstance(action, RevertSchedule):
        return {"revert": schedule_to_json(action.state)}
    if isinstance(action, PinLearningRate):
        return {"pin": action.learning_rate}
    if isinstance(action, ScaleLearningRate):
        return {"scale": action.factor}
    if isinstance(action, SetParameters):
        return {"set_parameters": [[name, value] for name, value in action.values]}
    return {"swap": {"class_name": action.schedule.keras_name, "config": action.schedule.to_config(),
                     "origin": action.origin.value, "start_step": action.start_step, "scale": action.scale}}


def action_from_json(data: Mapping[str, Any]) -> Action:
    if "pause" in data:
        return PauseTraining(float(data["pause"]["timeout"]))
    if "load_checkpoint" in data:
        load = data["load_checkpoint"]
        return LoadCheckpoint(str(load["path"]), bool(load.get("load_hyperparameters", False)))
    for key, bare in _BARE_RUN_ACTIONS.items():
        if key in data:
            return bare()
    if "revert" in data:
        return RevertSchedule(schedule_from_json(data["revert"]))
    if "pin" in data:
        return PinLearningRate(float(data["pin"]))
    if "scale" in data:
        return ScaleLearningRate(float(data["scale"]))
    if "set_parameters" in data:
        return SetParameters(tuple((str(name), float(value)) for name, value in data["set_parameters"]))
    swap = data["swap"]
    scale = swap.get("scale")
    return SwapSchedule(spec_from_config(swap["class_name"], swap["config"]), Origin(swap["origin"]),
                        int(swap.get("start_step", 0)), None if scale is None else float(scale))


def error_to_json(error: Exception | None) -> dict[str, Any] | None:
    if error is None:
        return None
    if isinstance(error, VersionConflictError):
        return {"type": type(error).__name__, "message": str(error), "expected": error.expected,
                "current": error.current, "step": error.step}
    return {"type": type(error).__name__, "message": str(error),
            "field": getattr(error, "field", ""), "kind": getattr(error, "kind", "")}


def error_from_json(data: Mapping[str, Any] | None) -> Exception | None:
    """A FAILED record's error: ApplyError stays one; any other is a FailedPreconditionError
    (the only other kind a FAILED record holds), with its field and kind."""
    if data is None:
        return None
    if data["type"] == ApplyError.__name__:
        return ApplyError(data["message"])
    if data["type"] == VersionConflictError.__name__:
        return VersionConflictError(int(data["expected"]), int(data["current"]), step=data.get("step"))
    return FailedPreconditionError(data["message"], field=data.get("field", ""), kind=data.get("kind", ""))


def change_to_json(change: Change) -> dict[str, Any]:
    request = change.request
    return {
        "id": change.id, "status": change.status.value, "requested_step": change.requested_step,
        "requested_time": change.requested_time, "version": change.version,
        "applied_step": change.applied_step, "learning_rate_after": change.learning_rate_after,
        "schedule_after": None if change.schedule_after is None else schedule_to_json(change.schedule_after),
        "applied_time": change.applied_time, "current_version": change.current_version,
        "error": error_to_json(change.error), "due_step": change.due_step,
        **({"checkpoint": {"path": change.checkpoint_path, "step": change.checkpoint_step,
                           "run_id": change.checkpoint_run_id}} if change.checkpoint_path else {}),
        "parameter_updates": [[u.name, u.before, u.after] for u in change.parameter_updates],
        "request": {"action": action_to_json(request.action), "request_id": request.request_id,
                    "expected_version": request.expected_version, "apply_at_step": request.apply_at_step,
                    "reason": request.reason, "force": request.force,
                    "expected_run_id": request.expected_run_id,
                    "expected_incarnation": request.expected_incarnation,
                    "apply_after_steps": request.apply_after_steps},
    }


def change_from_json(data: Mapping[str, Any]) -> Change:
    request = data["request"]
    after = data["schedule_after"]
    checkpoint = data.get("checkpoint") or {}
    return Change(
        id=int(data["id"]), status=ChangeStatus(data["status"]), requested_step=int(data["requested_step"]),
        requested_time=float(data["requested_time"]), version=int(data["version"]),
        applied_step=data["applied_step"], learning_rate_after=data["learning_rate_after"],
        schedule_after=None if after is None else schedule_from_json(after),
        applied_time=data["applied_time"], current_version=data["current_version"],
        error=error_from_json(data["error"]), due_step=data.get("due_step"),
        checkpoint_path=str(checkpoint.get("path", "")), checkpoint_step=checkpoint.get("step"),
        checkpoint_run_id=str(checkpoint.get("run_id", "")),
        parameter_updates=tuple(ParameterUpdate(str(n), float(b), float(a))
                                for n, b, a in data.get("parameter_updates", ())),
        request=ChangeRequest(action_from_json(request["action"]), request_id=request["request_id"],
                              expected_version=request["expected_version"],
                              apply_at_step=request["apply_at_step"], reason=request["reason"],
                              force=bool(request["force"]),
                              expected_run_id=request.get("expected_run_id", ""),
                              expected_incarnation=request.get("expected_incarnation", ""),
                              apply_after_steps=request.get("apply_after_steps")),
    )


@dataclass(frozen=True)
class SavedState:
    """What `export_state` wrote, read back: the parts the controller puts back in place."""

    schedule: ActiveSchedule
    version: int
    step: int
    epoch: int  #: epochs completed
    run_id: str
    next_id: int
    pending: list[Change]
    finished: list[Change]  #: in the order they finished
    history: list[Change]  #: the finished records the history shows, oldest first
    replay: list[Change]  #: applied changes still to re-apply, in (applied_step, version) order
    stopped_step: int | None = None  #: where a StopTraining ended the run (None: it did not)
    measurement_sequence: int = 0  #: the newest measurement's sequence number (0: none)


def state_to_json(*, run_id: str, step: int, epoch: int, schedule: ActiveSchedule, version: int,
                  pending: Iterable[Change], finished: Iterable[Change], history: Iterable[Change],
                  replay: Iterable[Change], wal_seq: int, stopped_step: int | None = None,
                  measurement_sequence: int = 0) -> dict[str, Any]:
    """The control state as JSON-able data: the schedule and version in force, the pending
    changes, and every remembered finished record (the dedup window, in the order they
    finished; the history is its newest `history_size`). "epoch" is the number of epochs
    completed (`Controller.complete_epoch`), which is what `fit`'s `initial_epoch` takes to
    resume: an epoch cut short runs again from its start, as with Keras's BackupAndRestore (the
    input pipeline starts over anyway). `wal_seq`: the last write-ahead log record it includes
    (the submit lock keeps out a record written but not yet committed); `replay`: the ids of
    changes still to re-apply; `stopped_step`: where a StopTraining ended the run (absent: it
    did not)."""
    pending, finished, history = list(pending), list(finished), list(history)
    history_ids = [c.id for c in history]
    # History records older than the dedup window (only with history_size > DEDUP_WINDOW).
    known = {c.id for c in finished}
    older = [c for c in history if c.id not in known]
    return {
        "format": STATE_FORMAT, "run_id": run_id, "step": step, "epoch": epoch,
        "measurement_sequence": measurement_sequence,
        "version": version, "schedule": schedule_to_json(schedule),
        "next_id": max([0, *(c.id for c in pending), *(c.id for c in finished), *history_ids]) + 1,
        "pending": [change_to_json(c) for c in pending],
        "finished": [change_to_json(c) for c in [*older, *finished]],
        "history": history_ids,
        "wal_seq": wal_seq,
        "replay": [c.id for c in replay],
        **({"stopped_step": stopped_step} if stopped_step is not None else {}),
    }


def state_from_json(data: Mapping[str, Any]) -> SavedState:
    """Read what `state_to_json` wrote. Raises ValueError for data of another format."""
    if data.get("format") != STATE_FORMAT:
        raise ValueError(f"control state format {data.get('format')!r} is not {STATE_FORMAT}")
    finished = [change_from_json(c) for c in data["finished"]]
    by_id = {c.id: c for c in finished}
    return SavedState(
        schedule=schedule_from_json(data["schedule"]), version=int(data["version"]),
        step=int(data["step"]), epoch=int(data.get("epoch", 0)), run_id=str(data.get("run_id") or ""),
        next_id=max(int(data["next_id"]), 1), pending=[change_from_json(c) for c in data["pending"]],
        finished=finished, history=[by_id[i] for i in data["history"] if i in by_id],
        replay=sorted((by_id[i] for i in data.get("replay", ()) if i in by_id),
                      key=lambda c: (c.applied_step or 0, c.version)),
        stopped_step=None if data.get("stopped_step") is None else int(data["stopped_step"]),
        measurement_sequence=int(data.get("measurement_sequence", 0)))


def log_record(run_id: str, change: Change) -> dict[str, Any]:
    """A write-ahead log record of `change`'s current state."""
    return {"run_id": run_id, "change": change_to_json(change)}


def last_records(records: Iterable[Mapping[str, Any]]) -> tuple[dict[int, Change], str]:
    """Each change's last state in write-ahead log `records` (in seq order), and the run id
    they name ("" if none)."""
    last: dict[int, Change] = {}
    run_id = ""
    for record in records:
        change = change_from_json(record["change"])
        last[change.id] = change
        run_id = str(record.get("run_id") or run_id)
    return last, run_id
