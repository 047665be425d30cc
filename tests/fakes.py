"""A pure-Python engine for controller tests: the controller's `ScheduleTarget` without
TensorFlow, holding whatever it was last loaded with."""

from __future__ import annotations

from typing import Any

from lrctl.service.schedules.specs import ActiveSchedule


class MemoryTarget:
    def __init__(self, state: ActiveSchedule) -> None:
        self.state, self.version = state, 0

    def load(self, state: ActiveSchedule, version: int) -> None:
        self.state, self.version = state, version

    def read(self) -> tuple[ActiveSchedule, int]:
        return self.state, self.version


class MemoryParameters:
    """A `ParameterTarget` in memory: `values` is what the variables hold."""

    def __init__(self, specs: tuple[Any, ...], values: dict[str, float]) -> None:
        self.specs, self.values = specs, dict(values)
        self.loads: list[dict[str, float]] = []

    def space(self) -> Any:
        from lrctl.service.control.targets import ParameterSpace
        return ParameterSpace(self.specs)

    def read(self) -> dict[str, float]:
        return dict(self.values)

    def load(self, values: Any) -> None:
        self.loads.append(dict(values))
        self.values.update(values)
