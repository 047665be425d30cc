"""lrctl's trainer side: the schedule engine, the controller, the Keras integration and the
embedded gRPC server.

The controller, specs and servicer are pure Python; only the engine and the Keras layer
import TensorFlow, and they load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrctl.service.controller import Controller, Phase
    from lrctl.service.engine import ControllableSchedule
    from lrctl.service.guardrails import Guardrails
    from lrctl.service.integration import TrainingControl, attach, build_optimizer
    from lrctl.service.saving import load_model
    from lrctl.service.specs import Origin

_HOMES = {
    "Controller": "controller",
    "Phase": "controller",
    "ControllableSchedule": "engine",
    "Guardrails": "guardrails",
    "TrainingControl": "integration",
    "attach": "integration",
    "build_optimizer": "integration",
    "load_model": "saving",
    "Origin": "specs",
}
__all__ = [
    "ControllableSchedule",
    "Controller",
    "Guardrails",
    "Origin",
    "Phase",
    "TrainingControl",
    "attach",
    "build_optimizer",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lrctl.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lrctl.service.{_HOMES[name]}"), name)
