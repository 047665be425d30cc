"""The controller a server answers for, bound once the trainer has built it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lrctl.service.control.changes import Snapshot
from lrctl.service.control.controller import Controller
from lrctl.service.errors import UnavailableError
from lrctl.service.rpc.convert import timestamp
from lrctl.v1 import training_control_pb2 as pb


class ControllerSlot:
    """The controller a server answers for, bound once it exists. A trainer serves health and
    its state before TensorFlow loads (seconds) and builds the model: until `bind`, the state
    is STARTING with the run id and incarnation chosen up front, and every call that needs the
    controller gets UNAVAILABLE (reason STARTING): transient, retry."""

    def __init__(self, controller: Controller | None = None, *, run_id: str = "",
                 incarnation: str = "") -> None:
        self.run_id, self.incarnation = run_id, incarnation
        self._controller = controller
        self._since = time.time()
        # Guards binding and the bind callbacks; threads waiting for the binding sleep on it.
        self._cond = threading.Condition()
        self._on_bind: list[Callable[[Controller], None]] = []

    def get(self) -> Controller | None:
        """The controller, or None before `bind`. One attribute read: bound once, never unbound."""
        return self._controller

    def snapshot(self) -> Snapshot | None:
        controller = self._controller
        return controller.snapshot() if controller is not None else None

    def bind(self, controller: Controller) -> None:
        """From now on, answer for `controller` (its run id and incarnation should be this
        slot's). The `on_bind` callbacks run first, so no call sees it without them."""
        with self._cond:
            if self._controller is not None:
                raise RuntimeError("the controller is bound already")
            for callback in self._on_bind:
                callback(controller)
            self._controller = controller
            self._cond.notify_all()

    def on_bind(self, callback: Callable[[Controller], None]) -> None:
        """Call `callback(controller)` when it is bound (at once if it is)."""
        with self._cond:
            controller = self._controller
            if controller is None:
                self._on_bind.append(callback)
                return
        callback(controller)

    def wait(self, is_active: Callable[[], bool]) -> Controller | None:
        """Block until bound (the controller) or until `is_active()` is false (None); call
        `wake` when that may have changed."""
        with self._cond:
            self._cond.wait_for(lambda: self._controller is not None or not is_active())
            return self._controller

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def bound(self) -> Controller:
        """The controller, or UnavailableError (STARTING) while the trainer is starting."""
        controller = self._controller
        if controller is None:
            raise UnavailableError("the trainer is starting (loading TensorFlow, building the "
                                   "model, restoring its checkpoint); retry", reason="STARTING")
        return controller

    def starting_state(self) -> pb.TrainingState:
        """The state before `bind`: who is starting, and since when."""
        return pb.TrainingState(run_id=self.run_id, phase=pb.PHASE_STARTING,
                                incarnation=self.incarnation, updated_time=timestamp(self._since))
