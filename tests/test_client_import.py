"""`import lrctl.client` (and the CLI) must load no TensorFlow or Keras. That the probe can
fail (it sees Keras once Keras is imported) is shown in test_packaging.py, out of the quick
run: importing Keras takes seconds."""

from __future__ import annotations

from import_probe import CLIENT_IMPORTS, ROOT, probe


def test_client_and_cli_import_no_tensorflow_or_keras(subprocess_env: dict[str, str]) -> None:
    result = probe(CLIENT_IMPORTS, subprocess_env)
    # Make sure the probe imported this checkout, not some installed copy.
    assert str(result["client"]).startswith(str(ROOT / "client"))
    assert result["heavy"] == []


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
    assert probe(imports, subprocess_env)["heavy"] == []
