"""What the controller drives, as it sees it: the engine (`ScheduleTarget`), the optimizer's
parameter variables (`ParameterTarget`, described by `ParameterSpec`s), the training layer's
run actions (`RunTarget`, reporting a `RunResult`) and the write-ahead log (`ChangeLog`).

Protocols and the plain values they exchange, no behaviour: the training layer implements
them (tests too, with fakes in memory), and the controller needs nothing else of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lrctl.service.control.changes import LoadCheckpoint
from lrctl.service.schedules.specs import ActiveSchedule


@dataclass(frozen=True)
class ParameterSpec:
    """One settable scalar as the training layer describes it to the controller: its range
    (each side inclusive or not; None: unbounded), whether the traced step lets it change,
    and the dtype its variable holds it in (a value must be finite there; it is rounded to it)."""

    name: str
    live: bool = True
    fixed_reason: str = ""  #: why not live, and how to start the job so that it is
    registered: bool = False  #: TrainingControl.register'ed, not the optimizer's own
    minimum: float | None = None
    minimum_inclusive: bool = True
    maximum: float | None = None
    maximum_inclusive: bool = True
    dtype: str = "float32"


@dataclass(frozen=True)
class ParameterSpace:
    """What SetParameters may name in this trainer. `unsupported`: why no change can be made
    at all (a multi-worker job), "" otherwise."""

    specs: tuple[ParameterSpec, ...] = ()
    unsupported: str = ""

    def get(self, name: str) -> ParameterSpec | None:
        return next((spec for spec in self.specs if spec.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)


class ParameterTarget(Protocol):
    """The training layer's hyperparameter variables as the controller sees them. `read` and
    `load` are called from the training thread only, between steps; `load` is all or nothing."""

    def space(self) -> ParameterSpace: ...
    def read(self) -> dict[str, float]: ...
    def load(self, values: Mapping[str, float]) -> None: ...


class ScheduleTarget(Protocol):
    """The engine as the controller sees it. Called from the training thread only."""

    def load(self, state: ActiveSchedule, version: int) -> None: ...
    def read(self) -> tuple[ActiveSchedule, int]: ...


@dataclass(frozen=True)
class RunResult:
    """What the training layer did for a run action at the boundary: the change's result fields."""

    checkpoint_path: str = ""  #: the weights file written (save) or loaded (load)
    checkpoint_step: int | None = None
    checkpoint_run_id: str = ""  #: for a load: the run that wrote the checkpoint
    #: For a load with its hyperparameters: the checkpoint's schedule, put in force as the
    #: change's new state (None: the schedule in force stays).
    schedule: ActiveSchedule | None = None


class RunTarget(Protocol):
    """The training layer as the controller sees it for run actions (`RUN_ACTIONS`): what it
    can do (checked when a change arrives, any thread) and doing it (at a step boundary, on
    the training thread, no lock held). A method that raises fails its change (a domain
    error keeps its code; anything else is INTERNAL) and training goes on."""

    @property
    def checkpoint_dir(self) -> str | None: ...  #: where SaveCheckpoint writes (None: nowhere)
    @property
    def checkpoint_root(self) -> Path | None: ...  #: what LoadCheckpoint may read (None: nothing)
    @property
    def multi_worker(self) -> bool: ...  #: a multi-worker job: no pause, no load
    def save_checkpoint(self, step: int) -> RunResult: ...
    def load_checkpoint(self, action: LoadCheckpoint, step: int) -> RunResult: ...
    def stop(self, step: int) -> None:
        """After a StopTraining is recorded (pending changes cancelled): the final checkpoint
        (when the trainer checkpoints; a failure is only logged), and the loop ends."""


class ChangeLog(Protocol):
    """Where the controller writes each change's transitions before it answers: the
    write-ahead log (`wal.WriteAheadLog`). `append` returns once the records are durable, or
    raises OSError; `seq` is the last record's sequence number."""

    @property
    def seq(self) -> int: ...
    def append(self, records: Sequence[Mapping[str, Any]]) -> int: ...


__all__ = [
    "ChangeLog",
    "ParameterSpace",
    "ParameterSpec",
    "ParameterTarget",
    "RunResult",
    "RunTarget",
    "ScheduleTarget",
]
