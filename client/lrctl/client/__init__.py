"""lrctl client: change the learning rate of a running Keras job over gRPC.

Imports no TensorFlow or Keras, so it can run anywhere (orchestrators, laptops).
The asyncio client is `lrctl.client.aio.TrainingControlClient`.
"""

from lrctl.client import schedules
from lrctl.client.changes import ChangeOptions
from lrctl.client.client import (
    DEFAULT_TARGET,
    Origin,
    Parameters,
    Pin,
    Scale,
    Swap,
    TrainingControlClient,
    View,
    Watch,
)
from lrctl.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LrctlError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from lrctl.client.schedules import from_keras_config, to_keras_config, to_schedule
from lrctl.v1 import training_control_pb2 as pb

__all__ = [
    "DEFAULT_TARGET",
    "ChangeOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LrctlError",
    "NotFound",
    "Origin",
    "Parameters",
    "PermissionDenied",
    "Pin",
    "ResourceExhausted",
    "Scale",
    "Swap",
    "TrainingControlClient",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "View",
    "Watch",
    "from_keras_config",
    "pb",
    "schedules",
    "to_keras_config",
    "to_schedule",
]
