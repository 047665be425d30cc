"""A run's lifecycle at the training layer: how it begins (in sync with the engine's
variables, TRAINING, or over already after a StopTraining), whether it is to stop, and how it
ends (FAILED, STOPPED after a shutdown, else FINISHED), with `training()` bracketing several
`fit` calls or a custom loop as one run.

A stop is asked (`TrainingControl.request_stop`: a signal handler, any thread, sets a flag and
nothing else), agreed by every worker at an exchange (a multi-worker job stops on all workers
after the same step), or final (a StopTraining applied). Training thread, but for `asked`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras

from lrctl.service.control.changes import Phase
from lrctl.service.control.controller import Controller
from lrctl.service.training.divergence import DivergenceGuard
from lrctl.service.training.exchange import WorkerSync
from lrctl.service.training.publishing import Publisher
from lrctl.service.training.step_clock import StepClock


class Lifecycle:
    """The run of one TrainingControl. `resync`: notices a restore (called when it begins);
    `model`: the one given, if any (fit's once fit starts)."""

    def __init__(self, controller: Controller, clock: StepClock, publisher: Publisher,
                 resync: Callable[[], bool], divergence: DivergenceGuard | None,
                 workers: WorkerSync | None, model: keras.Model | None) -> None:
        self._controller = controller
        self._clock = clock
        self._publisher = publisher
        self._resync = resync
        self._divergence = divergence
        self._workers = workers
        self.asked = False  #: request_stop was called (a shutdown: pending changes stay pending)
        self.agreed = False  #: every worker voted at an exchange to stop after this step
        self.finished = False  #: a StopTraining ended the run for good
        self.inside_training = False  #: `bracket` holds the run: the end of one `fit` does not end it
        #: The model LoadCheckpoint loads into, and `fit`'s to stop (fit's, once fit starts).
        self.model = model

    @property
    def vote(self) -> bool:
        """This worker's stop vote at the next exchange (a StopTraining rides in the chief's)."""
        return self.asked or self.finished

    @property
    def should_stop(self) -> bool:
        if self._workers is not None:  # a worker that stopped alone would hang the rest
            return self.agreed
        return self.finished or self.asked

    def finish(self) -> None:
        """`TrainingControl.finish_requested`."""
        self.finished = True
        if self.model is not None:
            self.model.stop_training = True

    def fit_begins(self, model: keras.Model) -> None:
        """fit starts: its model is the run's, and stops at once if the run is over already."""
        self.model = model
        if self.finished:
            model.stop_training = True

    def fit_ends(self, logs: Mapping[str, Any] | None, *, logs_step: int | None,
                 logs_time: float | None) -> None:
        """`TrainingControl.fit_ends`: the run ends with fit, unless `bracket` holds it."""
        if self.inside_training:
            self._publisher.publish(logs, force=True, logs_step=logs_step, logs_time=logs_time)
        else:
            self.end(False, logs, logs_step=logs_step, logs_time=logs_time)

    def begin(self) -> None:
        """`TrainingControl.begin`."""
        self._clock.settle()  # no batch announced yet: a read is exact
        self._resync()
        if self._controller.stopped_step is not None:  # a StopTraining ended the run for good
            self.finished = True
            self._publisher.publish(None, force=True)
            return
        self._controller.set_phase(Phase.TRAINING)
        self._publisher.publish(None, force=True)

    def end(self, failed: bool, logs: Mapping[str, Any] | None, *, logs_step: int | None,
            logs_time: float | None) -> None:
        """`TrainingControl.end`."""
        if self._divergence is not None:
            self._divergence.close()  # the run is over: free the host copy
        if self._workers is not None and not failed:
            # What the chief decided at the last boundary loads now, so that the engine holds
            # what its controller applied. Every worker ends alike: each drains its own. A
            # failed run does not wait: a collective with a dead worker never returns.
            self._workers.drain()
        self._publisher.publish(logs, force=True, logs_step=logs_step, logs_time=logs_time)
        # A shutdown (SIGTERM, a stop vote) is not a completion: what was accepted stays pending.
        stopped = not self.finished and (self._controller.shutting_down or self.asked or self.agreed)
        self._controller.set_phase(Phase.FAILED if failed else Phase.STOPPED if stopped else Phase.FINISHED)

    @contextlib.contextmanager
    def bracket(self) -> Iterator[None]:
        """`TrainingControl.training`: begin, then end (FAILED if the block raises)."""
        self.inside_training = True
        self.begin()
        try:
            yield
        except BaseException:
            self.end(True, None, logs_step=None, logs_time=None)
            raise
        finally:
            self.inside_training = False
        self.end(False, None, logs_step=None, logs_time=None)
