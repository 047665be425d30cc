"""TrainingControl, what a trainer embeds: the optimizer's schedule, the controller, and the
step boundary, from `model.fit` (its callback) or a custom loop (`step_boundary`).

A façade over one module per job: `attach` (the schedule on the optimizer), `engine_target`
(engine I/O), `step_clock`, `boundary` (what a step boundary does in fit or a custom loop:
applying due changes, noticing restores), `lifecycle` (begin, stop, end), `publishing`,
`divergence` (revert_on_nan), `exchange` (several workers), `local_changes` (Keras's LR
callbacks) and `fit_callback`. Training thread only, except `request_stop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from lrctl.service.control.changes import Change
from lrctl.service.control.controller import Controller
from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails
from lrctl.service.errors import FailedPreconditionError
from lrctl.service.schedules import specs
from lrctl.service.schedules.specs import ActiveSchedule
from lrctl.service.training import exploit, local_changes
from lrctl.service.training.attach import attach
from lrctl.service.training.boundary import Boundary
from lrctl.service.training.divergence import DivergenceGuard, DivergenceWatch
from lrctl.service.training.engine_target import EngineTarget
from lrctl.service.training.exchange import DeferredLoads, WorkerSync, worker_count
from lrctl.service.training.fit_callback import ControlCallback
from lrctl.service.training.hyperparams import OptimizerParameters
from lrctl.service.training.lifecycle import Lifecycle
from lrctl.service.training.publishing import Publisher
from lrctl.service.training.run_actions import RunActions
from lrctl.service.training.step_clock import StepClock

if TYPE_CHECKING:
    from lrctl.service.training.checkpoints import Checkpointer


class TrainingControl:
    """What a trainer embeds: the optimizer's schedule, the controller, and the step boundary.

    With `model.fit`, pass `control.callback` in `callbacks`. In a custom loop, call
    `control.step_boundary(logs)` between steps inside `with control.training():`.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, *, run_id: str | None = None,
                 history_size: int = 100, publish_interval: float = 0.1,
                 guardrails: Guardrails = NO_GUARDRAILS, revert_on_nan: int | None = None,
                 model: keras.Model | None = None,
                 variables: Sequence[keras.Variable] | None = None,
                 strategy: tf.distribute.Strategy | None = None, sync_every: int = 1,
                 initial_schedule: specs.ScheduleSpec | None = None,
                 incarnation: str | None = None,
                 checkpoint_root: str | os.PathLike[str] | None = None) -> None:
        """`revert_on_nan=K` (opt-in; None or 0: off) undoes a change if the loss becomes NaN or
        Inf within K steps after it: at the next step boundary, the weights and the optimizer's
        slots go back to what they were just before the change's first step, the previous
        schedule comes back as a new version, recorded as an applied change whose reason starts
        with "auto-revert:", and the run goes on at the old learning rate. The step counter
        keeps moving forward. Under `fit` the callback knows the model; in a custom loop pass
        `model=` (or the weights as `variables=`) and the loss as `logs["loss"]` to
        `step_boundary`. Cost: nothing outside the K steps after a change; at the change, one
        host copy of the weights and the optimizer's slots (~2x the model for SGD with
        momentum, ~3x for Adam), held while the window is open; inside it, a device sync per
        boundary to read the step and the loss. Leave it off for a model too big for host memory.

        Under a MultiWorkerMirroredStrategy spanning several workers, pass `strategy=`: the
        chief (`is_chief`) serves the API and applies changes; at every `sync_every`-th step
        boundary all workers exchange the schedule in one small all-reduce, so every worker
        switches at the same step (`exchange`). Changes then land at those boundaries only,
        decided one exchange ahead (the all-reduce runs while the next steps train). Every
        worker must call `step_boundary` at every step.

        `initial_schedule` replaces the optimizer's learning rate as version 0, the state the
        run starts from (lrctl-trainer's --learning-rate and --schedule). `incarnation`: the
        process's, if drawn already (None: the controller draws one).

        Run actions (PauseTraining, ResumeTraining, SaveCheckpoint, StopTraining, LoadCheckpoint)
        apply at the step boundary like any change. SaveCheckpoint needs a `Checkpointer` of
        this control (creating one registers it as `checkpointer`); LoadCheckpoint reads only
        under `checkpoint_root` (lrctl-trainer's --checkpoint-root; None: refused) and needs the
        model (`fit`'s, `model=`, or the Checkpointer's).
        """
        self.optimizer = optimizer
        #: Where LoadCheckpoint may read (None: nowhere); the Checkpointer SaveCheckpoint and
        #: StopTraining write with (None: no checkpoints; a Checkpointer sets itself here).
        self.checkpoint_root = None if checkpoint_root is None else Path(checkpoint_root)
        self.checkpointer: Checkpointer | None = None
        self.schedule = attach(optimizer)
        if initial_schedule is not None:
            self.schedule.load(ActiveSchedule(initial_schedule), version=0)
        #: The engine as the controller and the exchange drive it.
        self.engine = EngineTarget(self.schedule)
        several = worker_count(strategy) > 1
        # Several workers: the chief's changes load at the next exchange, on every worker at once.
        deferred = DeferredLoads(self.engine) if several else None
        if several and revert_on_nan:
            raise ValueError("revert_on_nan is not supported in a multi-worker job: a revert "
                             "restores one worker's weights; restore a checkpoint on all instead")
        guardrails = dataclasses.replace(guardrails, revert_on_nan_steps=revert_on_nan or 0)
        self.controller = Controller(deferred or self.engine, run_id=run_id, optimizer=type(optimizer).__name__,
                                     history_size=history_size, guardrails=guardrails,
                                     incarnation=incarnation)
        #: The exchange with the other workers of a multi-worker job; None for one worker.
        self.workers = WorkerSync(strategy, self.engine, self.controller, deferred, sync_every) \
            if deferred is not None else None
        #: The optimizer's hyperparameters and the registered variables (SetOptimizerParameters).
        self.parameters = OptimizerParameters(optimizer, unsupported="" if self.workers is None else (
            "SetOptimizerParameters is not supported in a multi-worker job yet: the exchange "
            "carries the schedule only; start the job with the hyperparameters it needs"))
        self.controller.attach_parameters(self.parameters)
        self.schedule.set_bounds(guardrails.min_learning_rate, guardrails.max_learning_rate)
        self.clock = StepClock(optimizer.iterations)
        # `self.resync` reaches `_boundary`, made below, only when called.
        self._publisher = Publisher(self.controller, self.engine, self.clock, self.resync, publish_interval)
        #: The divergence guard, None when off: then nothing is ever snapshotted.
        self.divergence = DivergenceGuard(revert_on_nan, optimizer, self.schedule) if revert_on_nan else None
        self._watch = None if self.divergence is None else DivergenceWatch(
            self.divergence, self.controller, self.clock, model, variables, self.resync, self._publisher.soon)
        self._run = Lifecycle(self.controller, self.clock, self._publisher, self.resync, self.divergence,
                              self.workers, model)
        self._boundary = Boundary(self.controller, self.engine, self.clock, self._publisher, self._watch,
                                  self.workers, self._run)
        self.callback = ControlCallback(self)
        self.controller.run_target = RunActions(self)
        if self.workers is not None:
            self.controller.set_boundaries(self.workers.boundaries)
        local_changes.route_learning_rate_assignments(self)
        self.publish(force=True)  # readers see the starting LR before the first step

    def register(self, name: str, variable: keras.Variable | tf.Variable,
                 bounds: tuple[float | None, float | None] = (None, None)) -> None:
        """Make a scalar floating variable of the training script (a dropout rate, a loss
        weight, label smoothing...) settable by SetOptimizerParameters as `name`, within
        `bounds` (min, max; inclusive; None: open), with the same guarantees as the optimizer's
        own: validated, versioned, in history, applied between steps. The variable is yours:
        checkpoint it with your model (a resume restores it; GetState reads it). Training
        thread, before or between steps; a variable read in the compiled step takes effect
        at the next step with no retrace."""
        self.parameters.register(name, variable, bounds)
        self.controller.attach_parameters(self.parameters)
        self.publish(force=True)

    @property
    def step(self) -> int:
        """Completed optimizer steps. Reads a variable (a device sync): training thread only."""
        return self.clock.read()

    def reached(self, step: int) -> bool:
        """Whether `step` steps have completed. Reads the step only when the step clock says
        it may have."""
        return self.clock.reached(step)

    def step_boundary(self, logs: Mapping[str, Any] | None = None) -> list[Change]:
        """Between two steps of a custom loop: apply due changes, publish the last step's
        logs (throttled), and return the changes that ended here. The step is read at every
        call (one scalar read): a custom loop may run any number of steps between calls, and
        `apply_at_step` must never land late.

        With `revert_on_nan`, pass the last step's loss as `logs["loss"]`: inside the K steps
        after a change it is read (a device sync if it is a tensor) and a NaN or Inf reverts."""
        return self._boundary.custom_loop_step(logs)

    def before_batch(self, steps: int | None, logs: Mapping[str, Any] | None = None, *,
                     logs_step: int | None = None, logs_time: float | None = None) -> None:
        """At a step boundary in `fit` (its callback calls this): apply due changes and publish.
        `steps` bounds how many steps the coming batch runs (steps_per_execution); None if
        unknown. The step is read only when the step clock says a change may be due, so an
        idle boundary costs one lock and no device sync."""
        self._boundary.before_batch(steps, logs, logs_step=logs_step, logs_time=logs_time)

    def request_stop(self) -> None:
        """Ask the run to stop (any thread; a signal handler too). `should_stop` turns true
        at once, or, in a multi-worker job, at the next exchange, on every worker together."""
        self._run.asked = True

    @property
    def should_stop(self) -> bool:
        """Whether the loop should end after this step boundary: in a multi-worker job, on
        every worker after the same step (a worker that stopped alone would hang the rest)."""
        return self._run.should_stop

    @property
    def is_chief(self) -> bool:
        """Whether this process serves the API: always, except on a multi-worker job's
        followers (they take the chief's schedule at each exchange)."""
        return self.workers is None or self.workers.is_chief

    def assign_learning_rate(self, value: Any, *, source: str) -> Change | None:
        """A float assigned to the optimizer's `learning_rate` by `source` (Keras's
        ReduceLROnPlateau, LearningRateScheduler, user code), between steps: a local change,
        pinned at once (see `local_changes.assign_learning_rate`). Returns the applied record,
        or None if refused (logged, never raised: it would crash `fit`)."""
        return local_changes.assign_learning_rate(self, value, source, self._boundary.apply_due)

    def resync(self) -> bool:
        """Notice a restore (BackupAndRestore, tf.train.Checkpoint, load_weights) that replaced
        the engine's variables behind the controller's back, whatever the callback order, so
        that the next change builds on the restored state and the version never goes back.
        Training calls it before every change and at train begin; call it yourself after
        restoring a checkpoint by hand if readers should see the restored state at once.
        Returns whether it noticed one."""
        return self._boundary.resync()

    def publish(self, logs: Mapping[str, Any] | None = None, *, force: bool = False,
                logs_step: int | None = None, logs_time: float | None = None) -> None:
        """Publish the state (throttled unless `force`). `logs` were taken at `logs_step` and
        `logs_time` (default: the current step, now)."""
        self._publisher.publish(logs, force=force, logs_step=logs_step, logs_time=logs_time)

    # -- run actions (RunActions, at a step boundary) ----------------------------------------
    def finish_requested(self) -> None:
        """A StopTraining applied: `should_stop` turns true and `fit` stops (Keras runs the batch
        it has begun: it checks `stop_training` after it); the run ends FINISHED."""
        self._run.finish()

    def model_for_load(self) -> keras.Model:
        model = self._run.model or (self.checkpointer.model if self.checkpointer is not None else None)
        if model is None:
            raise FailedPreconditionError("LoadCheckpoint needs the model: train with fit, or pass "
                                          "TrainingControl(..., model=model)")
        return model

    def kept_on_load(self, load_hyperparameters: bool) -> list[Any]:
        """What a LoadCheckpoint leaves as it is: this run's step and lrctl's own schedule
        variables (with `load_hyperparameters` the checkpoint's schedule comes in as a new
        version through the controller, never by overwriting them), and, unless it loads
        them, the hyperparameters (so that the orchestrator explores them next)."""
        kept: list[Any] = exploit.run_variables(self.optimizer)
        return kept if load_hyperparameters else [*kept, *self.parameters.variables()]

    def weights_replaced(self) -> None:
        """The weights were replaced at a boundary (a load): a revert_on_nan snapshot belongs
        to the timeline before it, and is never put back."""
        if self._watch is not None:
            self._watch.weights_replaced()

    # -- the run's lifecycle ---------------------------------------------------------------
    def begin(self) -> None:
        """Training starts (or resumes after a restore): sync with the engine's variables."""
        self._run.begin()

    def end(self, failed: bool = False, logs: Mapping[str, Any] | None = None, *,
            logs_step: int | None = None, logs_time: float | None = None) -> None:
        """The run is over: FAILED if `failed`, STOPPED after a shutdown, else FINISHED."""
        self._run.end(failed, logs, logs_step=logs_step, logs_time=logs_time)

    @contextlib.contextmanager
    def training(self) -> Iterator[TrainingControl]:
        """Brackets a whole run: TRAINING inside, FINISHED or FAILED after.

        Use it around a custom loop, or around several `fit` calls: inside it, the end of
        one `fit` does not end the run, so pending changes carry over to the next `fit`.
        """
        with self._run.bracket():
            yield self

    @property
    def inside_training(self) -> bool:
        """Whether `training()` brackets the run: then the end of one `fit` does not end it."""
        return self._run.inside_training

    # -- fit's hooks (the callback's) ------------------------------------------------------
    def fit_begins(self, model: keras.Model) -> None:
        """fit starts: with revert_on_nan, its model and loss tracker are what is watched."""
        self._run.fit_begins(model)
        if self._watch is not None:
            self._watch.fit_begins(model)

    def epoch_begins(self, epoch: int, steps_per_batch: int | None) -> int:
        """fit starts an epoch: returns its first step. An epoch start is a step boundary: what
        is due applies before the callbacks listed after lrctl's run, so a
        LearningRateScheduler reads the LR a client set between epochs."""
        return self._boundary.epoch_begins(epoch, steps_per_batch)

    def epoch_ends(self, epoch: int, logs: Mapping[str, Any] | None, *, complete: bool) -> None:
        """fit ended an epoch (`complete`: all its steps ran): publish its logs (`val_*`
        included) with the step and LR they were taken at; revert_on_nan checks its last steps."""
        self._boundary.epoch_ends(epoch, logs, complete=complete)

    def fit_ends(self, logs: Mapping[str, Any] | None, *, logs_step: int | None,
                 logs_time: float | None) -> None:
        """fit returned: the run ends with it, unless `training()` brackets several."""
        if self._watch is not None:
            self._watch.fit_ends()
        self._run.fit_ends(logs, logs_step=logs_step, logs_time=logs_time)


__all__ = ["TrainingControl"]
