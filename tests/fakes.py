"""A pure-Python engine for controller tests: the controller's `ScheduleTarget` without
TensorFlow, holding whatever it was last loaded with."""

from __future__ import annotations

from lrctl.service.schedules.specs import ActiveSchedule


class MemoryTarget:
    def __init__(self, state: ActiveSchedule) -> None:
        self.state, self.version = state, 0

    def load(self, state: ActiveSchedule, version: int) -> None:
        self.state, self.version = state, version

    def read(self) -> tuple[ActiveSchedule, int]:
        return self.state, self.version
