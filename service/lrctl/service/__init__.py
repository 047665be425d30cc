"""lrctl's trainer side: the schedule engine, the controller, the Keras integration and the
embedded gRPC server. Importing it imports TensorFlow; the client side never does."""

from lrctl.service.controller import Controller, Phase
from lrctl.service.engine import ControllableSchedule
from lrctl.service.integration import TrainingControl, attach, build_optimizer
from lrctl.service.specs import Origin

__all__ = [
    "ControllableSchedule",
    "Controller",
    "Origin",
    "Phase",
    "TrainingControl",
    "attach",
    "build_optimizer",
]
