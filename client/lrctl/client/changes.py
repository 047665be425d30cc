"""What a change request says, each part described once: what to change (`Pin`, `Scale`,
`Swap`) and how (`ChangeOptions`). The request builders (`calls`), both clients' docs and the
CLI's flags and help are read from these fields, their defaults and their `option` metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lrctl.client.schedules import ScheduleLike

#: `swap_schedule(origin=...)`: "restart", "global", or a `pb.StepOrigin` value.
Origin = Literal["restart", "global"] | int
#: `get_state(view=...)`, `watch(view=...)`: "full" (the default: everything), "basic" (no
#: pending or recent change lists: the step, LR, phase and metrics, for a fraction of the
#: bytes), or a `pb.StateView` value.
View = Literal["basic", "full"] | int

T = TypeVar("T")


def option(default: Any, help: str, detail: str = "", **cli: Any) -> Any:
    """A documented field. `help`: one line, the CLI's help and the start of the Python docs;
    `detail`: the rest of the Python docs. `cli` says how the command line spells it: `flag`
    (none: not on the command line; `--no-X` clears a bool), `metavar`, `minimum` (an int
    flag's least value), `choices`."""
    return dataclasses.field(default=default, metadata={"help": help, "detail": detail, **cli})


def describe_fields(cls: type) -> str:
    """The fields' docs, one paragraph each, for a class docstring."""
    lines = ["", "", "Attributes:"]
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            text = f.metadata["help"] + (f". {f.metadata['detail']}" if f.metadata["detail"] else "")
            lines.append(f"    {f.name} (default {f.default!r}): {text}")
    return "\n".join(lines)


def pick(cls: type[T], arguments: Mapping[str, Any]) -> T:
    """A `cls` from those of `arguments` (e.g. a method's `locals()`) that are its fields; the
    other fields keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in arguments.items() if k in names})


@dataclass(frozen=True)
class ChangeOptions:
    """How a change is sent: the options that `set_learning_rate`, `scale_learning_rate` and
    `swap_schedule` (sync and asyncio clients) take as keyword arguments, and `update`,
    `update_learning_rate` and `cancel_change` take in part."""

    apply_at_step: int | None = option(
        None, "apply at the first step boundary at or after this step (unset: the next one)",
        flag="--at-step", metavar="N")
    apply_after_steps: int | None = option(
        None, "apply this many steps after the first boundary that sees the change",
        "Excludes `apply_at_step`",
        flag="--after-steps", metavar="N", minimum=0)
    expected_version: int | None = option(
        None, "refused unless the state version is still this",
        "`VersionConflict` on arrival, or status ABORTED if it changes before the "
        "boundary; `update` raises at once if the state it reads is at another version",
        flag="--expected-version", metavar="V")
    expected_run_id: str = option(
        "", "refused unless the run has this run id (unset: any run)",
        "`FailedPrecondition`, reason RUN_ID_MISMATCH, metadata current_run_id: it fences "
        "a restarted trainer or another job on the same address",
        flag="--expected-run-id", metavar="ID")
    expected_incarnation: str = option(
        "", "refused unless the trainer process has this incarnation (unset: any)",
        "`FailedPrecondition`, reason INCARNATION_MISMATCH, metadata current_incarnation. "
        "`TrainingState.incarnation` is new at every start, a resume from a checkpoint "
        "included",
        flag="--expected-incarnation", metavar="ID")
    reason: str = option("", "free text recorded with the change", flag="--reason",
                         metavar="TEXT")
    validate_only: bool = option(
        False, "a dry run: validate against the trainer, change nothing",
        "The answer's status is VALIDATED",
        flag="--dry-run")
    preview_steps: int = option(
        0, "with a dry run: preview and check the guardrails over this many steps",
        "The answer's `Change.preview` and `Change.preview_current` hold the learning rate "
        "with and without the change",
        flag="--preview-steps", metavar="N", minimum=0)
    force: bool = option(
        False, "skip the trainer's max_change_factor guardrail (never its LR bounds)",
        flag="--force")
    wait: bool = option(
        False, "wait until the change is applied",
        "On timeout `DeadlineExceeded` is raised and the change stays pending",
        flag="--no-wait")
    request_id: str | None = option(
        None, "idempotency key (unset: a new UUID4, so retries never apply a change twice)")


ChangeOptions.__doc__ = (ChangeOptions.__doc__ or "") + describe_fields(ChangeOptions)


@dataclass(frozen=True)
class Scale:
    """A change: multiply the active schedule by `factor` (the schedule keeps its kind and keeps
    running; cumulative with earlier scales). `scale_learning_rate` sends it."""

    factor: float


@dataclass(frozen=True)
class Pin:
    """A change: pin the learning rate to the constant `learning_rate` (resets the scale to 1).
    `set_learning_rate` sends it."""

    learning_rate: float


@dataclass(frozen=True)
class Parameters:
    """A change: set optimizer hyperparameters (e.g. `momentum`, `beta_2`, `weight_decay`) or
    variables the training script registered, by name. `set_optimizer_parameters` sends it;
    `TrainingState.hyperparameters` lists what the trainer has."""

    parameters: Mapping[str, float]


@dataclass(frozen=True)
class Swap:
    """A change: replace the schedule (resets the scale to 1). `swap_schedule` sends it.

    `schedule` is a `Schedule`, a kind message (e.g. `pb.ExponentialDecay`), a
    `keras.optimizers.schedules.serialize()` dict or a Keras schedule object
    (`lrctl.client.schedules.to_schedule`)."""

    schedule: ScheduleLike
    origin: Origin = option(  # noqa: RUF009 -- option() is a dataclasses.field
        "restart", "restart: the schedule starts at its own step 0 where it is applied; "
        "global: it runs at the optimizer's iteration count, as Keras does",
        "Or a `pb.StepOrigin` value",
        flag="--origin", choices=("restart", "global"))
    schedule_start_step: int = option(
        0, "with origin restart: the new schedule starts at this step of its own",
        "E.g. another trainer's `step - schedule_origin_step`",
        flag="--schedule-start-step", metavar="N", minimum=0)
    scale: float | None = option(
        None, "the cumulative scale, set in the same change (unset: 1)", flag="--scale",
        metavar="F")


Swap.__doc__ = (Swap.__doc__ or "") + describe_fields(Swap)

#: What `update`'s function returns: the change to make, or None for none.
Decision = Scale | Pin | Swap | None
