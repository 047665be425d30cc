"""The vocabulary of the control domain: what a change is, asks for and became, and what a
snapshot shows (what the controller drives, and how it sees it: targets.py).

Plain frozen dataclasses and enums with no behaviour beyond describing themselves, so that the
servicer, the Keras layer, metrics and checkpoints can all speak of changes without importing
the controller's machinery.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails
from lrctl.service.schedules.specs import ActiveSchedule, Origin, ScheduleSpec


class Phase(enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    STOPPING = "stopping"
    FINISHED = "finished"  #: the run completed: pending changes were cancelled
    FAILED = "failed"  #: training raised: pending changes were cancelled
    #: Shut down before completing (SIGTERM/SIGINT): pending changes stay pending and resume
    #: with the run when it restarts from its checkpoint.
    STOPPED = "stopped"
    #: Paused by PauseTraining: the training thread waits at a boundary; changes still apply.
    PAUSED = "paused"


#: Phases after which this process accepts and applies nothing more.
ENDED_PHASES = frozenset({Phase.FINISHED, Phase.FAILED, Phase.STOPPED})


class ChangeStatus(enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    VALIDATED = "validated"  #: validate_only: checked, never queued
    ABORTED = "aborted"  #: expected_version no longer matched at the step boundary
    CANCELLED = "cancelled"  #: cancelled by a client, or the run ended before it was due
    FAILED = "failed"  #: not applied; `error` says why (a missed apply_at_step, an engine error)


@dataclass(frozen=True)
class PinLearningRate:
    """Replace the schedule with a constant."""

    learning_rate: float

    def describe(self) -> str:
        return f"set lr={self.learning_rate:g}"


@dataclass(frozen=True)
class ScaleLearningRate:
    """Multiply the active schedule by `factor` (cumulative)."""

    factor: float

    def describe(self) -> str:
        return f"scale x{self.factor:g}"


@dataclass(frozen=True)
class SwapSchedule:
    """Replace the active schedule. With RESTART the new schedule is evaluated from its own
    step `start_step` where it applies (origin_step = step - start_step); `scale` is the
    cumulative scale it starts with (None: 1), set in the same change and version."""

    schedule: ScheduleSpec
    origin: Origin = Origin.RESTART
    start_step: int = 0
    scale: float | None = None

    def describe(self) -> str:
        extra = f" start_step={self.start_step}" if self.start_step else ""
        extra += f" scale={self.scale:g}" if self.scale is not None else ""
        return f"swap {self.schedule.describe()} origin={self.origin.value}{extra}"


@dataclass(frozen=True)
class RevertSchedule:
    """lrctl itself puts back a schedule that was in force (the divergence guard undoing a
    change): exactly `state`, origin step and scale included. Never sent by a client."""

    state: ActiveSchedule

    def describe(self) -> str:
        return (f"revert to {self.state.spec.describe()} origin_step={self.state.origin_step} "
                f"scale={self.state.scale:g}")


@dataclass(frozen=True)
class SetParameters:
    """Set optimizer hyperparameters or registered variables, by name (sorted by name)."""

    values: tuple[tuple[str, float], ...]

    def describe(self) -> str:
        return "set " + " ".join(f"{name}={value:g}" for name, value in self.values)


@dataclass(frozen=True)
class PauseTraining:
    """Wait at a boundary until resumed, stopped, shut down, or `timeout` seconds pass."""

    timeout: float

    def describe(self) -> str:
        return f"pause (timeout {self.timeout:g}s)"


@dataclass(frozen=True)
class ResumeTraining:
    """End a pause (nothing to do if not paused)."""

    def describe(self) -> str:
        return "resume"


@dataclass(frozen=True)
class SaveCheckpoint:
    """Write a checkpoint at the boundary, as --checkpoint-every does."""

    def describe(self) -> str:
        return "save checkpoint"


@dataclass(frozen=True)
class StopTraining:
    """End the run for good at the boundary: final checkpoint, pending cancelled, FINISHED."""

    def describe(self) -> str:
        return "stop training"


@dataclass(frozen=True)
class LoadCheckpoint:
    """Load weights and optimizer state (this run's step kept) from a checkpoint under the
    trainer's checkpoint root; with `load_hyperparameters`, its schedule and hyperparameters too."""

    path: str
    load_hyperparameters: bool = False

    def describe(self) -> str:
        return f"load {self.path}" + (" with its hyperparameters" if self.load_hyperparameters else "")


# Issue 19 adds SetParameters and RunAction to Action as each is built (changes.py stays the
# one vocabulary).
RunAction = PauseTraining | ResumeTraining | SaveCheckpoint | StopTraining | LoadCheckpoint
Action = PinLearningRate | ScaleLearningRate | SwapSchedule | RevertSchedule | SetParameters | RunAction
#: Actions the training layer performs at the boundary (not a schedule or parameter load).
RUN_ACTIONS = (PauseTraining, ResumeTraining, SaveCheckpoint, StopTraining, LoadCheckpoint)


@dataclass(frozen=True)
class ParameterUpdate:
    """One hyperparameter an applied change set: its value before and after."""

    name: str
    before: float
    after: float


@dataclass(frozen=True)
class Hyperparameter:
    """One optimizer hyperparameter or registered variable, as GetState reports it."""

    name: str
    value: float
    live: bool  #: SetParameters can change it in this run
    fixed_reason: str = ""  #: why not live, and how to start the job so that it is
    registered: bool = False  #: TrainingControl.register'ed, not the optimizer's own
    min_value: float | None = None
    max_value: float | None = None


@dataclass(frozen=True)
class Boundaries:
    """Where the coming step boundaries fall, so that `apply_at_step` can be exact or refused:
    at `origin + k * spacing` (k >= 0), until the training loop moves them (a new epoch starts
    them again from its first step, which a short last execution may have moved)."""

    origin: int = 0
    spacing: int = 1
    #: How many steps before a boundary the changes landing there are decided: a pipelined
    #: multi-worker exchange decides at one exchange what every worker loads at the next
    #: (`spacing` steps on), so an `apply_at_step` at or before the step last decided for is
    #: missed. 0: at the boundary itself.
    lead: int = 0

    def reaches(self, step: int) -> bool:
        return step >= self.origin and (step - self.origin) % self.spacing == 0

    def around(self, step: int) -> tuple[int, int]:
        """The boundary at or before `step` (the origin, before it) and the first one after."""
        if step < self.origin:
            return self.origin, self.origin
        below = step - (step - self.origin) % self.spacing
        return below, below + self.spacing

    def first_from(self, step: int) -> int:
        """The first boundary at or after `step`."""
        return step if self.reaches(step) else self.around(step)[1]


@dataclass(frozen=True)
class ChangeRequest:
    action: Action
    request_id: str = ""
    expected_version: int | None = None
    apply_at_step: int | None = None
    reason: str = ""
    force: bool = False  #: skip the max_change_factor guardrail (never the bounds)
    #: Fencing: refuse the change unless the run id is this one ("": no check).
    expected_run_id: str = ""
    #: Fencing on the process: refuse unless this process's incarnation id is this one ("": no check).
    expected_incarnation: str = ""
    #: Apply N steps after the first step boundary after acceptance (the boundary where the
    #: training thread first sees the change). Exclusive with apply_at_step.
    apply_after_steps: int | None = None


@dataclass(frozen=True)
class Change:
    """One change's record. Pending records are replaced by their final form when they end."""

    id: int  #: internal identity in submission order, stable across the record's updates
    request: ChangeRequest
    status: ChangeStatus
    requested_step: int
    requested_time: float
    version: int = 0  #: the state version this change produced; 0 unless APPLIED
    applied_step: int | None = None
    learning_rate_after: float | None = None
    schedule_after: ActiveSchedule | None = None
    applied_time: float | None = None  #: when the change ended (applied, aborted, ...)
    current_version: int | None = None  #: for ABORTED: the version that did not match
    error: Exception | None = None  #: for FAILED: why (a domain error the servicer maps to a code); for CANCELLED: the reason given
    #: For VALIDATED with a preview horizon: (step, LR) after the change, and without it.
    preview: tuple[tuple[int, float], ...] = ()
    preview_current: tuple[tuple[int, float], ...] = ()
    #: For apply_after_steps: the step it resolved to at the first boundary that saw it.
    due_step: int | None = None
    #: For an applied SetParameters (or a LoadCheckpoint with its hyperparameters).
    parameter_updates: tuple[ParameterUpdate, ...] = ()
    #: For an applied SaveCheckpoint: the weights file written; LoadCheckpoint: the one loaded.
    checkpoint_path: str = ""
    checkpoint_step: int | None = None  #: that checkpoint's step
    checkpoint_run_id: str = ""  #: for LoadCheckpoint: the run that wrote it (lineage)

    @property
    def due_key(self) -> int:
        """The step at which the change is due (0: at the next boundary)."""
        if self.due_step is not None:
            return self.due_step
        return self.request.apply_at_step or 0

    @property
    def description(self) -> str:
        return self.request.action.describe()


@dataclass(frozen=True)
class WorkerState:
    """One worker of a multi-worker job, as of the last exchange with the chief."""

    index: int  #: 0 is the chief
    applied_version: int
    step: int


@dataclass(frozen=True)
class Snapshot:
    """What other threads may read, with no TensorFlow involved."""

    run_id: str
    phase: Phase
    step: int
    epoch: int
    learning_rate: float
    schedule: ActiveSchedule
    version: int
    metrics: Mapping[str, float]
    optimizer: str
    pending: tuple[Change, ...]  #: the oldest `limits.SNAPSHOT_PENDING` pending changes
    recent: tuple[Change, ...]
    updated_time: float
    pending_count: int = 0
    guardrails: Guardrails = NO_GUARDRAILS
    seq: int = 0  #: bumped on every publication; lets watchers skip unchanged states
    #: The step and time `metrics` were taken at (None: no metrics). Metrics taken at or before the
    #: last applied change's step are cleared, never shown as if they came after it.
    metrics_step: int | None = None
    metrics_time: float | None = None
    #: The logs of the last finished epoch (`val_*` included), the epoch (0-based), and the
    #: step and time they were taken at. Empty / None: no epoch has finished yet.
    epoch_metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    epoch_metrics_epoch: int | None = None
    epoch_metrics_step: int | None = None
    epoch_metrics_time: float | None = None
    #: Optimizer steps per second over the last 10 s (None: not measured yet).
    steps_per_second: float | None = None
    #: A multi-worker job's workers, in task order; empty for a single worker.
    workers: tuple[WorkerState, ...] = ()
    #: Drawn at every process start (a resume included): fences a decision to one process.
    incarnation: str = ""
    #: Where changes can apply (None: not known, e.g. before training or in a custom loop).
    boundaries: Boundaries | None = None
    #: The step the current epoch began at (None: no epoch has begun).
    epoch_start_step: int | None = None
    #: How many engine evaluations clamped the LR into the guardrails' bounds (engine.py).
    lr_clamp_count: int = 0
    #: Checkpoint writes that failed in this process (lrctl.service.training.checkpoints).
    checkpoint_failures: int = 0
    #: The error of the last checkpoint attempt if it failed; "" after a success or none yet.
    checkpoint_error: str = ""
    #: The step of the newest complete checkpoint written or resumed from; None: none yet.
    checkpoint_step: int | None = None
    #: The optimizer's hyperparameters and the registered variables, by name.
    hyperparameters: tuple[Hyperparameter, ...] = ()
    #: While PAUSED: when the pause times out (time.time()). None otherwise.
    paused_until: float | None = None
    #: The newest measurement's sequence number (0: none recorded yet).
    measurement_sequence: int = 0



__all__ = [
    "ENDED_PHASES",
    "RUN_ACTIONS",
    "Action",
    "Boundaries",
    "Change",
    "ChangeRequest",
    "ChangeStatus",
    "Hyperparameter",
    "LoadCheckpoint",
    "ParameterUpdate",
    "PauseTraining",
    "Phase",
    "PinLearningRate",
    "ResumeTraining",
    "RevertSchedule",
    "RunAction",
    "SaveCheckpoint",
    "ScaleLearningRate",
    "SetParameters",
    "Snapshot",
    "StopTraining",
    "SwapSchedule",
    "WorkerState",
]
