"""scripts/demo.sh, run as a newcomer runs it, next to another job that holds the address the
demo used to take (127.0.0.1:$LRCTL_DEMO_PORT) and is named by $LRCTL_TARGET."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras

from lrctl.service import TrainingControl
from lrctl.service.rpc.server import serve

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 600  # seconds: a safety limit for a hung demo, not a timing check


def test_the_demo_drives_only_the_trainer_it_started(subprocess_env: dict[str, str]) -> None:
    other = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))  # the other job
    with serve(other.controller, "127.0.0.1:0") as (_, port):
        env = {
            **subprocess_env,
            "LRCTL_DEMO_PORT": str(port),
            "LRCTL_TARGET": f"127.0.0.1:{port}",
            # lrctl and lrctl-trainer of this interpreter's environment.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
        result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, text=True,
                                capture_output=True, timeout=LIMIT, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        # The demo's own trainer took its changes ...
        assert "applied v1 at step" in result.stdout and "applied v3 at step" in result.stdout
        # ... and the other job was never touched.
        snapshot = other.controller.snapshot()
        assert (snapshot.version, snapshot.pending) == (0, ())
        assert other.controller.list_changes(100)[0] == []
