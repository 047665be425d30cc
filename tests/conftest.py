"""Shared test setup.

TensorFlow is configured here, before anything initialises its devices: the one physical CPU is
split into two logical devices so that MirroredStrategy has two replicas on any machine. Tests
that never import TensorFlow (the client side) are unaffected: TensorFlow is imported only if it
is installed, and nothing here imports lrctl.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

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



ROOT = Path(__file__).resolve().parent.parent

#: Examples the request-message fuzz test runs (tests/test_fuzz.py); the raw-bytes test runs 1/4.
DEFAULT_FUZZ_EXAMPLES = 2000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=DEFAULT_FUZZ_EXAMPLES,
                     help=f"hypothesis examples for tests/test_fuzz.py (default {DEFAULT_FUZZ_EXAMPLES})")


@pytest.fixture(scope="session")
def fuzz_examples(pytestconfig: pytest.Config) -> int:
    """The --fuzz-examples option: how many requests tests/test_fuzz.py sends."""
    return pytestconfig.getoption("--fuzz-examples")


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for `python -c/-m` subprocesses: this checkout's source roots first."""
    env = dict(os.environ)
    paths = [str(ROOT / "client"), str(ROOT / "service")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("LRCTL_TARGET", None)
    return env
