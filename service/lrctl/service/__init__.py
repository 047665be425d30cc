"""lrctl's trainer side: the schedule engine, the controller, the Keras integration and the
embedded gRPC server.

The controller, specs and servicer are pure Python; only the engine and the Keras layer
import TensorFlow, and they load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrctl.service.control.changes import Phase
    from lrctl.service.control.controller import Controller
    from lrctl.service.control.guardrails import Guardrails
    from lrctl.service.rpc.server import serve
    from lrctl.service.schedules.engine import ControllableSchedule
    from lrctl.service.schedules.specs import Origin
    from lrctl.service.training.attach import attach, build_optimizer
    from lrctl.service.training.checkpoints import Checkpointer
    from lrctl.service.training.integration import TrainingControl
    from lrctl.service.training.keras_file import load_model

# Each public name, lazily from its home: `import lrctl.service` stays free of TensorFlow.
_HOMES = {
    "Checkpointer": "training.checkpoints",
    "ControllableSchedule": "schedules.engine",
    "Controller": "control.controller",
    "Guardrails": "control.guardrails",
    "Origin": "schedules.specs",
    "Phase": "control.changes",
    "TrainingControl": "training.integration",
    "attach": "training.attach",
    "build_optimizer": "training.attach",
    "load_model": "training.keras_file",
    "serve": "rpc.server",
}
__all__ = [
    "Checkpointer",
    "ControllableSchedule",
    "Controller",
    "Guardrails",
    "Origin",
    "Phase",
    "TrainingControl",
    "attach",
    "build_optimizer",
    "load_model",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lrctl.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lrctl.service.{_HOMES[name]}"), name)
