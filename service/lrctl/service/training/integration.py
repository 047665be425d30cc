"""The Keras layer: puts a ControllableSchedule on an optimizer and calls the controller at
step boundaries, from `model.fit` (a callback) or from a custom training loop.

This is the only module where the controller meets TensorFlow, and it runs on the training
thread alone: it applies queued changes before a step and publishes a snapshot after one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lrctl.service.control.controller import (
    Boundaries,
    Change,
    ChangeRequest,
    ChangeStatus,
    Controller,
    Phase,
    PinLearningRate,
)
from lrctl.service.control.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from lrctl.service.control.guardrails import NO_GUARDRAILS, Guardrails
from lrctl.service.observability.logs import short
from lrctl.service.schedules import forms, specs
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.packing import Packer
from lrctl.service.schedules.specs import ActiveSchedule, Constant
from lrctl.service.training.divergence import DivergenceGuard, Window
from lrctl.service.training.exchange import WorkerSync, worker_count

logger = logging.getLogger("lrctl")


def _lr_owner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer whose learning rate moves the weights. A LossScaleOptimizer (what
    compile() makes under mixed precision) only wraps one and never reads its own."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def attach(optimizer: keras.optimizers.Optimizer) -> ControllableSchedule:
    """Give `optimizer` a ControllableSchedule that starts where its learning rate is now.

    Works for a float learning rate or any Keras built-in schedule, before the optimizer has
    taken its first step. Its variables join the optimizer's, so any checkpoint of the
    optimizer (`tf.train.Checkpoint`, `model.save_weights`, BackupAndRestore) carries them.
    To restore, attach first, then restore: Keras's `load_weights` skips (with a warning)
    the state of an optimizer that is not built yet, so build it before `load_weights`.
    A LossScaleOptimizer gets the schedule on its inner optimizer, which applies the updates.
    Load a `.keras` file with lrctl.service.load_model, not keras.models.load_model.
    """
    owner = _lr_owner(optimizer)
    current = owner._learning_rate
    if isinstance(current, ControllableSchedule):
        schedule = current
        if schedule.saved_optimizer_layout is not None:
            raise ValueError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': it was rebuilt from a saved "
                "config (keras.models.load_model does this) without its saved state, so its step "
                "count and slots (e.g. Adam's moments) would restart from zero under lrctl's "
                f"restored schedule (version {schedule.read()[1]}). Keras skips that state because "
                "lrctl's variables change the optimizer's variable count. Load the file with "
                "lrctl.service.load_model(path), which restores it."
            )
    else:
        if owner.built:
            raise ValueError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': it has already been built, so "
                "a compiled train step may hold its current learning rate and would ignore a new "
                "one. Attach before the first step (after compile() and before fit() is fine), or "
                "build the optimizer with lrctl.service.build_optimizer()."
            )
        if isinstance(current, keras.Variable):
            # The shortest decimal that is this float32, i.e. what the user typed (0.1, not
            # 0.10000000149011612), so reports show the value as it was asked for.
            initial: Any = float(str(np.asarray(current.numpy()).astype(np.float32)))
        elif isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            try:
                initial = specs.as_spec(current)
            except ValueError as e:
                raise ValueError(
                    f"Cannot attach lrctl to optimizer '{optimizer.name}': its learning rate is a "
                    f"custom schedule ({type(current).__name__}) that lrctl cannot express. Use a "
                    "Keras built-in schedule or lrctl's PiecewiseLinear."
                ) from e
        else:
            raise TypeError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': its learning rate is a "
                f"callable ({current!r}), which lrctl cannot read. Pass a float or a schedule."
            )
        # The schedule's variables must live where the optimizer's do (same strategy).
        strategy = getattr(owner, "_distribution_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            schedule = ControllableSchedule(initial)
        # Not the `learning_rate` setter: it untracks the float LR variable, and deleting from
        # the optimizer's append-only variable list makes tf.train.Checkpoint refuse to save.
        owner._learning_rate = schedule
        if isinstance(current, keras.Variable):
            schedule.retired = (current,)  # still tracked, but a .keras load need not restore it
    # Tracked by the owner, so a wrapper's `variables` (its own + the owner's) hold them too.
    tracked = {id(v) for v in owner.variables}
    for variable in schedule.checkpointed:
        if id(variable) not in tracked:
            owner._track_variable(variable)
    schedule.optimizer_ref = weakref.ref(owner)  # get_config records where its variables sit
    return schedule


def build_optimizer(optimizer: str | type = "adam", learning_rate: object = 0.001,
                    **kwargs: Any) -> keras.optimizers.Optimizer:
    """An optimizer (a Keras name such as "adam", or a class) whose learning rate is a
    ControllableSchedule starting at `learning_rate` (a float or a Keras built-in schedule).

    Create it inside `strategy.scope()` when training under tf.distribute.
    """
    cls = type(keras.optimizers.get(optimizer)) if isinstance(optimizer, str) else optimizer
    instance = cls(learning_rate=ControllableSchedule(learning_rate), **kwargs)
    attach(instance)
    return instance


#: The TrainingControl that owns each schedule (weakly both ways): where a float assigned to
#: its optimizer's `learning_rate` goes.
_CONTROLS: weakref.WeakKeyDictionary[ControllableSchedule, weakref.ReferenceType[TrainingControl]] = \
    weakref.WeakKeyDictionary()


def _route_learning_rate_assignments() -> None:
    """Make `optimizer.learning_rate = 0.001` work on an optimizer that a TrainingControl owns:
    Keras's ReduceLROnPlateau and LearningRateScheduler do exactly that, and Keras's setter
    raises TypeError for any optimizer whose learning rate is a schedule, as lrctl's is.

    `learning_rate` is a property of Keras's BaseOptimizer, and a property cannot be overridden
    on an instance, so its setter is wrapped on the class, once per process. For an optimizer no
    TrainingControl owns, Keras's own setter runs, unchanged. (A per-instance subclass, swapped
    in with `__class__`, would change the optimizer's type: Keras would serialize it as a
    custom class in get_config and `.keras` files, and pickling by reference would break.)
    A LossScaleOptimizer's setter forwards to its inner optimizer, which holds the schedule.
    """
    base = next(c for c in keras.optimizers.Optimizer.__mro__ if "learning_rate" in vars(c))
    keras_property = vars(base)["learning_rate"]
    if getattr(keras_property.fset, "lrctl_routed", False):
        return

    def set_learning_rate(optimizer: keras.optimizers.Optimizer, value: Any) -> None:
        schedule = getattr(optimizer, "_learning_rate", None)
        ref = _CONTROLS.get(schedule) if isinstance(schedule, ControllableSchedule) else None
        control = ref() if ref is not None else None
        if control is None:
            keras_property.fset(optimizer, value)
        else:
            control.assign_learning_rate(value, source=_assigner(sys._getframe(1)))

    set_learning_rate.lrctl_routed = True  # type: ignore[attr-defined]
    setattr(base, "learning_rate", property(keras_property.fget, set_learning_rate,  # noqa: B010
                                            keras_property.fdel, keras_property.__doc__))


def _assigner(frame: types.FrameType | None) -> str:
    """Who assigned `optimizer.learning_rate`: the class of the first caller that is not an
    optimizer (a LossScaleOptimizer forwards), e.g. "ReduceLROnPlateau"; else the calling
    function. A few frame reads, at each assignment (an epoch end), never per step."""
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.optimizers.Optimizer):
            frame = frame.f_back
            continue
        if owner is not None:
            return type(owner).__name__
        code = frame.f_code
        return f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
    return "unknown caller"


class _EngineTarget:
    """The controller's view of the engine. Runs on the training thread only.

    Reading or loading the engine is one compiled call with one int64 vector (lrctl.service.
    packing), not one eager op per variable: ~3 ms per change became ~0.3 ms (bench/swap.py)."""

    def __init__(self, schedule: ControllableSchedule) -> None:
        self._schedule = schedule
        variables = schedule.variables
        self._packer = packer = Packer(variables)
        # One compiled graph for "LR at step" (as clamped, not counted) and the clamp count:
        # eager evaluation would cost ~80 eager ops.
        self._lr_at = tf.function(
            lambda step: (schedule.bounded(step, count=False), schedule.clamp_count_variable.value),
            input_signature=[tf.TensorSpec([], tf.int64)],
        )
        self._read_all = tf.function(lambda: packer.pack_tensors([v.value for v in variables]))

        @tf.function(input_signature=[tf.TensorSpec([packer.size], tf.int64)])
        def assign_all(vector: tf.Tensor) -> None:
            for variable, value in zip(variables, packer.unpack_tensor(vector), strict=True):
                variable.assign(value)

        self._assign_all = assign_all
        #: What the variables held at the last read or load: put back if a load fails.
        self._held: np.ndarray | None = None
        self._stamp_at = packer.offset_of(schedule.stamp_variable)
        self._version_at = packer.offset_of(schedule.version_variable)

    def replaced(self) -> bool:
        """Whether something (a restore) may have changed the variables since the last read
        or load: one scalar read of the stamp every load writes."""
        return self._held is None or self._schedule.stamp() != int(self._held[self._stamp_at])

    def load(self, state: ActiveSchedule, version: int) -> None:
        """All or nothing: the values are converted first; if the assignment fails, what the
        variables held before is put back."""
        self.load_packed(self._packer.pack(self._schedule.values_of(state, version)))

    def load_packed(self, vector: np.ndarray) -> None:
        old = self._held if self._held is not None else self.read_packed()
        try:
            self._assign_all(tf.constant(vector))
        except Exception:
            self._assign_all(tf.constant(old))
            raise
        self._held = vector

    def read(self) -> tuple[ActiveSchedule, int]:
        return self.state_in(self.read_packed())

    def state_in(self, vector: np.ndarray) -> tuple[ActiveSchedule, int]:
        """The schedule and version a packed vector holds (host only, no TensorFlow)."""
        return self._schedule.state_of(self._packer.unpack(vector))

    def version_in(self, vector: np.ndarray) -> int:
        return int(vector[self._version_at])

    def read_packed(self) -> np.ndarray:
        self._held = np.asarray(self._read_all())
        return self._held

    def learning_rate(self, step: int) -> float:
        return self.learning_rate_and_clamps(step)[0]

    def learning_rate_and_clamps(self, step: int) -> tuple[float, int]:
        """The LR the optimizer gets at `step` and the engine's clamp count: one call."""
        lr, clamps = self._lr_at(tf.constant(step, tf.int64))
        return float(lr), int(clamps)


def _to_floats(logs: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue  # non-scalar logs (e.g. per-class metrics) are not published
    return out


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
                 incarnation: str | None = None) -> None:
        """`revert_on_nan=K` (opt-in; None or 0: off) undoes a change if the loss becomes NaN or
        Inf within K steps after it: at the next step boundary, the weights and the optimizer's
        slots go back to what they were just before the change's first step, the previous
        schedule comes back as a new version, recorded as an applied change whose reason starts
        with "auto-revert:" (in GetState/WatchState's recent changes and ListChanges), and the
        run goes on at the old learning rate. The step counter keeps moving forward. Under
        `fit` the callback knows the model; in a custom loop pass `model=` (or the weights as
        `variables=`) and the loss as `logs["loss"]` to `step_boundary`.

        Cost: outside the K steps after a change, nothing (one attribute read per boundary; no
        device sync, no loss read). At a boundary where a change applies, one device-to-host
        copy of the watched variables. Inside the window, every boundary reads the step and the
        last batch's loss: a device sync each step, which stalls the input/compute overlap for
        those K steps. Memory: while a window is open, one host (numpy) copy of the weights and
        the optimizer's slots: ~2x the model's size for SGD with momentum, ~3x for Adam. For a
        model too big for host memory, leave it off; issue #8's checkpoints will offer an
        alternative (restore from a checkpoint instead of a host copy).

        Under `fit` the loss read is Keras's loss tracker (the epoch's running mean, exact and
        on the training thread); a revert resets the model's metrics, so the epoch's reported
        metrics restart there instead of staying NaN. A change applied while the loss is
        already non-finite is not watched (the snapshot would hold NaN weights): it is logged.

        Under a MultiWorkerMirroredStrategy spanning several workers, pass `strategy=`: the
        chief (`is_chief`) serves the API and applies changes; at every `sync_every`-th step
        boundary all workers exchange the schedule in one small all-reduce, so every worker
        switches at the same step (lrctl.service.training.exchange). Changes then land at those
        boundaries only. Every worker must call `step_boundary` at every step.

        `initial_schedule` replaces the optimizer's learning rate as version 0, the state the
        run starts from (lrctl-trainer's --learning-rate and --schedule). `incarnation`: the
        process's, if drawn already (None: the controller draws one).
        """
        self.optimizer = optimizer
        self.schedule = attach(optimizer)
        if initial_schedule is not None:
            self.schedule.load(ActiveSchedule(initial_schedule), version=0)
        self._target = _EngineTarget(self.schedule)
        #: The exchange with the other workers of a multi-worker job; None for one worker.
        self.workers = WorkerSync(strategy, self._target, sync_every) \
            if worker_count(strategy) > 1 else None
        if self.workers is not None and revert_on_nan:
            raise ValueError("revert_on_nan is not supported in a multi-worker job: a revert "
                             "restores one worker's weights; restore a checkpoint on all instead")
        guardrails = dataclasses.replace(guardrails, revert_on_nan_steps=revert_on_nan or 0)
        self.controller = Controller(self._target, run_id=run_id, optimizer=type(optimizer).__name__,
                                     history_size=history_size, guardrails=guardrails,
                                     incarnation=incarnation)
        self.schedule.set_bounds(guardrails.min_learning_rate, guardrails.max_learning_rate)
        self._publish_interval = publish_interval
        self._stop_asked = self._stop_agreed = False
        self._last_publish = -float("inf")
        self._epoch: int | None = None  # None: keep the controller's (0, or a resumed run's)
        self._run_open = False  # inside training(): the run outlives a single fit()
        # The one step clock. At most this many steps will have completed at the next
        # boundary: lets the hot path skip reading the step, a device sync. `_in_flight` is
        # how many steps the batch announced by `before_batch` may still run; a read of `step`
        # sets the bound to the step read plus those, so a read by another callback after the
        # announcement (a checkpoint) never lowers it below the coming batch's end.
        self._step_ceiling: float = 0
        self._in_flight: float = 0
        #: The divergence guard, None when off: then nothing is ever snapshotted.
        self.divergence = DivergenceGuard(revert_on_nan, optimizer, self.schedule) if revert_on_nan else None
        self._model = model
        self._variables = list(variables) if variables is not None else None
        # Where the guard reads the latest loss: fit's loss tracker while fit runs (set by the
        # callback), else the logs given to step_boundary.
        self._fit_loss: Callable[[], float | None] | None = None
        self._boundary_logs: Mapping[str, Any] | None = None
        self._warned_no_loss = False
        self.callback = _ControlCallback(self)
        if self.workers is not None:  # only exchanges are boundaries, every worker at the same steps
            self.controller.set_boundaries(Boundaries(0, self.workers.every))
        _route_learning_rate_assignments()
        _CONTROLS[self.schedule] = weakref.ref(self)
        self.publish(force=True)  # readers see the starting LR before the first step

    @property
    def step(self) -> int:
        """Completed optimizer steps. Reads a variable (a device sync): training thread only."""
        step = int(np.asarray(self.optimizer.iterations.numpy()))
        self._step_ceiling = step + self._in_flight
        return step

    def reached(self, step: int) -> bool:
        """Whether `step` steps have completed. Reads the step only when the step clock says
        it may have; never moves the clock's bound below what the coming batch may reach."""
        return self._step_ceiling >= step and self.step >= step

    def step_boundary(self, logs: Mapping[str, Any] | None = None) -> list[Change]:
        """Between two steps of a custom loop: apply due changes, publish the last step's
        logs (throttled). The step is read at every call (one scalar read): a custom loop may
        run any number of steps between calls, and `apply_at_step` must never land late.

        With `revert_on_nan`, pass the last step's loss as `logs["loss"]`: inside the K steps
        after a change it is read (a device sync if it is a tensor) and a NaN or Inf reverts."""
        if self.divergence is not None and self._model is None and self._variables is None:
            raise ValueError("revert_on_nan in a custom loop needs the weights to snapshot: "
                             "pass TrainingControl(..., model=model) or variables=[...]")
        step = self.step
        self._boundary_logs = logs
        if self.divergence is not None and self.divergence.watching:
            self._watch(self._logged_loss(logs))
        applied = self._apply_due(step) if self._may_apply(step) and self.controller.at_boundary(step) else []
        self._exchange(step)
        self.publish(logs)
        return applied

    def request_stop(self) -> None:
        """Ask the run to stop (any thread; a signal handler too). `should_stop` turns true
        at once, or, in a multi-worker job, at the next exchange, on every worker together."""
        self._stop_asked = True

    @property
    def should_stop(self) -> bool:
        """Whether the loop should end after this step boundary: in a multi-worker job, on
        every worker after the same step (a worker that stopped alone would hang the rest)."""
        return self._stop_agreed if self.workers is not None else self._stop_asked

    @property
    def is_chief(self) -> bool:
        """Whether this process serves the API: always, except on a multi-worker job's
        followers (they take the chief's schedule at each exchange)."""
        return self.workers is None or self.workers.is_chief

    def _may_apply(self, step: int) -> bool:
        # In a multi-worker job, only the chief applies, and only where all workers exchange.
        return self.workers is None or (self.workers.is_chief and self.workers.due(step))

    def _exchange(self, step: int) -> None:
        if self.workers is None or not self.workers.due(step):
            return
        taken, reports, stop = self.workers.exchange(step, self._stop_asked)
        self._stop_agreed = self._stop_agreed or stop
        if taken is not None:
            state, version = self._target.state_in(taken)
            self.controller.follow(state, version)
            logger.info("v%d step %d: took the chief's schedule: %s", version, step,
                        short(state.spec.describe()))
        self.controller.set_workers(reports)

    def before_batch(self, steps: int | None, logs: Mapping[str, Any] | None = None, *,
                     logs_step: int | None = None, logs_time: float | None = None) -> None:
        """At a step boundary in `fit`: apply due changes and publish. `steps` bounds how many
        steps the coming batch runs (steps_per_execution); None if unknown.

        The step is read only when a change may be due by the bound `_step_ceiling`, so an
        idle boundary costs one lock and no device sync. Inside a `revert_on_nan` window, the
        step and the loss are read at every boundary (a device sync each)."""
        self._in_flight = 0  # the last batch has run: a read here is exact
        if self.divergence is not None and self.divergence.watching:
            self._watch(self._current_loss())
        if self.workers is not None:  # every worker reads the step: exchanges need it exactly
            step = self.step
            if self._may_apply(step) and self.controller.at_boundary(step):
                self._apply_due(step)
            self._exchange(step)
        elif self.controller.at_boundary(self._step_ceiling):
            self._apply_due(self.step)
        self.publish(logs, logs_step=logs_step, logs_time=logs_time)
        self._in_flight = steps if steps is not None else math.inf
        self._step_ceiling += self._in_flight

    def apply_pending(self) -> list[Change]:
        """Apply the changes that are due now (at a step boundary)."""
        return self._apply_due(self.step)

    def assign_learning_rate(self, value: Any, *, source: str) -> Change | None:
        """A float assigned to the optimizer's `learning_rate` (by Keras's ReduceLROnPlateau or
        LearningRateScheduler, or user code): `source` did it on the training thread, between
        steps. It becomes a local change, pinned at this step boundary at once: validated and
        checked by the guardrails (rate limit included) like a client's, with a version, a
        record whose reason names `source`, and a journal line if the server has a journal.

        A refusal never raises (it would crash `fit`): it is logged as a warning naming `source`
        and the rule, and the learning rate stays. A value that is already the pinned learning
        rate changes nothing (a LearningRateScheduler assigns every epoch). Returns the
        applied record, or None."""
        try:
            lr = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{source} assigned {value!r} to optimizer.learning_rate, which lrctl controls: "
                "assign a Python float, between steps (not inside a tf.function), or change the "
                "schedule through lrctl (e.g. a SwapSchedule change)") from None
        request = ChangeRequest(PinLearningRate(lr), reason=f"local: {source} set optimizer.learning_rate")
        if self.workers is not None:
            error: Exception = FailedPreconditionError(
                "a local change in a multi-worker job would reach one worker only; change the "
                "learning rate through the chief's API")
            logger.warning("%s set optimizer.learning_rate = %g; not applied, the learning rate "
                           "stays: %s", source, lr, error)
            self._observe_local(request, error)
            return None
        step = self.step
        self.resync()
        state, _ = self.controller.engine_state
        if isinstance(state.spec, Constant) and \
                np.float32(forms.learning_rate(state, step)) == np.float32(lr):
            return None
        self.publish(force=True)  # the guardrails compare with the LR at this step
        try:
            pending = self.controller.submit(request)
        except (InvalidArgumentError, FailedPreconditionError, ResourceExhaustedError) as e:
            logger.warning("%s set optimizer.learning_rate = %g at step %d; lrctl refused it and the "
                           "learning rate stays %g: %s", source, lr, step,
                           forms.learning_rate(state, step), e)
            self._observe_local(request, e)
            return None
        finished = self._apply_due(step)
        record = next((c for c in finished if c.id == pending.id), pending)
        self._observe_local(request, record)
        return record if record.status is ChangeStatus.APPLIED else None

    def _observe_local(self, request: ChangeRequest, outcome: Change | Exception) -> None:
        for observe in list(self.controller.local_observers):
            try:
                observe(request, outcome)
            except Exception:  # the change stands; a broken journal must not crash fit
                logger.exception("could not journal a local change: %s", short(request.reason))

    def _apply_due(self, step: int) -> list[Change]:
        self.resync()
        before = self.controller.engine_state
        # The LR the run had at this step, not the last published one (which lags under decay).
        lr = forms.learning_rate(before[0], step)
        finished = self.controller.apply_due(step)
        for change in finished:
            reason = f" ({short(change.request.reason)})" if change.request.reason else ""
            if change.status is ChangeStatus.APPLIED:
                # As float32, the precision training uses, in its shortest exact form.
                logger.info("v%d step %d: lr %s -> %s  %s%s", change.version, change.applied_step,
                            np.float32(lr), np.float32(change.learning_rate_after),
                            short(change.description), reason)
                lr = change.learning_rate_after or lr
            else:
                error = f": {change.error}" if change.error else ""
                logger.warning("not applied (%s%s): %s%s", change.status.value, error,
                               short(change.description), reason)
        if finished:
            self._last_publish = time.monotonic()
        applied = [c.version for c in finished if c.status is ChangeStatus.APPLIED]
        if applied and self.divergence is not None:
            self._open_window(step, before, applied)
        return finished

    # -- the divergence guard (revert_on_nan), training thread only ----------------------------
    def _open_window(self, step: int, before: tuple[ActiveSchedule, int], applied: list[int]) -> None:
        """Changes `applied` were just loaded at this boundary: watch the next K steps."""
        assert self.divergence is not None
        if self._model is not None:
            weights, trainable = self._model.weights, self._model.trainable_variables
        elif self._variables is not None:
            weights, trainable = self._variables, [v for v in self._variables if v.trainable]
        else:  # apply_pending() before fit or step_boundary ever ran
            logger.warning("revert_on_nan: no model known yet; v%d is not watched", applied[-1])
            return
        loss = self._current_loss()
        if loss is not None and not math.isfinite(loss):
            logger.warning("revert_on_nan: the loss is already %s at step %d; v%d is not watched "
                           "(a snapshot now would hold the diverged weights)", loss, step, applied[-1])
            return
        window = self.divergence.open(step, weights, trainable, *before, applied)
        logger.info("v%d step %d: watching the loss until step %d (revert_on_nan; host copy %.3g MB "
                    "of the state at step %d)", applied[-1], step, window.until, window.nbytes / 1e6,
                    window.taken_at)

    def _watch(self, loss: float | None) -> None:
        """A boundary inside the window: revert if the loss is not finite, else maybe close."""
        assert self.divergence is not None
        step = self.step
        if loss is None and not self._warned_no_loss:
            self._warned_no_loss = True
            logger.warning("revert_on_nan: no loss to watch (fit's loss tracker, or logs['loss'] "
                           "given to step_boundary); changes cannot be reverted")
        window = self.divergence.check(step, loss)
        if window is not None:
            self._revert(window, step, loss)

    def _revert(self, window: Window, step: int, loss: float | None) -> None:
        if self.resync():  # a checkpoint was restored by hand since the change
            logger.warning("revert_on_nan: loss %s at step %d, but a restore replaced the state "
                           "since the change; not reverting", loss, step)
            return
        versions = "v" + ", v".join(str(v) for v in window.versions)
        reason = (f"auto-revert: loss was {loss} at step {step}, within {self.divergence_steps} "
                  f"steps of {versions}; weights and optimizer state restored from step "
                  f"{window.taken_at}, schedule of v{window.version}")
        # Weights first: if the engine load below fails, training still goes on from good weights.
        DivergenceGuard.restore(window)
        lr = forms.learning_rate(self.controller.engine_state[0], step)
        try:
            change = self.controller.apply_automatic(window.state, step=step, reason=reason)
        except Exception:
            logger.exception("revert_on_nan: weights restored but the old schedule could not be "
                             "loaded: %s", reason)
        else:
            logger.warning("v%d step %d: lr %.6g -> %.6g  %s", change.version, step, lr,
                           change.learning_rate_after, reason)
        if self._fit_loss is not None and self._model is not None:
            # Keras's loss tracker averages over the epoch: it would stay NaN until the epoch
            # ends, hiding the recovery from readers and from the next window's checks.
            self._model.reset_metrics()
        self._last_publish = -math.inf  # readers see the revert at once

    @property
    def divergence_steps(self) -> int:
        """K of revert_on_nan; 0 when off."""
        return self.divergence.steps if self.divergence is not None else 0

    def _current_loss(self) -> float | None:
        if self._fit_loss is not None:
            return self._fit_loss()
        return self._logged_loss(self._boundary_logs)

    @staticmethod
    def _logged_loss(logs: Mapping[str, Any] | None) -> float | None:
        value = (logs or {}).get("loss")
        return None if value is None else float(np.asarray(value))  # a tensor: a device sync

    def _fit_begins(self, model: keras.Model) -> None:
        """fit starts: its model is the one to snapshot unless another was given, and its loss
        tracker (Keras's running mean of the loss) is the loss to watch."""
        if self.divergence is None:
            return
        if self._model is None and self._variables is None:
            self._model = model
        tracker = next((m for m in model.metrics if m.name == "loss"), None)
        self._fit_loss = (lambda: float(np.asarray(tracker.result()))) if tracker is not None else None

    def _fit_ends(self) -> None:
        self._fit_loss = None

    def epoch_end(self, logs: Mapping[str, Any] | None) -> None:
        """At the end of a fit epoch: Keras resets its loss tracker before the next epoch's
        first boundary, so the epoch's last steps are checked here, with the epoch's training
        loss (validation, if any, has replaced the tracker's value by now)."""
        if self.divergence is not None and self.divergence.watching:
            self._watch(self._logged_loss(logs))

    def resync(self) -> bool:
        """Notice a restore (BackupAndRestore, tf.train.Checkpoint, load_weights) that replaced
        the engine's variables behind the controller's back, whatever the callback order, so
        that the next change builds on the restored state and the version never goes back.
        Training calls it before every change and at train begin; call it yourself after
        restoring a checkpoint by hand if readers should see the restored state at once.
        Returns whether it noticed one."""
        if not self._target.replaced():
            return False
        # A restore may have brought another run's bounds: these are this trainer's.
        limits = self.controller.guardrails
        self.schedule.set_bounds(limits.min_learning_rate, limits.max_learning_rate)
        state, version = self._target.read()
        if (state, version) != self.controller.engine_state:
            if self.divergence is not None and self.divergence.watching:
                # The snapshot belongs to the timeline the restore replaced: never put it back.
                self.divergence.close()
                logger.info("revert_on_nan: a restore replaced the state; the watch ends")
            now = self.controller.restored(state, version, step=self.step)
            if now != version:
                self.schedule.set_version(now)
                self._target.read_packed()  # what the variables hold now, version included
            logger.info("v%d: the schedule was restored (checkpoint version %d): %s",
                        now, version, short(state.spec.describe()))
            return True
        return False

    def publish(self, logs: Mapping[str, Any] | None = None, *, force: bool = False,
                logs_step: int | None = None, logs_time: float | None = None) -> None:
        """Publish the state (throttled unless `force`). `logs` were taken at `logs_step` and
        `logs_time` (default: the current step, now)."""
        now = time.monotonic()
        if not force and now - self._last_publish < self._publish_interval:
            return
        self._last_publish = now
        step = self.step
        if self._target.replaced():
            self.resync()
        lr, clamps = self._target.learning_rate_and_clamps(step)
        self.controller.publish(step=step, learning_rate=lr, lr_clamp_count=clamps,
                                metrics=_to_floats(logs) if logs is not None else None, epoch=self._epoch,
                                metrics_step=logs_step, metrics_time=logs_time)

    def publish_epoch(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        """Publish an epoch's end-of-epoch logs (`val_*` included), marked as such, with the
        step and learning rate they were taken at: one consistent state, never logs from a
        step later than the state's."""
        if logs:
            self.publish(force=True)
            step = self.controller.snapshot().step
            self.controller.publish_epoch(epoch=epoch, metrics=_to_floats(logs), step=step)

    def begin(self) -> None:
        """Training starts (or resumes after a restore): sync with the engine's variables."""
        self._in_flight = 0  # no batch announced yet: a read is exact
        self.resync()
        self.controller.set_phase(Phase.TRAINING)
        self.publish(force=True)

    def end(self, failed: bool = False, logs: Mapping[str, Any] | None = None, *,
            logs_step: int | None = None, logs_time: float | None = None) -> None:
        if self.divergence is not None:
            self.divergence.close()  # the run is over: free the host copy
        self.publish(logs, force=True, logs_step=logs_step, logs_time=logs_time)
        # A shutdown (SIGTERM, a stop vote) is not a completion: what was accepted stays pending.
        stopped = self.controller.shutting_down or self._stop_asked or self._stop_agreed
        self.controller.set_phase(Phase.FAILED if failed else Phase.STOPPED if stopped else Phase.FINISHED)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    @contextlib.contextmanager
    def training(self) -> Iterator[TrainingControl]:
        """Brackets a whole run: TRAINING inside, FINISHED or FAILED after.

        Use it around a custom loop, or around several `fit` calls: inside it, the end of
        one `fit` does not end the run, so pending changes carry over to the next `fit`.
        """
        self._run_open = True
        self.begin()
        try:
            yield self
        except BaseException:
            self.end(failed=True)
            raise
        finally:
            self._run_open = False
        self.end()


class _FitWatch:
    """Ends the run as FAILED when `fit` exits without calling `on_train_end`, i.e. it raised.

    Keras calls no callback when `fit` raises, and the run would stay TRAINING: waiters would
    hang and readiness would stay SERVING. A daemon thread looks every `poll` seconds whether
    the training thread's stack still holds `fit`'s frame. It touches no TensorFlow.
    """

    def __init__(self, controller: Controller, poll: float = 0.25) -> None:
        self._controller = controller
        self._poll = poll
        self._done = threading.Event()

    def start(self) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "fit":
            frame = frame.f_back  # type: ignore[assignment]
        if frame is not None:
            threading.Thread(target=self._watch, args=(frame, threading.get_ident()),
                             name="lrctl-fit-watch", daemon=True).start()

    def stop(self) -> None:
        self._done.set()

    def _watch(self, fit_frame: types.FrameType, thread_id: int) -> None:
        while not self._done.wait(self._poll):
            frame = sys._current_frames().get(thread_id)
            while frame is not None and frame is not fit_frame:
                frame = frame.f_back
            if frame is None:
                del fit_frame  # let fit's locals go
                if not self._done.is_set() and self._controller.snapshot().phase in (
                        Phase.TRAINING, Phase.STOPPING):
                    logger.error("fit() raised: the run ends as failed")
                    self._controller.set_phase(Phase.FAILED)
                return


class _ControlCallback(keras.callbacks.Callback):
    """Applies pending changes and publishes the state before each train batch.

    Keras runs the batch-end hooks of async-safe callbacks on a helper thread, so `fit` is
    not forced to sync and convert its logs every batch. Ours only keeps the logs there; all
    TensorFlow work (applying changes, reading the step and LR) happens on the training
    thread, in `on_train_batch_begin` (and `on_epoch_end`, for revert_on_nan).
    """

    async_safe = True

    def __init__(self, control: TrainingControl) -> None:
        super().__init__()
        self._control = control
        # The last train batch's logs, the step after it and when it ended; or None.
        self._last: tuple[Mapping[str, Any] | None, int | None, float] | None = None
        self._epoch_start: int | None = None  # the step when the current epoch began
        self._batches = 0  # steps of the current epoch run so far (the last batch end's count)
        self._steps_per_batch: int | None = None  # steps one train batch call may run
        self._watch: _FitWatch | None = None

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        spe = getattr(self.model, "steps_per_execution", 1)
        self._steps_per_batch = spe if isinstance(spe, int) and spe > 0 else None
        self._control._fit_begins(self.model)
        self._control.begin()
        if not self._control._run_open:  # inside training(), its own `except` ends the run
            self._watch = _FitWatch(self._control.controller)
            self._watch.start()

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._control.set_epoch(epoch)
        self._control._in_flight = 0  # the last epoch's batches have run: the read is exact
        self._batches = 0
        self._epoch_start = start = self._control.step  # one scalar read an epoch
        # Executions of steps_per_execution steps from the epoch's first step (Keras runs whole
        # executions, unless the data runs out: then the next epoch starts them again).
        spacing = self._steps_per_batch
        boundaries = Boundaries(start, spacing) if spacing is not None else None
        self._control.controller.set_boundaries(boundaries, epoch_start_step=start)
        # An epoch start is a step boundary: what is due applies before the callbacks listed
        # after this one run, so a LearningRateScheduler reads the LR a client set between epochs.
        if self._control.workers is None and self._control.controller.at_boundary(start):
            self._control._apply_due(start)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        # On the training thread (Keras runs epoch hooks there, after the batch-end ones).
        # Complete: all its steps ran (or, their number unknown, its data ran out, not a stop).
        steps = (self.params or {}).get("steps")
        complete = self._batches >= steps if isinstance(steps, int) else not self.model.stop_training
        if complete:
            self._control.controller.complete_epoch(epoch)
        self._control.epoch_end(logs)
        self._control.publish_epoch(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs, logs_step, logs_time = self._last if self._last is not None else (None, None, None)
        self._control.before_batch(self._steps_per_batch, logs, logs_step=logs_step, logs_time=logs_time)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # Keras passes the batch's last step within the epoch: the step after it is known
        # without a device sync. One reference swap: safe from Keras's helper thread.
        start = self._epoch_start
        self._last = (logs, None if start is None else start + batch + 1, time.time())
        self._batches = batch + 1

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._control._fit_ends()
        logs, logs_step, logs_time = self._last if self._last is not None else (None, None, None)
        if self._control._run_open:
            self._control.publish(logs, force=True, logs_step=logs_step, logs_time=logs_time)
        else:
            self._control.end(logs=logs, logs_step=logs_step, logs_time=logs_time)
