"""Multi-worker jobs (tf.distribute.MultiWorkerMirroredStrategy): every worker trains with the
chief's schedule and switches at the same step.

Only the chief serves the API and applies changes. At every `every`-th step boundary, all
workers join one small all-reduce (SUM over int64) of a vector to which only the chief
contributes its schedule variables, bit for bit, each worker its own (version, step)
slot, and any worker a vote to stop. Each worker then loads the chief's variables if its own differ. Collectives run in the
same order on every worker, so all of them switch at the same boundary however slow the
network or one worker is: a slow worker delays the exchange, it can never miss it.

Why an all-reduce rather than lrctl's own channel: it needs no second server, port or
secret on the followers, it cannot be late by construction, and it is TensorFlow's own
transport (gRPC or NCCL), already set up and authenticated by the job.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from lrctl.service.control.changes import WorkerState
from lrctl.service.control.controller import Controller
from lrctl.service.observability.logs import short
from lrctl.service.training.engine_target import EngineTarget

logger = logging.getLogger("lrctl")


def worker_count(strategy: tf.distribute.Strategy | None) -> int:
    """How many workers (processes) `strategy` spans: 1 unless it is a multi-worker one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    cluster = resolver.cluster_spec().as_dict()
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


class WorkerSync:
    """Keeps the engine equal on every worker, switched at the same boundary. Training thread
    only; every worker must call `exchange` at the same boundaries."""

    def __init__(self, strategy: tf.distribute.MultiWorkerMirroredStrategy, engine: EngineTarget,
                 controller: Controller, every: int = 1) -> None:
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
        self._width = len(engine.read_packed())
        size = self._width + 2 * self.count + 1  # engine, (version, step) per worker, stop votes
        # Only this worker's first replica contributes: with several local replicas (GPUs),
        # the sum must count each worker once.
        first = self.index * (strategy.num_replicas_in_sync // self.count)

        def contribute(x: tf.Tensor) -> tf.Tensor:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return tf.where(tf.equal(replica, first), x, tf.zeros_like(x))

        @tf.function(input_signature=[tf.TensorSpec([size], tf.int64)])
        def all_reduce(x: tf.Tensor) -> tf.Tensor:
            return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribute, args=(x,)),
                                   axis=None)

        self._all_reduce = all_reduce

    def due(self, step: int) -> bool:
        """Whether the boundary before step `step` is an exchange."""
        return step % self.every == 0

    def may_apply(self, step: int) -> bool:
        """Only the chief applies changes, and only where all workers exchange."""
        return self.is_chief and self.due(step)

    def boundary(self, step: int, stop: bool) -> bool:
        """At the boundary before step `step` on every worker: exchange if one is due, tell the
        controller what the others report (a follower: the chief's schedule it took). Returns
        whether any worker voted to stop."""
        if not self.due(step):
            return False
        taken, reports, stop_all = self.exchange(step, stop)
        if taken is not None:
            state, version = self._engine.state_in(taken)
            self._controller.follow(state, version)
            logger.info("v%d step %d: took the chief's schedule: %s", version, step,
                        short(state.spec.describe()))
        self._controller.set_workers(reports)
        return stop_all

    def exchange(self, step: int, stop: bool) -> tuple[np.ndarray | None, tuple[WorkerState, ...], bool]:
        """Send the chief's engine to every worker, this worker's (version, step) and its vote
        to stop to all. Returns the chief's engine if this worker just took it (a follower whose
        engine differed; else None), what each worker reported, and whether any worker voted
        to stop."""
        mine = self._engine.read_packed()
        version = self._engine.version_in(mine)
        vector = np.zeros(self._width + 2 * self.count + 1, np.int64)
        if self.is_chief:
            vector[: self._width] = mine
        vector[self._width + 2 * self.index: self._width + 2 * self.index + 2] = (version, step)
        vector[-1] = int(stop)
        total = np.asarray(self._all_reduce(tf.constant(vector)))
        reports = total[self._width: -1].reshape(self.count, 2)
        workers = tuple(WorkerState(i, int(v), int(s)) for i, (v, s) in enumerate(reports))
        stop_all = bool(total[-1])
        theirs = total[: self._width]
        if self.is_chief or np.array_equal(theirs, mine):
            return None, workers, stop_all
        self._engine.load_packed(theirs)
        return theirs, workers, stop_all
