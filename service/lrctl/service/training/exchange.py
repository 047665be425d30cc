"""Multi-worker jobs (tf.distribute.MultiWorkerMirroredStrategy): every worker trains with the
chief's schedule and switches at the same step.

Only the chief serves the API and applies changes. At every `every`-th step boundary, all
workers join one small all-reduce (SUM over int64) of a vector to which only the chief
contributes its schedule variables, bit for bit, each worker its own (version, step)
slot, and any worker a vote to stop. Collectives run in the same order on every worker, so
all of them switch at the same boundary however slow the network or one worker is: a slow
worker delays the exchange, it can never miss it.

Pipelined: the exchange launched at boundary k runs (on an asynchronous executor) while the
next step trains, and every worker, the chief included, consumes it (loads the chief's vector)
at boundary k+1. So the chief decides one boundary ahead: at boundary k it applies the
changes due at boundary k+1 to its controller, which records them applied at k+1, and only
packs them (`DeferredLoads`); nobody's engine changes before k+1. The first exchange of a
process is not pipelined (nothing was sent ahead of it): it decides for its own boundary
and blocks, so that changes queued before training starts land at its first step. Reports
and stop votes travel with the same exchange: they arrive one boundary late, so a stop
vote ends every worker one step later than a blocking exchange would.

Why an all-reduce rather than lrctl's own channel: it needs no second server, port or
secret on the followers, it cannot be late by construction, and it is TensorFlow's own
transport (gRPC or NCCL), already set up and authenticated by the job.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.eager import executor as tf_executor
from tensorflow.python.ops import collective_ops

from lrctl.service.control.changes import Boundaries, Change, WorkerState
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import short
from lrctl.service.schedules.packing import CompiledCall
from lrctl.service.schedules.specs import ActiveSchedule
from lrctl.service.training.engine_target import EngineTarget

logger = logging.getLogger("lrctl")

#: Seconds between the workers' reports to the controller while no version changes.
REPORT_INTERVAL = 0.05

#: At a boundary, the chief's controller applies what is due at this step (its argument).
Decide = Callable[[int], list[Change]]


def worker_count(strategy: tf.distribute.Strategy | None) -> int:
    """How many workers (processes) `strategy` spans: 1 unless it is a multi-worker one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


class DeferredLoads:
    """The engine as a multi-worker chief's controller drives it (its `ScheduleTarget`): a load
    is only packed, to be sent at this boundary's exchange and loaded by every worker at the
    next one. Reads are the engine's."""

    def __init__(self, engine: EngineTarget) -> None:
        self._engine = engine
        #: The vector decided at this boundary and not sent yet; None: no decision changed it.
        self.ahead: np.ndarray | None = None

    def load(self, state: ActiveSchedule, version: int) -> None:
        # Packing converts and checks every value: a change that cannot load fails here, at
        # its decision, as an engine load would have failed it.
        self.ahead = self._engine.schedule.pack(state, version)

    def read(self) -> tuple[ActiveSchedule, int]:
        return self._engine.read()

    def take(self) -> np.ndarray | None:
        ahead, self.ahead = self.ahead, None
        return ahead


@dataclass(frozen=True)
class Exchanged:
    """What one exchange brought back to every worker."""

    engine: np.ndarray  #: the chief's packed vector: every worker loads it
    workers: tuple[WorkerState, ...]  #: each worker's (version, step) when it sent
    stop: bool  #: whether any worker voted to stop


#: The collective group of lrctl's exchanges: its own, apart from the strategy's groups (which
#: TensorFlow numbers from 1), so its instance keys are lrctl's to draw.
EXCHANGE_GROUP_KEY = 0x6C7263  # "lrc"
#: The process's exchanges in order: the n-th of every worker is instance n, however many
#: WorkerSyncs the process makes in turn (every worker makes the same ones).
_INSTANCE_KEYS = itertools.count()


class _Launcher:
    """Launches each exchange's all-reduce without waiting for it: one CollectiveReduceV2 op
    on this worker's CPU, in lrctl's own group (one member per worker), called as one
    compiled graph (`CompiledCall`) on an asynchronous executor of its own, so it returns at
    once and the collective runs in the runtime while the training thread dispatches and runs
    the next step; `Launched.result` waits for it.

    Not through the strategy (`strategy.reduce` in a tf.function): that costs ~0.6 ms more
    per exchange on the training thread (the function's Python dispatch, the strategy's
    Python, a key drawn from the strategy's counter), and each worker's calls in the
    strategy's group must keep their order with the step's gradient all-reduce. In a group
    of its own, the n-th exchange of every worker is instance n (`_INSTANCE_KEYS`): every
    worker launches the same sequence (all of them call `boundary` at the same steps), and a
    restarted job restarts them all."""

    def __init__(self, device: str, group_size: int, width: int) -> None:
        with tf.device(device):
            @tf.function(input_signature=[tf.TensorSpec([width], tf.int64), tf.TensorSpec([], tf.int32)])
            def all_reduce(vector: tf.Tensor, instance_key: tf.Tensor) -> tf.Tensor:
                return collective_ops.all_reduce_v2(vector, group_size, EXCHANGE_GROUP_KEY, instance_key)

            self._all_reduce = CompiledCall(all_reduce)
        self._executor = tf_executor.new_executor(enable_async=True)

    def send(self, vector: np.ndarray) -> Launched:
        # Instance keys are int32, as the strategy's own: after 2**31 - 1 exchanges they wrap
        # (an instance that old ended long ago on every worker).
        key = next(_INSTANCE_KEYS) % (2**31 - 1) + 1
        with context.executor_scope(self._executor):
            (total,) = self._all_reduce(tf.constant(vector), tf.constant(key, tf.int32))
        return Launched(total, self._executor)


@dataclass(frozen=True)
class Launched:
    """An exchange in flight: its result is read only when it is needed."""

    total: tf.Tensor
    executor: tf_executor.Executor

    def result(self) -> np.ndarray:
        self.executor.wait()  # raises what the collective raised
        return np.asarray(self.total)


class WorkerSync:
    """Keeps the engine equal on every worker, switched at the same boundary. Training thread
    only; every worker must call `boundary` at the same boundaries."""

    def __init__(self, strategy: tf.distribute.MultiWorkerMirroredStrategy, engine: EngineTarget,
                 controller: Controller, target: DeferredLoads, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"sync_every must be >= 1 step; got {every}")
        self.every = every
        self.count = worker_count(strategy)
        resolver = strategy.cluster_resolver
        has_chief = bool(resolver.cluster_spec().as_dict().get("chief"))
        # TensorFlow numbers workers the same way: the chief first, then the `worker` tasks.
        self.index = int(resolver.task_id) + (1 if has_chief and resolver.task_type == "worker" else 0)
        self.is_chief = self.index == 0
        self._engine = engine
        self._controller = controller
        self._target = target
        self._width = len(engine.read_packed())
        # One member per worker, whatever its replicas (GPUs): each worker's vector counts once.
        self._launcher = _Launcher(f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}/device:CPU:0",
                                   self.count, self._width + 2 * self.count + 1)
        #: The exchange launched at the last exchange boundary, consumed at the next one.
        self._in_flight: Launched | None = None
        #: What this worker's engine holds, as of its last read or load: only exchanges load it
        #: between boundaries, so it is read once (a device read of ~1 ms a boundary saved).
        self._held: np.ndarray | None = None
        self._launched_at: int | None = None  #: the step of the exchange in flight
        self._reported: tuple[WorkerState, ...] = ()
        self._reported_time = -math.inf

    def due(self, step: int) -> bool:
        """Whether the boundary before step `step` is an exchange."""
        return step % self.every == 0

    @property
    def boundaries(self) -> Boundaries:
        """Where changes land: only exchanges are boundaries, every worker at the same steps,
        across epochs, and what lands at one is decided one exchange (`every` steps) before."""
        return Boundaries(0, self.every, lead=self.every)

    def boundary(self, step: int, stop: Callable[[], bool], decide: Decide) -> tuple[list[Change], bool]:
        """At the boundary before step `step` on every worker, if an exchange is due: load
        what the last exchange brought (the chief's decision for this boundary), then, on the
        chief, decide for the next exchange boundary, and launch the exchange that carries it.
        `stop()`: this worker's vote, read after the decision (a change decided here may ask
        the run to stop). Returns the changes the chief's controller ended here and whether
        the workers agreed to stop (then nothing more is decided or launched)."""
        if not self.due(step) or step == self._launched_at:
            return [], False  # a second call at the same step: the exchange in flight waits for a step
        ended: list[Change] = []
        if self._in_flight is None:
            # The first exchange: nothing was sent ahead of it. Decide for this boundary and
            # wait for the collective here.
            if self.is_chief:
                ended += decide(step)
            arrived = self._launcher.send(self._vector(step, stop(), self._engine.read_packed())).result()
            self._held = None  # read it again below: the first exchange may follow a restore
        else:
            arrived, self._in_flight = self._in_flight.result(), None
        outcome, held = self._take(self._unpack(arrived), step)
        if outcome.stop:
            return ended, True
        if self.is_chief:
            ended += decide(step + self.every)
        self._in_flight = self._launcher.send(self._vector(step, stop(), held))
        self._launched_at = step
        return ended, False

    def drain(self) -> None:
        """The loop ended: wait for the exchange still in flight (every worker has one: they
        all launched it) and load what it carries, so that the engine holds what the chief's
        controller applied. Call it on every worker, or the others wait forever."""
        if self._in_flight is not None:
            arrived, self._in_flight, self._launched_at = self._in_flight.result(), None, None
            self._take(self._unpack(arrived), None)

    def _vector(self, step: int, stop: bool, held: np.ndarray) -> np.ndarray:
        """What this worker sends: the chief its decision for the next exchange boundary (or
        what its engine holds: `held`), every worker its (version, step) and its vote."""
        vector = np.zeros(self._width + 2 * self.count + 1, np.int64)
        if self.is_chief:
            ahead = self._target.take()
            if ahead is None and self._engine.version_in(held) != self._controller.engine_state[1]:
                # A restore noticed at this boundary renumbered the engine: read it again.
                held = self._held = self._engine.read_packed()
            if ahead is not None:  # decided: a checkpoint meanwhile must carry what is held
                self._controller.set_engine_behind(self._engine.state_in(held))
            vector[: self._width] = held if ahead is None else ahead
        slot = self._width + 2 * self.index
        vector[slot: slot + 2] = (self._engine.version_in(held), step)
        vector[-1] = int(stop)
        return vector

    def _unpack(self, total: np.ndarray) -> Exchanged:
        reports = total[self._width: -1].reshape(self.count, 2)
        return Exchanged(total[: self._width].copy(),
                         tuple(WorkerState(i, int(v), int(s)) for i, (v, s) in enumerate(reports)),
                         bool(total[-1]))

    def _take(self, outcome: Exchanged, step: int | None) -> tuple[Exchanged, np.ndarray]:
        """Every worker loads the chief's vector if its engine differs (read: a restore may
        have replaced it); a follower's controller takes the chief's state as it is. Returns
        the outcome and what the engine holds now."""
        if self._held is None:
            self._held = self._engine.read_packed()
        if not np.array_equal(outcome.engine, self._held):
            self._engine.load_packed(outcome.engine)
            self._held = outcome.engine
            if not self.is_chief:
                state, version = self._engine.state_in(outcome.engine)
                self._controller.follow(state, version)
                logger.info("v%d step %s: took the chief's schedule: %s", version, step,
                            short(state.spec.describe()))
        if self.is_chief:
            self._controller.set_engine_behind(None)
        self._report(outcome.workers)
        return outcome, outcome.engine

    def _report(self, workers: tuple[WorkerState, ...]) -> None:
        """Tell the controller what the workers reported: at once when a version changed,
        else at most every REPORT_INTERVAL seconds (the steps alone move at every boundary,
        and each report republishes the state: ~0.1 ms)."""
        now = time.monotonic()
        versions = [w.applied_version for w in workers]
        if versions != [w.applied_version for w in self._reported] or now - self._reported_time >= REPORT_INTERVAL:
            self._controller.set_workers(workers)
            self._reported, self._reported_time = workers, now
