"""Shared test setup.

TensorFlow is configured here, before anything initialises its devices: the one physical CPU is
split into two logical devices so that MirroredStrategy has two replicas on any machine. Tests
that never import TensorFlow (the client side) are unaffected: TensorFlow is imported only if it
is installed, and nothing here touches lrctl.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if importlib.util.find_spec("tensorflow") is not None:
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    if _cpus and len(tf.config.get_logical_device_configuration(_cpus[0]) or []) < 2:
        try:
            tf.config.set_logical_device_configuration(
                _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
            )
        except RuntimeError:  # devices were initialised already (e.g. by a plugin)
            pass

