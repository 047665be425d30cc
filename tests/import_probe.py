"""A fresh interpreter that runs some imports and reports the TensorFlow/Keras modules they
loaded: the check behind "`import lrctl.client` loads no TensorFlow" and its can-fail twin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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

CLIENT_IMPORTS = """
import lrctl.client
import lrctl.client.cli
import lrctl.client.client
import lrctl.client.aio
import lrctl.client.errors
import lrctl.client.schedules
import lrctl.v1.training_control_pb2_grpc
lrctl.client.cli.build_parser()
"""


def probe(imports: str, env: dict[str, str]) -> dict[str, object]:
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
