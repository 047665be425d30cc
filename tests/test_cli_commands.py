"""`lrctl cancel`, `lrctl history`, dry-run charts, --force, tokens and TLS: the CLI in-process
(`cli.main(argv, out=...)`) against the real server over a real TrainingControl whose run has
not started, so nothing applies unless a test calls `step_boundary()` itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import keras
import pytest
from pki import make_pki

from lrctl.client import TrainingControlClient, cli
from lrctl.service import Guardrails, TrainingControl
from lrctl.service.rpc.auth import server_credentials
from lrctl.service.rpc.server import serve

TOKEN = "t" * 32


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRCTL_TOKEN", raising=False)
    monkeypatch.delenv("LRCTL_TARGET", raising=False)


@pytest.fixture
def idle() -> Iterator[tuple[TrainingControl, str]]:
    """A real server over a control whose run has not started (SGD at 0.1, step 0)."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        yield control, f"127.0.0.1:{port}"


def lrctl(target: str, *argv: str) -> tuple[int, str]:
    """Run `lrctl --target TARGET ARGV...` in-process: (exit code, stdout)."""
    out = StringIO()
    code = cli.main(["--target", target, "--timeout", "60", *argv], out=out)
    return code, out.getvalue()


def submit(target: str, *argv: str) -> dict[str, object]:
    """`lrctl --json set/scale ... --no-wait`: the pending change as JSON."""
    code, out = lrctl(target, "--json", *argv, "--no-wait")
    assert code == 0
    change: dict[str, object] = json.loads(out)
    assert change["status"] == "CHANGE_STATUS_PENDING"
    return change


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrctl: error: "), err
    return err


# -- cancel ----------------------------------------------------------------------------------------
def test_cancel_by_request_id_then_history_shows_it_cancelled_first(
        idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    first = submit(target, "set", "0.05", "--reason", "older")
    change = submit(target, "set", "0.02", "--reason", "try")
    request_id = str(change["requestId"])

    code, out = lrctl(target, "cancel", request_id, "--reason", "superseded")
    assert code == 0
    assert out == "cancelled (superseded): set lr=0.02; nothing changed (try)\n"
    # Cancelling it again returns the record again, the cancel's reason recorded in it.
    code, out = lrctl(target, "--json", "cancel", request_id)
    assert code == 0 and json.loads(out)["status"] == "CHANGE_STATUS_CANCELLED"
    assert json.loads(out)["error"] == "cancelled: superseded"

    code, out = lrctl(target, "history")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0] == f"cancelled (superseded): set lr=0.02; nothing changed (try)  [{request_id}]"
    assert lines[1].startswith("pending (apply at the next step boundary): set lr=0.05 (older)")
    # The cancelled change never applies; the other one does.
    (applied,) = control.step_boundary()
    assert applied.request.request_id == first["requestId"]
    assert control.controller.snapshot().version == 1


def test_cancel_an_unknown_change_exits_not_found(idle: tuple[TrainingControl, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, target = idle
    assert lrctl(target, "cancel", "no-such-change") == (cli.EXIT_NOT_FOUND, "")
    assert "no-such-change" in one_error_line(capsys)
    assert lrctl(target, "cancel", "--version", "7") == (cli.EXIT_NOT_FOUND, "")
    one_error_line(capsys)
    assert cli.EXIT_NOT_FOUND == 9


def test_cancel_a_change_that_already_ended_exits_failed_precondition(
        idle: tuple[TrainingControl, str], capsys: pytest.CaptureFixture[str]) -> None:
    control, target = idle
    request_id = str(submit(target, "scale", "0.5")["requestId"])
    (applied,) = control.step_boundary()
    assert applied.version == 1
    assert lrctl(target, "cancel", request_id) == (cli.EXIT_FAILED_PRECONDITION, "")
    assert "already applied" in one_error_line(capsys)
    assert lrctl(target, "cancel", "--version", "1") == (cli.EXIT_FAILED_PRECONDITION, "")
    one_error_line(capsys)
    assert cli.EXIT_FAILED_PRECONDITION != cli.EXIT_NOT_FOUND


def test_cancel_needs_exactly_one_of_request_id_and_version(idle: tuple[TrainingControl, str],
                                                             ) -> None:
    _, target = idle
    for argv in (["cancel"], ["cancel", "abc", "--version", "1"], ["cancel", ""]):
        with pytest.raises(SystemExit) as info:
            lrctl(target, *argv)
        assert info.value.code == cli.EXIT_USAGE


def test_a_pending_change_prints_its_request_id(idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    code, out = lrctl(target, "scale", "0.5", "--no-wait")
    (pending,) = control.controller.snapshot().pending
    assert code == 0 and out.startswith("pending (apply at the next step boundary): scale x0.5")
    assert pending.request.request_id in out
    code, out = lrctl(target, "state")
    assert f"[{pending.request.request_id}]" in out  # the pending lines of the state too


def test_a_timed_out_set_says_how_to_cancel_it(idle: tuple[TrainingControl, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    control, target = idle  # no step boundary comes: the wait runs out
    code = cli.main(["--target", target, "--timeout", "0.5", "set", "0.05"], out=StringIO())
    assert code == cli.EXIT_DEADLINE_EXCEEDED
    (pending,) = control.controller.snapshot().pending
    err = one_error_line(capsys)
    assert f"lrctl cancel {pending.request.request_id}" in err
    assert lrctl(target, "cancel", pending.request.request_id)[0] == 0


def test_state_shows_the_guardrails_and_the_lr_at_a_future_step(
        capsys: pytest.CaptureFixture[str]) -> None:
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([100], [0.1, 0.01])
    control = TrainingControl(keras.optimizers.SGD(learning_rate=schedule),
                              guardrails=Guardrails(max_learning_rate=0.5, max_change_factor=4.0))
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        target = f"127.0.0.1:{port}"
        code, out = lrctl(target, "state")
        assert code == 0
        assert "guardrails: lr in [0, 0.5], max change factor 4, " in out
        assert lrctl(target, "state", "--at-step", "50") == (0, "lr at step 50: 0.1\n")
        assert lrctl(target, "state", "--at-step", "5000") == (0, "lr at step 5000: 0.01\n")
        code, out = lrctl(target, "--json", "state", "--at-step", "5000")
        assert json.loads(out) == {"step": 5000, "learningRate": pytest.approx(0.01)}
        assert lrctl(target, "history") == (0, "")  # a forecast queues nothing
        assert control.controller.snapshot().version == 0
        control.step_boundary()  # step 0 has been run
        code, _ = lrctl(target, "state", "--at-step", "0")
        assert code == cli.EXIT_FAILED_PRECONDITION
        assert "--at-step 0: only a future step" in one_error_line(capsys)


# -- history ---------------------------------------------------------------------------------------
def test_history_limit_json_and_failed_changes(idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    for i in range(3):
        submit(target, "set", f"0.0{i + 1}", "--reason", f"r{i}")
    code, out = lrctl(target, "history", "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert "(r2)" in lines[0] and "(r1)" in lines[1]  # newest first

    code, out = lrctl(target, "--json", "history")
    changes = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [c["reason"] for c in changes] == ["r2", "r1", "r0"]
    assert {c["status"] for c in changes} == {"CHANGE_STATUS_PENDING"}

    # A boundary at step 0 applies all three; then step 0 has passed, so a change for it fails
    # and is recorded with its error.
    assert len(control.step_boundary()) == 3
    assert lrctl(target, "set", "0.5", "--at-step", "0")[0] == cli.EXIT_FAILED_PRECONDITION
    code, out = lrctl(target, "history", "--limit", "1")
    assert out.startswith("failed: set lr=0.5; nothing changed: ")
    assert "apply_at_step=0 may already have passed" in out
    code, out = lrctl(target, "history", "--limit", "2", "--json")
    assert [json.loads(line)["status"] for line in out.splitlines()] == [
        "CHANGE_STATUS_FAILED", "CHANGE_STATUS_APPLIED"]


def test_history_pages_through_list_changes(idle: tuple[TrainingControl, str]) -> None:
    _, target = idle
    with TrainingControlClient(target, timeout=60) as client:
        for i in range(105):  # more than ListChanges' largest page (100)
            client.set_learning_rate(0.01, reason=str(i))
    code, out = lrctl(target, "--json", "history", "--limit", "103")
    assert code == 0
    assert [json.loads(line)["reason"] for line in out.splitlines()] == \
        [str(i) for i in range(104, 1, -1)]


# -- dry runs and --force --------------------------------------------------------------------------
def _plot(out: str) -> str:
    """The chart's plot area: the rows between the y axis and the x axis."""
    rows = [line.split("|", 1)[1] for line in out.splitlines() if "|" in line]
    assert len(rows) == cli.PREVIEW_ROWS
    return "\n".join(rows)


def test_dry_run_draws_the_preview_and_changes_nothing(idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    code, out = lrctl(target, "scale", "0.5", "--dry-run")
    assert code == 0
    plot = _plot(out)
    assert cli.PREVIEW_CURRENT in plot and cli.PREVIEW_CHANGE in plot
    lines = out.splitlines()
    y_labels = [line.split("|")[0].strip() for line in lines[:cli.PREVIEW_ROWS]]
    assert y_labels == ["0.1", *[""] * (cli.PREVIEW_ROWS - 2), "0.05"]
    assert lines[-1] == "valid (dry run): scale x0.5"
    assert "1000" in lines[-3]  # the x axis: first and last step (the default horizon)

    code, out = lrctl(target, "swap", "piecewise-linear", "--knots", "0:0.1,500:0.0",
                      "--dry-run", "--preview-steps", "500")
    plot = _plot(out)
    assert code == 0 and cli.PREVIEW_BOTH in plot  # both start at 0.1
    assert out.splitlines()[-3].split()[-2] == "500"

    code, out = lrctl(target, "--json", "set", "0.2", "--dry-run")
    change = json.loads(out)  # the JSON only, no chart
    assert code == 0 and change["status"] == "CHANGE_STATUS_VALIDATED"
    assert len(change["preview"]) == len(change["previewCurrent"]) == 33
    assert change["preview"][-1]["step"] == 1000  # int64 as a JSON number
    assert change["preview"][-1]["learningRate"] == pytest.approx(0.2)

    code, out = lrctl(target, "scale", "0.5", "--dry-run", "--preview-steps", "0")
    assert (code, out) == (0, "valid (dry run): scale x0.5\n")  # no preview, no chart
    assert lrctl(target, "history") == (0, "")  # nothing was queued
    assert control.controller.snapshot().version == 0
    with pytest.raises(SystemExit) as info:
        lrctl(target, "scale", "0.5", "--preview-steps", "10")  # would apply it
    assert info.value.code == cli.EXIT_USAGE


def test_force_skips_the_change_factor_guardrail(capsys: pytest.CaptureFixture[str]) -> None:
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1),
                              guardrails=Guardrails(max_change_factor=2.0))
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        target = f"127.0.0.1:{port}"
        assert lrctl(target, "scale", "10", "--dry-run")[0] == cli.EXIT_FAILED_PRECONDITION
        assert "max_change_factor" in one_error_line(capsys)
        code, out = lrctl(target, "scale", "10", "--dry-run", "--force")
        assert code == 0 and out.endswith("valid (dry run): scale x10\n")
        code, out = lrctl(target, "--json", "set", "1", "--force", "--no-wait")
        assert code == 0 and json.loads(out)["status"] == "CHANGE_STATUS_PENDING"


# -- tokens and TLS --------------------------------------------------------------------------------
@pytest.fixture
def guarded() -> Iterator[str]:
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0", write_tokens=[TOKEN]) as (_, port):
        yield f"127.0.0.1:{port}"


def test_token_file_and_environment(guarded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert lrctl(guarded, "--token-file", str(token_file), "health")[0] == 0
    assert lrctl(guarded, "--token-file", str(token_file), "history")[0] == 0
    assert lrctl(guarded, "history", "--token-file", str(token_file))[0] == 0  # after it too

    assert lrctl(guarded, "history") == (cli.EXIT_UNAUTHENTICATED, "")
    assert "--token-file" in one_error_line(capsys)
    token_file.write_text("x" * 32)
    assert lrctl(guarded, "--token-file", str(token_file), "history")[0] == cli.EXIT_UNAUTHENTICATED
    one_error_line(capsys)

    monkeypatch.setenv("LRCTL_TOKEN", TOKEN)
    assert lrctl(guarded, "--json", "set", "0.2", "--no-wait")[0] == 0
    assert TOKEN not in capsys.readouterr().err
    assert cli.EXIT_UNAUTHENTICATED == 12


def test_a_missing_or_empty_token_file_is_a_usage_error(guarded: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert lrctl(guarded, "--token-file", str(missing), "state") == (cli.EXIT_USAGE, "")
    assert str(missing) in one_error_line(capsys)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert lrctl(guarded, "state", "--token-file", str(empty)) == (cli.EXIT_USAGE, "")
    assert "empty" in one_error_line(capsys)
    two = tmp_path / "two"
    two.write_text(f"{TOKEN}\n{TOKEN}\n")
    assert lrctl(guarded, "state", "--token-file", str(two)) == (cli.EXIT_USAGE, "")
    assert TOKEN not in one_error_line(capsys)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_options(pki: dict[str, str], mutual: bool, capsys: pytest.CaptureFixture[str]) -> None:
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    credentials = server_credentials(pki["server_crt"], pki["server_key"],
                                     pki["ca_crt"] if mutual else None)
    with serve(control.controller, "127.0.0.1:0", credentials=credentials) as (_, port):
        target = f"127.0.0.1:{port}"
        client_cert = ["--cert", pki["client_crt"], "--key", pki["client_key"]]
        code, out = lrctl(target, "--ca", pki["ca_crt"], *client_cert, "--json", "state")
        assert code == 0 and json.loads(out)["optimizer"] == "SGD"
        code, out = lrctl(target, "state", "--ca", pki["ca_crt"], *client_cert)  # after it too
        assert code == 0 and "optimizer: SGD" in out
        if not mutual:
            assert lrctl(target, "--ca", pki["ca_crt"], "health") == (0, "SERVING\n")

    for half in (["--cert", pki["client_crt"]], ["--key", pki["client_key"]]):
        with pytest.raises(SystemExit) as info:
            lrctl(target, "--ca", pki["ca_crt"], *half, "state")
        assert info.value.code == cli.EXIT_USAGE
        assert "--cert and --key go together" in capsys.readouterr().err
    missing = str(Path(pki["ca_crt"]).with_name("missing.crt"))
    assert lrctl(target, "--ca", missing, "state") == (cli.EXIT_USAGE, "")
    assert missing in one_error_line(capsys)



# -- --json for scripts ----------------------------------------------------------------------------
def test_json_int64_are_numbers_and_zero_values_are_printed(
        idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    code, out = lrctl(target, "--json", "state")
    state = json.loads(out)  # at version 0 and step 0: `jq .version` needs no `// 0`
    assert (state["version"], state["step"], state["pendingChanges"]) == (0, 0, [])
    pending = submit(target, "set", "0.05")
    assert pending["version"] == 0 and pending["error"] == ""
    assert "appliedStep" not in pending  # optional and not set yet: left out
    code, out = lrctl(target, "--json", "swap", "piecewise-linear", "--knots", "0:0.1,100:0.0",
                      "--dry-run", "--preview-steps", "100")
    assert json.loads(out)["preview"][-1] == {"step": 100, "learningRate": 0.0}
    assert len(control.step_boundary()) == 1
    code, out = lrctl(target, "--json", "history", "--limit", "1")
    applied = json.loads(out)
    assert code == 0 and applied["status"] == "CHANGE_STATUS_APPLIED"
    assert type(applied["version"]) is int and applied["version"] == 1
    code, out = lrctl(target, "--json", "state")
    state = json.loads(out)
    assert type(state["version"]) is int and state["version"] == 1
    assert all(type(c["version"]) is int for c in state["recentChanges"])


def test_json_errors_are_one_object_on_stderr(idle: tuple[TrainingControl, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, target = idle
    capsys.readouterr()
    code, _ = lrctl(target, "--json", "set", "0.2", "--expected-version", "5", "--no-wait")
    error = json.loads(capsys.readouterr().err)
    assert code == cli.EXIT_VERSION_CONFLICT == error["exit_code"]
    assert error["code"] == "ABORTED" and error["current_version"] == 0
    assert type(error["current_version"]) is int and error["message"]

    code, _ = lrctl(target, "--json", "set", "nan", "--no-wait")
    error = json.loads(capsys.readouterr().err)
    assert code == cli.EXIT_INVALID_ARGUMENT == error["exit_code"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["field_violations"] and set(error["field_violations"][0]) == {
        "field", "description"}

    code, _ = lrctl(target, "--json", "cancel", "no-such-change")
    error = json.loads(capsys.readouterr().err)
    assert code == cli.EXIT_NOT_FOUND == error["exit_code"] and error["code"] == "NOT_FOUND"
    assert "current_version" not in error
