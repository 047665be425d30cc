"""Shared test setup.

TensorFlow is configured here (`pytest_configure`), before anything initialises its devices: the
one physical CPU is split into two logical devices so that MirroredStrategy has two replicas on
any machine. Nothing here imports lrctl.

`pytest --quick` (`bash scripts/test.sh --quick`) runs only the files in `QUICK`, the unit tests
that need no TensorFlow, in well under a minute; there TensorFlow and Keras cannot be imported,
so a quick test that starts to need them fails at once instead of slowing the quick run.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: `--quick`: the test files that import neither TensorFlow nor Keras (enforced) and start no
#: trainer. A new TensorFlow-free test file belongs here.
QUICK = (
    "test_parameters_control.py",
    "test_change_filters.py",
    "test_change_listing.py",
    "test_change_options.py",
    "test_checkpoint_paths.py",
    "test_cli_parse.py",
    "test_client_import.py",
    "test_controller.py",
    "test_decided_ahead.py",
    "test_docs_limits.py",
    "test_fast_paths.py",
    "test_measurements.py",
    "test_protos.py",
    "test_quick.py",
    "test_run_control_domain.py",
    "test_specs.py",
    "test_wait_change_server.py",
    "test_wal.py",
)

#: The top-level modules a quick run refuses to import.
HEAVY = frozenset({"tensorflow", "keras", "tf_keras"})


class _RefuseHeavy(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Fails any import of TensorFlow or Keras, naming the rule (installed for `--quick`).
    `importlib.util.find_spec` still finds them, so "is it installed?" checks keep working."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in HEAVY:
            return None
        if importlib.machinery.PathFinder.find_spec(fullname, path) is None:
            return None  # not installed: the import fails as it would anyway
        return importlib.machinery.ModuleSpec(fullname, self)

    def exec_module(self, module: ModuleType) -> None:
        raise ImportError(f"`pytest --quick` runs without TensorFlow, but this imports "
                          f"{module.__name__!r}: take its file out of conftest.QUICK")


def _split_the_cpu() -> None:
    if importlib.util.find_spec("tensorflow") is None:
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    if cpus and len(tf.config.get_logical_device_configuration(cpus[0]) or []) < 2:
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
            )
        except RuntimeError:  # devices were initialised already (e.g. by a plugin)
            pass


@pytest.fixture(scope="session")
def mirrored() -> Any:
    """One MirroredStrategy over the two logical CPUs for every test of the session. Two
    strategies over the same devices in one process draw the same collective keys, and
    TensorFlow's runtime keeps the shapes the first one used with them: a later model of
    another shape then fails ("different input shapes at different members of the
    collective op"), depending on which tests ran before."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")][:2])


ROOT = Path(__file__).resolve().parent.parent

#: Examples the request-message fuzz test runs (tests/test_fuzz.py); the raw-bytes test runs 1/4.
DEFAULT_FUZZ_EXAMPLES = 2000


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=DEFAULT_FUZZ_EXAMPLES,
                     help=f"hypothesis examples for tests/test_fuzz.py (default {DEFAULT_FUZZ_EXAMPLES})")
    parser.addoption("--quick", action="store_true",
                     help="run only conftest.QUICK, the TensorFlow-free unit tests")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--quick"):
        _split_the_cpu()
        return
    missing = [name for name in QUICK if not (ROOT / "tests" / name).is_file()]
    if missing:
        raise pytest.UsageError(f"conftest.QUICK names missing files: {missing}")
    loaded = HEAVY.intersection(sys.modules)
    if loaded:
        raise pytest.UsageError(f"--quick, but {sorted(loaded)} was imported before the tests")
    sys.meta_path.insert(0, _RefuseHeavy())


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`--quick`: skip the test files not in QUICK (None: let pytest decide)."""
    if (config.getoption("--quick") and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_") and collection_path.name not in QUICK):
        return True
    return None


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
