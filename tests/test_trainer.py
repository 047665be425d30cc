"""The main job as users run it: `lrctl-trainer` in its own process, driven by the client."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lrctl.client import TrainingControlClient, pb
from lrctl.service.apps import trainer_args

TRAINER = [sys.executable, "-c", "from lrctl.service.apps.trainer import main; raise SystemExit(main())"]
LIMIT = 120  # seconds: a safety limit for a hung process, never a timing check


class _Trainer:
    """A running `lrctl-trainer`; its stderr lines are collected with the time they arrived."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path | None = None) -> None:
        self.process = subprocess.Popen([*TRAINER, "--listen", "127.0.0.1:0", "--verbose", "0", *args],
                                        stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
        self.lines: list[tuple[float, str]] = []
        self._port = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(LIMIT) or self.port is None:
            self.process.kill()
            raise AssertionError(f"trainer exited ({self.process.wait()}) before listening:\n{self.stderr}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line))
            if "control server on port" in line:
                self._port.set()
        self._port.set()  # exited before listening

    @property
    def port(self) -> int | None:
        match = re.search(r"control server on port (\d+)", self.stderr)
        return int(match.group(1)) if match else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines)

    def when(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)

    def wait_until_training(self, token: str | None = None) -> None:
        with TrainingControlClient(self.target, timeout=LIMIT, token=token) as client:
            deadline = time.monotonic() + LIMIT
            while client.get_state().phase != pb.PHASE_TRAINING:
                assert time.monotonic() < deadline, "the trainer never started training"
                time.sleep(0.05)

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=LIMIT)
        finally:
            self.process.kill()


def test_demo_trainer_takes_a_change_and_exits_promptly_on_sigterm(
    subprocess_env: dict[str, str],
) -> None:
    run = _Trainer("--demo", env=subprocess_env)
    try:
        run.wait_until_training()
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            assert client.health() == "SERVING"
            change = client.set_learning_rate(0.05, wait=True, reason="from the test")
        assert change.status == pb.CHANGE_STATUS_APPLIED
        sent = time.monotonic()
        run.process.send_signal(signal.SIGTERM)
        returncode = run.process.wait(timeout=60)  # a safety limit; it takes about a second
        exited = time.monotonic()
    finally:
        run.process.kill()
    assert returncode == 0, run.stderr
    assert f"v1 step {change.applied_step}: lr 0.001 -> 0.05  set lr=0.05 (from the test)" in run.stderr
    stopped = run.when("stopped at step")  # SIGTERM: PHASE_STOPPED, not a completed run
    print(f"SIGTERM to exit {exited - sent:.1f} s, training stopped to exit {exited - stopped:.1f} s")


def test_trainer_runs_a_user_model_for_exactly_steps(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "my_task.py").write_text(textwrap.dedent("""
        import keras, numpy as np

        def build():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            x = np.ones((64, 3), "float32")
            return model, (x, x.sum(axis=1, keepdims=True))
    """))
    run = _Trainer("--model", "my_task:build", "--steps", "30", "--schedule",
                   '{"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, '
                   '"decay_steps": 10, "decay_rate": 0.5}}', cwd=tmp_path, env=subprocess_env)
    assert run.wait() == 0, run.stderr
    assert re.search(r"finished at step 30, lr 0\.0125\b", run.stderr), run.stderr


def test_cli_reports_a_change_the_trainer_rejects_once(subprocess_env: dict[str, str]) -> None:
    run = _Trainer("--demo", env=subprocess_env)
    try:
        run.wait_until_training()
        result = subprocess.run(
            [sys.executable, "-m", "lrctl.client.cli", "--target", run.target, "swap",
             "exponential-decay", "--initial-learning-rate", "0.005", "--decay-steps", "0",
             "--decay-rate", "0.8"],
            env=subprocess_env, capture_output=True, text=True, timeout=LIMIT, check=False,
        )  # fmt: skip
    finally:
        run.process.send_signal(signal.SIGTERM)
        run.wait()
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("lrctl: error: "), result.stderr
    assert result.stderr.count("decay_steps") == 1, result.stderr  # the field, named once
    assert result.stdout == ""


# --- the command line, checked before TensorFlow loads ---


def test_help_answers_without_importing_tensorflow(subprocess_env: dict[str, str]) -> None:
    help_run = subprocess.run([sys.executable, "-m", "lrctl.service.apps.trainer", "--help"],
                              env=subprocess_env, capture_output=True, text=True, timeout=LIMIT,
                              check=False)  # fmt: skip
    assert help_run.returncode == 0, help_run.stderr
    assert "--model MODULE:FUNCTION" in help_run.stdout
    check = textwrap.dedent("""
        import sys
        from lrctl.service.apps import trainer
        try:
            trainer.main(["--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("tensorflow", "keras"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", check], env=subprocess_env, capture_output=True,
                            text=True, timeout=LIMIT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "listen", ["localhost", "127.0.0.1", "127.0.0.1:65536", "127.0.0.1:-1", "[::1]", "::1:50051", ":50051"]
)
def test_listen_without_a_valid_port_is_a_usage_error(
    listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        trainer_args.parse(["--demo", "--listen", listen])
    assert info.value.code == 2
    assert "argument --listen:" in capsys.readouterr().err


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:65535", "[::1]:50051", "unix:/tmp/lrctl.sock"])
def test_listen_forms_grpc_binds_are_accepted(listen: str) -> None:
    assert trainer_args.parse(["--demo", "--listen", listen]).listen == listen


BAD_TASK = """
import keras

def raises():
    raise RuntimeError("no data\\ntoday")

def not_a_pair():
    return 42

def not_compiled():
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]), ([[1.0]], [[1.0]])
"""

BAD_COMMAND_LINES = {
    "missing module": (["--model", "no_such_module:build"], "cannot import no_such_module"),
    "missing function": (["--model", "bad_task:build"], "bad_task has no function build"),
    "function raises": (["--model", "bad_task:raises"], "raises() raised RuntimeError: no data today"),
    "wrong return shape": (["--model", "bad_task:not_a_pair"], "must return (model, data)"),
    "not compiled": (["--model", "bad_task:not_compiled"], "compiled keras.Model"),
    "not MODULE:FUNCTION": (["--model", "bad_task"], "--model must be MODULE:FUNCTION"),
    "schedule not JSON": (["--demo", "--schedule", "{nope"], "--schedule is not valid JSON"),
    "schedule not an object": (["--demo", "--schedule", "[1]"], "--schedule must be a JSON object"),
    "unknown class_name": (["--demo", "--schedule", '{"class_name": "NoSuchDecay", "config": {}}'],
                           "Argument `class_name` must be one of"),
    "invalid parameter": (["--demo", "--schedule", ('{"class_name": "ExponentialDecay", "config": '
                           '{"initial_learning_rate": 0.1, "decay_steps": 0, "decay_rate": 0.5}}')],
                          "Argument `decay_steps` must be > 0"),
    "negative learning rate": (["--demo", "--learning-rate", "-1"], "--learning-rate: Argument"),
}  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    # TensorFlow's C++ start-up chatter also goes to stderr; ours starts with the program name.
    return [line for line in stderr.splitlines() if line.startswith("lrctl-trainer")]


@pytest.mark.parametrize(("argv", "expected"), BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES.keys())
def test_bad_model_or_schedule_is_one_line_and_exit_2(
    argv: list[str], expected: str, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    (tmp_path / "bad_task.py").write_text(BAD_TASK)
    result = subprocess.run([*TRAINER, "--listen", "127.0.0.1:0", *argv], cwd=tmp_path,
                            env=subprocess_env, capture_output=True, text=True, timeout=LIMIT,
                            check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert _error_lines(result.stderr) == [result.stderr.splitlines()[-1]], result.stderr
    assert expected in result.stderr.splitlines()[-1]


WITHOUT_TENSORFLOW = """
import sys

class NotInstalled:
    # As on a client-only install (`pip install lrctl`): tensorflow and keras are not found.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from lrctl.service.apps.trainer import main
raise SystemExit(main())
"""


def test_client_only_install_says_what_to_install(subprocess_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, "--demo"], env=subprocess_env,
                            capture_output=True, text=True, timeout=LIMIT, check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "lrctl-trainer: error: tensorflow is not installed; the trainer needs the service extra: "
        + 'pip install "lrctl[service]"'
    ]


def test_default_listen_address_is_the_servers() -> None:
    from lrctl.service.rpc import server

    assert trainer_args.DEFAULT_ADDRESS == server.DEFAULT_ADDRESS


def test_listening_beyond_loopback_without_auth_is_refused(subprocess_env: dict[str, str]) -> None:
    result = subprocess.run([*TRAINER, "--demo", "--listen", "0.0.0.0:0"], check=False, capture_output=True,
                            text=True, env=subprocess_env, timeout=LIMIT)
    assert result.returncode == 2
    (line,) = _error_lines(result.stderr)
    assert "refusing to listen on 0.0.0.0:0 without authentication" in line
    assert "--token-file" in line and "--insecure" in line


def test_a_secured_trainer_with_guardrails_and_a_journal_and_a_second_on_its_port(
    subprocess_env: dict[str, str], tmp_path: Path,
) -> None:
    from lrctl.client import FailedPrecondition, Unauthenticated
    from lrctl.service.rpc.journal import read

    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-test\n")
    journal = tmp_path / "audit" / "journal.jsonl"
    run = _Trainer("--demo", "--token-file", str(token), "--max-learning-rate", "0.05",
                   "--max-change-factor", "100", "--journal", str(journal), env=subprocess_env)
    try:
        run.wait_until_training(token="s3cret-token-for-the-test")
        with TrainingControlClient(run.target, timeout=LIMIT) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.get_state()
            assert anonymous.health() == "SERVING"  # probes need no token
        with TrainingControlClient(run.target, timeout=LIMIT, token="s3cret-token-for-the-test") as client:
            limits = client.get_state().guardrails
            assert (limits.max_learning_rate, limits.max_change_factor) == (0.05, 100)
            with pytest.raises(FailedPrecondition, match="max_learning_rate"):
                client.set_learning_rate(0.5)
            client.set_learning_rate(0.02, wait=True)
        # One trainer per port: a second one on it fails to start, in one line.
        second = subprocess.run([*TRAINER, "--demo", "--listen", run.target, "--verbose", "0"],
                                check=False, capture_output=True, text=True, env=subprocess_env,
                                timeout=LIMIT)
        assert second.returncode == 3, second.stderr
        (line,) = _error_lines(second.stderr)
        assert f"{run.target} is already in use" in line
    finally:
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr
    assert [(e["method"], e["code"], e["role"]) for e in read(journal)] == [
        ("SetLearningRate", "FAILED_PRECONDITION", "write"), ("SetLearningRate", "OK", "write")]


def test_tls_alone_beyond_loopback_is_refused(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    from pki import make_pki

    pki = make_pki(tmp_path)
    tls = ["--tls-cert", pki["server_crt"], "--tls-key", pki["server_key"]]
    result = subprocess.run([*TRAINER, "--demo", "--listen", "0.0.0.0:0", *tls], check=False,
                            capture_output=True, text=True, env=subprocess_env, timeout=LIMIT)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert "refusing to listen on 0.0.0.0:0 without authentication" in line
    assert "--tls-client-ca" in line and "--token-file" in line


def test_a_port_in_use_fails_at_once_before_tensorflow_loads(subprocess_env: dict[str, str]) -> None:
    check = textwrap.dedent("""
        import sys
        from lrctl.service.apps.trainer import main
        code = main(sys.argv[1:])
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("tensorflow", "keras"))
        print(code, loaded)
    """)
    with socket.socket() as holder:  # another process listening on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        result = subprocess.run([sys.executable, "-c", check, "--demo", "--listen", address],
                                env=subprocess_env, capture_output=True, text=True, timeout=LIMIT,
                                check=False)  # fmt: skip
    assert result.stdout.split("\n")[0] == "3 []", (result.stdout, result.stderr)
    assert _error_lines(result.stderr) == [
        f"lrctl-trainer: error: {address} is already in use: is another trainer running?"]


# --- starting is visible ---

GATED_TASK = """
import os, time
import keras, numpy as np

def build():
    # Holds the trainer in its start (TensorFlow loaded, no model yet) until the test says go.
    deadline = time.monotonic() + 120
    while not os.path.exists("go"):
        assert time.monotonic() < deadline, "the test never said go"
        time.sleep(0.01)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    x = np.ones((64, 3), "float32")
    return model, (x, x.sum(axis=1, keepdims=True))
"""


def test_a_starting_trainer_answers_starting_then_trains(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    from lrctl.client import Unavailable

    (tmp_path / "gated_task.py").write_text(GATED_TASK)
    run = _Trainer("--model", "gated_task:build", cwd=tmp_path, env=subprocess_env)
    readiness = "lrctl.v1.TrainingControlService"
    try:
        with TrainingControlClient(run.target, timeout=LIMIT) as client:
            # The model cannot exist before "go": every answer here is the start's.
            first = client.get_state()
            assert first.phase == pb.PHASE_STARTING and first.run_id and first.incarnation, first
            assert (client.health(), client.health(readiness)) == ("SERVING", "NOT_SERVING")
            with pytest.raises(Unavailable, match="the trainer is starting") as refused:
                client.set_learning_rate(0.05)
            assert refused.value.reason == "STARTING"
            with pytest.raises(Unavailable, match="the trainer is starting"):
                client.list_changes()
            with client.watch(0.01) as updates:
                states = iter(updates)
                assert next(states).phase == pb.PHASE_STARTING  # then it waits for the run
                (tmp_path / "go").touch()
                phases = [next(states).phase]
                while phases[-1] != pb.PHASE_TRAINING:
                    phases.append(next(states).phase)
            assert set(phases) <= {pb.PHASE_STARTING, pb.PHASE_TRAINING}, phases
            # Training: the same process and run, and everything works as before.
            state = client.get_state()
            assert (state.run_id, state.incarnation) == (first.run_id, first.incarnation)
            assert client.health(readiness) == "SERVING"
            change = client.set_learning_rate(0.05, wait=True, reason="after the start")
            assert change.status == pb.CHANGE_STATUS_APPLIED
            assert [c.request_id for c in client.list_changes().changes] == [change.request_id]
    finally:
        run.process.send_signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr
    assert run.stderr.index("control server on port") < run.stderr.index("training on ")  # before TensorFlow
