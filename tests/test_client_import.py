"""`import lrctl.client` (and the CLI) must load no TensorFlow or Keras."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Prints the TensorFlow/Keras modules loaded after running {imports}.
_PROBE = """
import json, sys
{imports}
import lrctl.client
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0].startswith(("tensorflow", "keras", "tf_keras"))
)
print(json.dumps({{"heavy": heavy, "client": lrctl.client.__file__}}))
"""

_CLIENT_IMPORTS = """
import lrctl.client
import lrctl.client.cli
import lrctl.client.client
import lrctl.client.aio
import lrctl.client.errors
import lrctl.client.schedules
import lrctl.v1.training_control_pb2_grpc
lrctl.client.cli.build_parser()
"""


def _probe(imports: str, env: dict[str, str]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(imports=imports)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_client_and_cli_import_no_tensorflow_or_keras(subprocess_env: dict[str, str]) -> None:
    result = _probe(_CLIENT_IMPORTS, subprocess_env)
    # Make sure the probe imported this checkout, not some installed copy.
    assert str(result["client"]).startswith(str(ROOT / "client"))
    assert result["heavy"] == []


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
def test_probe_detects_keras(subprocess_env: dict[str, str]) -> None:
    # Proves the check above can fail: the same probe sees Keras once it is imported.
    result = _probe("import keras", subprocess_env)
    heavy = result["heavy"]
    assert isinstance(heavy, list)
    assert "keras" in heavy


def test_the_controller_and_servicer_are_pure_python(subprocess_env: dict[str, str]) -> None:
    # The logic that validates, queues and translates requests needs no TensorFlow: only the
    # engine and the Keras layer do, and `import lrctl.service` loads them lazily.
    imports = """
import lrctl.service
import lrctl.service.control.controller
import lrctl.service.rpc.servicer
import lrctl.service.rpc.server
import lrctl.service.schedules.specs
"""
    assert _probe(imports, subprocess_env)["heavy"] == []
