"""The policy: whether a change may be accepted, and the state it makes.

On arrival: the request's own rules (values, sizes, step ranges), the fences, the phase, the
expected version, where the step boundaries fall, the guardrails over the whole horizon from
the state the change will meet, the pending bound and the rate limit. What a change makes of
the schedule (`next_state`, `check_change`) is also what decides it at its boundary
(`outcomes`). Pure numpy (`forms`), no TensorFlow; holds no lock and no state beyond the rate
limiter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from lrctl.service.control import checkpoint_paths, guardrails, parameters
from lrctl.service.control.changes import (
    ENDED_PHASES,
    RUN_ACTIONS,
    Action,
    Change,
    ChangeRequest,
    LoadCheckpoint,
    PauseTraining,
    Phase,
    PinLearningRate,
    RevertSchedule,
    SaveCheckpoint,
    ScaleLearningRate,
    SetParameters,
    Snapshot,
    SwapSchedule,
)
from lrctl.service.control.guardrails import Guardrails, RateLimiter
from lrctl.service.control.limits import (
    APPLY_HORIZON,
    MAX_PAUSE_TIMEOUT,
    MAX_PENDING,
    MAX_REASON_BYTES,
    MAX_REQUEST_ID_BYTES,
    MAX_RUN_ID_BYTES,
)
from lrctl.service.control.targets import ParameterSpace, RunTarget
from lrctl.service.errors import (
    FailedPreconditionError,
    IncarnationMismatchError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RunIdMismatchError,
    UnavailableError,
    VersionConflictError,
)
from lrctl.service.schedules import forms
from lrctl.service.schedules.kinds import Constant
from lrctl.service.schedules.registry import FLOAT32_MAX, check_number
from lrctl.service.schedules.specs import ActiveSchedule, Origin

#: The smallest normal float32: a smaller cumulative scale could never be scaled back up.
_MIN_SCALE = 1.1754944e-38


def check_request(request: ChangeRequest) -> None:
    """Rules that need no state: values, sizes and step ranges."""
    action = request.action
    if isinstance(action, PinLearningRate):
        check_number("learning_rate", action.learning_rate, minimum=0)
    elif isinstance(action, ScaleLearningRate):
        check_number("scale", action.factor, minimum=0, inclusive=False)
    elif isinstance(action, PauseTraining):
        if not 0 < action.timeout <= MAX_PAUSE_TIMEOUT:  # NaN fails too
            raise InvalidArgumentError("timeout", f"must be in (0s, {MAX_PAUSE_TIMEOUT:g}s] (7 days)",
                                       f"{action.timeout:g}s")
    elif isinstance(action, LoadCheckpoint) and not action.path:
        raise InvalidArgumentError("path", "must be set (a checkpoint folder, or its weights file)",
                                   "nothing")
    elif isinstance(action, SetParameters) and not action.values:
        raise InvalidArgumentError("parameters", "must name at least one parameter", "{}")
    # A SwapSchedule's spec validated itself when it was built.
    check_reason(request.reason)
    check_request_id(request.request_id)
    if request.apply_at_step is not None and request.apply_at_step < 0:
        raise InvalidArgumentError("apply_at_step", "must be >= 0", request.apply_at_step)
    after = request.apply_after_steps
    if after is not None:
        if request.apply_at_step is not None:
            raise InvalidArgumentError("apply_after_steps", "must not be set together with "
                                       "`apply_at_step`", after)
        if not 0 <= after <= APPLY_HORIZON:
            raise InvalidArgumentError("apply_after_steps", f"must be in [0, {APPLY_HORIZON}]", after)
    check_id_size(request.expected_run_id)
    check_id_size(request.expected_incarnation, "expected_incarnation")
    if isinstance(action, SwapSchedule):
        if not 0 <= action.start_step <= APPLY_HORIZON:
            raise InvalidArgumentError("schedule_start_step", f"must be in [0, {APPLY_HORIZON}]",
                                       action.start_step)
        if action.start_step and action.origin is Origin.GLOBAL:
            raise InvalidArgumentError("schedule_start_step", "must be 0 with STEP_ORIGIN_GLOBAL",
                                       action.start_step)
        if action.scale is not None:
            check_number("scale", action.scale, minimum=0, inclusive=False)


def check_reason(reason: str) -> None:
    """A change's or a cancellation's reason longer than `MAX_REASON_BYTES`: refused."""
    if len(reason.encode()) > MAX_REASON_BYTES:
        raise InvalidArgumentError("reason", f"must be at most {MAX_REASON_BYTES} bytes",
                                   f"{len(reason.encode())} bytes")


def check_request_id(request_id: str) -> None:
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgumentError("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes",
                                   f"{len(request_id.encode())} bytes")


def check_id_size(value: str, field: str = "expected_run_id") -> None:
    """A fence id (run id, incarnation) longer than any this server hands out: refused."""
    if len(value.encode()) > MAX_RUN_ID_BYTES:
        raise InvalidArgumentError(field, f"must be at most {MAX_RUN_ID_BYTES} bytes",
                                   f"{len(value.encode())} bytes")


def check_capability(action: Action, target: RunTarget | None) -> None:
    """A run action the trainer cannot perform: FAILED_PRECONDITION saying how to start it so
    that it can; a LoadCheckpoint path outside the checkpoint root or missing: refused now (the
    boundary resolves it again: the folder's newest checkpoint may move on meanwhile)."""
    if isinstance(action, SaveCheckpoint) and (target is None or target.checkpoint_dir is None):
        raise FailedPreconditionError(
            "SaveCheckpoint needs a checkpoint folder: start the trainer with --checkpoint-dir "
            "(or, embedding lrctl, create a Checkpointer for the TrainingControl)")
    if isinstance(action, (PauseTraining, LoadCheckpoint)) and target is not None and target.multi_worker:
        # The chief alone applies changes; the followers would wait for it in the exchange's
        # collective (a pause) or train on other weights (a load).
        raise FailedPreconditionError(
            f"{type(action).__name__} is not supported in a multi-worker job: the workers' "
            "exchange carries the schedule only (use StopTraining and restart the job from a "
            "checkpoint)", kind="MULTI_WORKER")
    if isinstance(action, LoadCheckpoint):
        checkpoint_paths.resolve(action.path, target.checkpoint_root if target is not None else None)


def unfenced(request: ChangeRequest) -> ChangeRequest:
    """`request` without its fences: a retry is the same request whatever they say now."""
    return dataclasses.replace(request, expected_run_id="", expected_incarnation="")



_ACTION_FIELD = {PinLearningRate: "learning_rate", ScaleLearningRate: "scale", SwapSchedule: "schedule",
                 RevertSchedule: "schedule"}


def next_state(state: ActiveSchedule, action: Action, step: int) -> ActiveSchedule:
    if isinstance(action, (SetParameters, *RUN_ACTIONS)):  # the schedule stays as it is (a load's, if any, is known only at its boundary)
        return state
    if isinstance(action, RevertSchedule):
        return action.state
    if isinstance(action, PinLearningRate):
        return ActiveSchedule(Constant(action.learning_rate), Origin.RESTART, step, 1.0)
    if isinstance(action, ScaleLearningRate):
        return dataclasses.replace(state, scale=state.scale * action.factor)
    # RESTART: the schedule sees its own step `start_step` at `step` (the engine evaluates
    # max(step - origin_step, 0), so a negative origin_step is fine).
    origin_step = step - action.start_step if action.origin is Origin.RESTART else 0
    return ActiveSchedule(action.schedule, action.origin, origin_step,
                          1.0 if action.scale is None else action.scale)


def expected_due(change: Change, current_step: int) -> int:
    """The step at which a pending change is expected to apply (its `apply_after_steps`
    counted from `current_step` until a boundary has fixed it)."""
    if change.due_step is not None:
        return change.due_step
    request = change.request
    return max(current_step, request.apply_at_step or 0) + (request.apply_after_steps or 0)


def check_change(action: Action, state: ActiveSchedule, step: int,
                  limits: Guardrails) -> tuple[ActiveSchedule, float]:
    """The state `action` makes from `state` at `step`, and its learning rate there.

    InvalidArgumentError naming the request's field if the cumulative scale, or the learning
    rate at any step of the guardrails' horizon from `step`, is not a usable float32;
    FailedPreconditionError naming the guardrail if the learning rate leaves [min, max] at
    any step of that horizon (exact extremes, no sampling). Pure numpy: no TensorFlow.
    A run action leaves the schedule as it is: nothing to check."""
    after = next_state(state, action, step)
    if isinstance(action, RUN_ACTIONS):
        return after, forms.learning_rate(after, step)
    field = _ACTION_FIELD[type(action)]
    if not _MIN_SCALE <= after.scale <= FLOAT32_MAX:
        raise InvalidArgumentError(
            "scale" if isinstance(action, SwapSchedule) else field,
            f"would make the cumulative scale {after.scale:g}, outside float32's normal range",
            getattr(action, "factor", None) if not isinstance(action, SwapSchedule) else action.scale)
    extremes = forms.extremes(after, step, step + limits.horizon_steps)
    for at, lr in ((extremes.max_step, extremes.max_lr), (extremes.min_step, extremes.min_lr)):
        if not forms.is_finite_float32(lr):
            raise InvalidArgumentError(field, f"would make the learning rate {lr} at step {at} in "
                                       "float32, the precision training uses", action.describe())
    limits.check_bounds([(extremes.max_step, extremes.max_lr), (extremes.min_step, extremes.min_lr)])
    return after, forms.learning_rate(after, step)


def check_fences(snapshot: Snapshot, expected_run_id: str, expected_incarnation: str) -> None:
    """Refuse a request fenced to another run or another process of this one."""
    if expected_run_id and expected_run_id != snapshot.run_id:
        raise RunIdMismatchError(expected_run_id, snapshot.run_id)
    if expected_incarnation and expected_incarnation != snapshot.incarnation:
        raise IncarnationMismatchError(expected_incarnation, snapshot.incarnation)


def check_open(snapshot: Snapshot, shutting_down: bool) -> None:
    """Refuse any new change once the run is shutting down (transient) or has ended."""
    if shutting_down or snapshot.phase in (Phase.STOPPING, Phase.STOPPED):
        raise UnavailableError("the trainer is shutting down; it accepts no more changes. "
                               "Retry with the same request_id once it has restarted")
    if snapshot.phase in ENDED_PHASES:
        raise FailedPreconditionError(f"the run is {snapshot.phase.value}; it accepts no more changes")


def missed_error(apply_at_step: int, step: int) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"apply_at_step={apply_at_step} may already have passed: the run is at step {step} "
        "and changes apply only at step boundaries; the change was not applied",
        field="apply_at_step",
    )


def state_before(state: ActiveSchedule, pending: Sequence[Change], step: int,
                 current_step: int) -> ActiveSchedule:
    """The state a change due at `step` will meet: `state`, with every `pending` change due
    before it (or at the same step: submitted earlier) applied in due order."""
    for due_step, change in sorted(((expected_due(c, current_step), c) for c in pending),
                                   key=lambda item: (item[0], item[1].id)):
        if due_step > step:
            break
        state = next_state(state, change.request.action, due_step)
    return state


@dataclass(frozen=True)
class Arrival:
    """A request judged on arrival: where it is expected to apply and what it would do there."""

    start: int  #: the step it is expected to apply at
    before: ActiveSchedule  #: the state it will meet there
    after: ActiveSchedule  #: the state it would make
    #: Its apply_at_step may have passed already: recorded FAILED, never applied late.
    missed: FailedPreconditionError | None


class Policy:
    """The guardrails and the rate limit, applied on arrival and at the boundary."""

    def __init__(self, limits: Guardrails) -> None:
        self.guardrails = limits
        self._rate = RateLimiter(limits.max_changes_per_minute)
        #: What SetParameters may name (the training layer's `ParameterTarget.space()`).
        self.parameters: ParameterSpace = parameters.NO_PARAMETERS

    def judge(self, request: ChangeRequest, *, snapshot: Snapshot, state: ActiveSchedule, version: int,
              replayed: Change | None, pending: Sequence[Change], boundary_step: float,
              validate_only: bool) -> Arrival:
        """Judge `request` against the run as it will be when it applies: the engine's `state`
        and `version`, or while changes acknowledged before a restart are still to be
        re-applied, the last of them (`replayed`), with the `pending` changes due before it.
        `boundary_step`: an upper bound on the step at the latest step boundary. Raises what
        refuses it (then nothing was queued)."""
        if replayed is not None:  # a new change meets the state after the last replay
            state, version = replayed.schedule_after or state, replayed.version
        if request.expected_version is not None and request.expected_version != version:
            raise VersionConflictError(request.expected_version, version)
        at, step = request.apply_at_step, snapshot.step
        if at is not None and at > step + APPLY_HORIZON:
            raise InvalidArgumentError(
                "apply_at_step", f"must be at most {APPLY_HORIZON} steps ahead of the current "
                f"step {step}", at)
        floor = (replayed.applied_step or 0) if replayed else 0
        start = max(step, at or 0, floor) + (request.apply_after_steps or 0)
        before = state_before(state, pending, start, step)
        if isinstance(request.action, SetParameters):
            parameters.check(request.action, self.parameters, self.guardrails)
            after = before
        else:
            after, lr_after = check_change(request.action, before, start, self.guardrails)
            if not request.force and self.guardrails.max_change_factor is not None:
                self.guardrails.check_factor(forms.learning_rate(before, start), lr_after, start)
        missed = at is not None and (at < step or at <= boundary_step)
        if at is not None and missed and validate_only:
            raise missed_error(at, step)
        if at is not None and not missed and replayed is not None and at <= floor:
            raise FailedPreconditionError(
                f"apply_at_step={at}: the run is repeating steps after a restart and re-applies "
                f"the changes acknowledged before it until step {floor}; a new change can apply "
                f"only after that step", field="apply_at_step")
        grid = snapshot.boundaries
        if at is not None and not missed and grid and not grid.reaches(at):
            below, above = grid.around(at)
            raise InvalidArgumentError(
                "apply_at_step", f"must be a step where a step boundary falls, or the change "
                f"would land late: boundaries fall every {grid.spacing} steps from step "
                f"{grid.origin} (steps_per_execution or sync_every); the nearest are "
                f"{below} and {above}", at)
        return Arrival(start, before, after, missed_error(at, step) if at is not None and missed else None)

    def admit(self, pending_count: int, *, missed: bool) -> None:
        """Queue room (a missed change is only recorded) and the rate limit, for a real submit."""
        if not missed and pending_count >= MAX_PENDING:
            raise ResourceExhaustedError(
                f"{MAX_PENDING} changes are pending already; wait for some to apply or cancel them")
        self._rate.take()

    def preview(self, change: Change, arrival: Arrival, steps: int) -> Change:
        """A validate_only record with the LR over `steps` steps after it, and without it."""
        return dataclasses.replace(
            change, preview=tuple(guardrails.sample(arrival.after, arrival.start, steps)),
            preview_current=tuple(guardrails.sample(arrival.before, arrival.start, steps)))
