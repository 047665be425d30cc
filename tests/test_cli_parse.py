"""`lrctl` argument parsing and request mapping (no server needed)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lrctl.client import ChangeOptions, cli, schedules
from lrctl.v1 import training_control_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


#: One parser for the tests that do not change the environment: `parse_args` leaves a parser
#: as it found it, and building one (~20 ms) per call was most of this file's time. A parser
#: reads $LRCTL_TARGET when built: a test that sets it builds its own (`parse_fresh`).
PARSER = cli.build_parser()


def parse(*argv: str) -> object:
    return PARSER.parse_args(list(argv))


def parse_fresh(*argv: str) -> object:
    return cli.build_parser().parse_args(list(argv))


#: The change options a command line leaves at their defaults, besides those a test names.
UNSET = {"expected_run_id": "", "expected_incarnation": "", "apply_after_steps": None}
SWAP_UNSET = {**UNSET, "schedule_start_step": 0, "scale": None}


def change_kwargs(args: object) -> dict[str, object]:
    """`build_change_call`'s kwargs less the request id the CLI makes (checked here)."""
    kwargs = dict(cli.build_change_call(args)[2])
    assert re.fullmatch(r"[0-9a-f]{32}", kwargs.pop("request_id"))
    return kwargs


SWAP_CASES = [
    (
        ["constant", "--learning-rate", "0.01"],
        schedules.Constant(0.01),
    ),
    (
        ["exponential-decay", "--initial-learning-rate", "0.005", "--decay-steps", "5",
         "--decay-rate", "0.8", "--staircase"],
        schedules.ExponentialDecay(0.005, 5, 0.8, staircase=True),
    ),
    (
        ["exponential-decay", "--initial-learning-rate", "0.1", "--decay-steps", "10",
         "--decay-rate", "0.5"],
        schedules.ExponentialDecay(0.1, 10, 0.5),
    ),
    (
        ["piecewise-constant-decay", "--boundaries", "100,200", "--values", "0.1,0.01,0.001"],
        schedules.PiecewiseConstantDecay([100, 200], [0.1, 0.01, 0.001]),
    ),
    (
        ["polynomial-decay", "--initial-learning-rate", "0.1", "--decay-steps", "100"],
        schedules.PolynomialDecay(0.1, 100),
    ),
    (
        ["polynomial-decay", "--initial-learning-rate", "0.1", "--decay-steps", "100",
         "--end-learning-rate", "0.01", "--power", "2", "--cycle"],
        schedules.PolynomialDecay(0.1, 100, end_learning_rate=0.01, power=2.0, cycle=True),
    ),
    (
        ["inverse-time-decay", "--initial-learning-rate", "0.1", "--decay-steps", "10",
         "--decay-rate", "0.5", "--staircase"],
        schedules.InverseTimeDecay(0.1, 10, 0.5, staircase=True),
    ),
    (
        ["cosine-decay", "--initial-learning-rate", "0.1", "--decay-steps", "1000"],
        schedules.CosineDecay(0.1, 1000),
    ),
    (
        ["cosine-decay", "--initial-learning-rate", "0.0", "--decay-steps", "1000",
         "--alpha", "0.1", "--warmup-target", "0.2", "--warmup-steps", "100"],
        schedules.CosineDecay(0.0, 1000, alpha=0.1, warmup_target=0.2, warmup_steps=100),
    ),
    (
        ["cosine-decay-restarts", "--initial-learning-rate", "0.1", "--first-decay-steps", "100",
         "--t-mul", "1.5", "--m-mul", "0.9", "--alpha", "0.01"],
        schedules.CosineDecayRestarts(0.1, 100, t_mul=1.5, m_mul=0.9, alpha=0.01),
    ),
    (
        ["cosine-decay-restarts", "--initial-learning-rate", "0.1", "--first-decay-steps", "100"],
        schedules.CosineDecayRestarts(0.1, 100),
    ),
    (
        ["piecewise-linear", "--knots", "0:0.0,100:0.1,1000:0.001"],
        schedules.PiecewiseLinear([(0, 0.0), (100, 0.1), (1000, 0.001)]),
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"), SWAP_CASES, ids=[f"{argv[0]}-{i}" for i, (argv, _) in enumerate(SWAP_CASES)]
)
def test_swap_maps_to_schedule(argv: list[str], expected: pb.Schedule) -> None:
    args = parse("swap", *argv)
    method, call_args, kwargs = cli.build_change_call(args)
    assert method == "swap_schedule"
    assert call_args == (expected,)
    assert kwargs["origin"] == "restart"
    assert kwargs["wait"] is True


def test_every_kind_has_a_case() -> None:
    assert {argv[0] for argv, _ in SWAP_CASES} == set(cli.SWAP_KINDS)


@pytest.mark.parametrize("kind", sorted(cli.SWAP_KINDS))
def test_swap_table_matches_builder_signature(kind: str) -> None:
    entry = cli.SWAP_KINDS[kind]
    params = inspect.signature(entry.builder).parameters
    names = [n for n in params if n != "name"]
    assert [a.name for a in entry.args] == names
    for arg in entry.args:
        has_default = params[arg.name].default is not inspect.Parameter.empty
        assert arg.required is not has_default, arg.name


def test_swap_origin_and_change_flags() -> None:
    args = parse(
        "swap", "constant", "--learning-rate", "0.1", "--origin", "global", "--at-step", "500",
        "--expected-version", "3", "--reason", "cooldown",
    )  # fmt: skip
    assert change_kwargs(args) == {
        "apply_at_step": 500,
        "expected_version": 3,
        "wait": False,  # --at-step implies --no-wait
        "validate_only": False,
        "reason": "cooldown",
        "force": False,
        "preview_steps": 0,
        "origin": "global",
        **SWAP_UNSET,
    }


def test_the_cli_has_the_clients_change_options() -> None:
    # --expected-run-id, --after-steps, and swap's --schedule-start-step and --scale, as the
    # Python client takes them.
    args = parse(
        "swap", "--schedule-start-step", "40", "cosine-decay", "--initial-learning-rate", "0.1",
        "--decay-steps", "100", "--scale", "0.5", "--expected-run-id", "run-7",
        "--after-steps", "25",
    )  # fmt: skip
    kwargs = change_kwargs(args)
    assert (kwargs["schedule_start_step"], kwargs["scale"]) == (40, 0.5)
    assert (kwargs["expected_run_id"], kwargs["apply_after_steps"]) == ("run-7", 25)
    assert kwargs["wait"] is False  # --after-steps implies --no-wait, as --at-step does
    kwargs = change_kwargs(parse("scale", "0.5", "--expected-run-id", "r", "--after-steps", "0"))
    assert (kwargs["expected_run_id"], kwargs["apply_after_steps"]) == ("r", 0)
    assert parse("cancel", "abc", "--expected-run-id", "r").expected_run_id == "r"
    assert parse("state", "--at-step", "9000").at_step == 9000
    # Each command line gets a request id of its own.
    assert change_kwargs(parse("set", "0.1")) == change_kwargs(parse("set", "0.1"))
    assert cli.build_change_call(parse("set", "0.1"))[2]["request_id"] != \
        cli.build_change_call(parse("set", "0.1"))[2]["request_id"]


def test_set_and_scale() -> None:
    method, call_args, _ = cli.build_change_call(parse("set", "0.01"))
    assert (method, call_args) == ("set_learning_rate", (0.01,))
    assert change_kwargs(parse("set", "0.01")) == {
        "apply_at_step": None,
        "expected_version": None,
        "wait": True,
        "validate_only": False,
        "reason": "",
        "force": False,
        "preview_steps": 0,
        **UNSET,
    }
    method, call_args, kwargs = cli.build_change_call(parse("scale", "0.5", "--no-wait"))
    assert (method, call_args, kwargs["wait"]) == ("scale_learning_rate", (0.5,), False)
    _, _, kwargs = cli.build_change_call(parse("scale", "0.5", "--dry-run"))
    assert kwargs["validate_only"] is True
    assert kwargs["wait"] is False
    assert kwargs["preview_steps"] == cli.DEFAULT_PREVIEW_STEPS == 1000


def test_force_and_preview_steps() -> None:
    for argv in (["set", "0.1"], ["scale", "2"], ["swap", "constant", "--learning-rate", "0.1"]):
        _, _, kwargs = cli.build_change_call(parse(*argv, "--force"))
        assert (kwargs["force"], kwargs["preview_steps"]) == (True, 0)
        _, _, kwargs = cli.build_change_call(parse(*argv, "--dry-run", "--preview-steps", "50"))
        assert (kwargs["force"], kwargs["validate_only"], kwargs["preview_steps"]) == (False, True, 50)
    # swap takes them before KIND too.
    args = parse("swap", "--force", "--dry-run", "--preview-steps", "7", "constant",
                 "--learning-rate", "0.1")  # fmt: skip
    _, _, kwargs = cli.build_change_call(args)
    assert (kwargs["force"], kwargs["preview_steps"]) == (True, 7)


def test_global_flags_before_and_after_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRCTL_TARGET", raising=False)
    args = parse("state")
    assert (args.target, args.json, args.timeout) == ("127.0.0.1:50051", False, 10.0)
    args = parse("--target", "h:1", "--json", "--timeout", "2", "state")
    assert (args.target, args.json, args.timeout) == ("h:1", True, 2.0)
    args = parse("state", "--target", "h:2", "--json", "--timeout", "3")
    assert (args.target, args.json, args.timeout) == ("h:2", True, 3.0)
    args = parse("swap", "constant", "--learning-rate", "1", "--target", "h:3")
    assert args.target == "h:3"
    # A flag given before the subcommand survives the subparser's defaults.
    args = parse("--target", "h:4", "swap", "constant", "--learning-rate", "1")
    assert args.target == "h:4"


def test_target_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRCTL_TARGET", "trainer:9000")
    assert parse_fresh("state").target == "trainer:9000"


def test_watch_and_health_flags() -> None:
    args = parse("watch", "--min-interval", "0.5", "--count", "3")
    assert (args.min_interval, args.count) == (0.5, 3)
    assert parse("health").service == ""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["swap"],
        ["swap", "nope"],
        ["swap", "exponential-decay", "--initial-learning-rate", "0.1"],  # missing required
        ["swap", "piecewise-linear", "--knots", "0-0.1"],
        ["swap", "piecewise-constant-decay", "--boundaries", "a,b", "--values", "1"],
        ["set"],
        ["set", "abc"],
        ["watch", "--min-interval", "-1"],
        ["cancel"],
        ["cancel", "abc", "--version", "1"],
        ["cancel", "--version", "x"],
        ["history", "--limit", "0"],
        ["set", "0.1", "--dry-run", "--preview-steps", "-1"],
        ["--token", "secret", "state"],  # no flag takes a token itself
        ["state", "--token=secret"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "secret" not in err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for text in ("3 invalid argument", "4 version conflict", "7 unavailable", "8 not serving",
                 "9 not found", "10 resource exhausted", "11 internal", "12 unauthenticated",
                 "13 permission denied"):  # fmt: skip
        assert text in out
    assert cli.__doc__ is not None
    assert "7  unavailable" in cli.__doc__
    for code, name in ((9, "not found"), (10, "resource exhausted"), (11, "internal"),
                       (12, "unauthenticated"), (13, "permission denied")):  # fmt: skip
        assert re.search(rf"^  {code} +{name} ", cli.__doc__, flags=re.MULTILINE)


def test_exit_codes_are_distinct_and_the_old_ones_unchanged() -> None:
    codes = {cls.__name__: code for cls, code in cli.EXIT_CODES.items()}
    assert codes == {
        "InvalidArgument": 3, "VersionConflict": 4, "FailedPrecondition": 5,
        "DeadlineExceeded": 6, "Unavailable": 7, "NotFound": 9, "ResourceExhausted": 10,
        "Internal": 11, "Unauthenticated": 12, "PermissionDenied": 13,
    }  # fmt: skip
    assert len(set(codes.values()) | {0, 1, 2, 8}) == len(codes) + 4


def test_cancel_and_history() -> None:
    args = parse("cancel", "abc", "--reason", "superseded")
    assert (args.request_id, args.version, args.reason) == ("abc", None, "superseded")
    args = parse("cancel", "--version", "3")
    assert (args.request_id, args.version, args.reason) == (None, 3, "")
    assert parse("history").limit == cli.DEFAULT_HISTORY_LIMIT == 20
    assert parse("history", "--limit", "5").limit == 5


def test_change_wait_and_history_filter(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("history").filter == ""
    assert parse("history", "--filter", "status = PENDING").filter == "status = PENDING"
    for command in ("change", "wait"):
        args = parse(command, "changes/7")
        assert (args.command, args.change, args.version) == (command, "changes/7", None)
        assert (parse(command, "abc").change, parse(command, "--version", "3").version) == ("abc", 3)
        for argv in ([command], [command, "abc", "--version", "1"], [command, ""]):
            with pytest.raises(SystemExit) as info:
                cli.main(["--target", "127.0.0.1:1", *argv])  # checked before any connection
            assert info.value.code == 2
        out = _help(monkeypatch, capsys, command)
        assert len(out.splitlines()) <= 30 and "NAME | REQUEST_ID" in out and "changes/7" in out


def test_auth_and_tls_flags_before_and_after_subcommand() -> None:
    args = parse("state")
    assert (args.token_file, args.ca, args.cert, args.key) == (None, None, None, None)
    flags = ["--token-file", "t", "--ca", "ca.crt", "--cert", "c.crt", "--key", "c.key"]
    for argv in (
        [*flags, "history"],
        ["history", *flags],
        ["swap", "constant", "--learning-rate", "1", *flags],
        [*flags, "swap", "constant", "--learning-rate", "1"],
    ):
        args = parse(*argv)
        assert (args.token_file, args.ca, args.cert, args.key) == ("t", "ca.crt", "c.crt", "c.key")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cert", "c.crt", "state"], "--cert and --key go together"),
        (["state", "--key", "c.key"], "--cert and --key go together"),
        (["scale", "0.5", "--preview-steps", "10"], "--preview-steps needs --dry-run"),
        (["cancel", ""], "REQUEST_ID must not be empty"),
        (["set", "0.1", "--at-step", "5", "--after-steps", "5"], "exclude each other"),
    ],
)
def test_checked_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before any connection is made: the target is never dialled.
    with pytest.raises(SystemExit) as info:
        cli.main(["--target", "127.0.0.1:1", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_token_file_that_cannot_be_read_is_a_one_line_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    for path, text in ((tmp_path / "missing", "cannot read --token-file"), (empty, "is empty")):
        assert cli.main(["--target", "127.0.0.1:1", "--token-file", str(path), "state"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lrctl: error: ") and err.count("\n") == 1 and text in err


def test_describe_change() -> None:
    applied = pb.Change(
        version=3, status=pb.CHANGE_STATUS_APPLIED, scale=0.5, applied_step=120,
        learning_rate_after=0.005, reason="plateau", description="scale x0.5",
    )  # fmt: skip
    assert cli.describe_change(applied) == "applied v3 at step 120: scale x0.5 -> lr 0.005 (plateau)"
    pending = pb.Change(status=pb.CHANGE_STATUS_PENDING, set_learning_rate=0.01, apply_at_step=500)
    assert cli.describe_change(pending).startswith("pending (apply at step 500)")
    valid = pb.Change(status=pb.CHANGE_STATUS_VALIDATED, scale=2.0)
    assert cli.describe_change(valid).startswith("valid (dry run)")
    cancelled = pb.Change(status=pb.CHANGE_STATUS_CANCELLED, scale=0.5, reason="plateau")
    assert cli.describe_change(cancelled) == "cancelled: scale x0.5; nothing changed (plateau)"
    assert "run ended" not in cli.describe_change(cancelled)  # a client may have cancelled it
    failed = pb.Change(status=pb.CHANGE_STATUS_FAILED, set_learning_rate=0.1,
                       error="apply_at_step=5 may already have passed")  # fmt: skip
    assert cli.describe_change(failed) == (
        "failed: set lr 0.1; nothing changed: apply_at_step=5 may already have passed"
    )


def _preview_change(after: list[float], current: list[float]) -> pb.Change:
    change = pb.Change(status=pb.CHANGE_STATUS_VALIDATED, scale=0.5)
    for i, (a, c) in enumerate(zip(after, current, strict=True)):
        change.preview.add(step=100 + 10 * i, learning_rate=a)
        change.preview_current.add(step=100 + 10 * i, learning_rate=c)
    return change


def test_render_preview() -> None:
    # 33 points: the change halves the LR after the first 11; the current schedule stays.
    change = _preview_change([0.1] * 11 + [0.05] * 22, [0.1] * 33)
    lines = cli.render_preview(change).splitlines()
    assert len(lines) == cli.PREVIEW_ROWS + 3
    rows = [line.split("|", 1) for line in lines[: cli.PREVIEW_ROWS]]
    assert rows[0] == [" 0.1 ", "#" * 11 + "o" * 22]  # overlap, then the current schedule alone
    assert rows[-1] == ["0.05 ", " " * 11 + "*" * 22]  # the change
    assert all(label.strip() == "" and plot.strip() == "" for label, plot in rows[1:-1])
    assert lines[cli.PREVIEW_ROWS] == "     +" + "-" * 33
    assert lines[cli.PREVIEW_ROWS + 1].split() == ["100", "420", "(step)"]
    assert lines[cli.PREVIEW_ROWS + 1].index("420") + 3 == len("     +") + 33  # under the end
    assert "o current" in lines[-1] and "* with the change" in lines[-1] and "# both" in lines[-1]


def test_render_preview_edge_cases() -> None:
    assert cli.render_preview(pb.Change(status=pb.CHANGE_STATUS_VALIDATED)) == ""
    flat = cli.render_preview(_preview_change([0.1] * 33, [0.1] * 33)).splitlines()
    (row,) = [line for line in flat if "|#" in line]  # one row, labelled, all overlap
    assert row == "0.1 |" + "#" * 33
    # A linear ramp visits every row once per column band, top to bottom.
    ramp = cli.render_preview(_preview_change([1.0 - i / 32 for i in range(33)], [0.0] * 33))
    plot = [line.split("|", 1)[1] for line in ramp.splitlines()[: cli.PREVIEW_ROWS]]
    assert all("*" in row or "#" in row for row in plot)
    assert plot[0].startswith("*") and plot[-1].endswith("#")


def test_unreachable_server_exits_7(subprocess_env: dict[str, str]) -> None:
    # Nothing listens on port 1. The deadline is short, so it may pass while gRPC
    # is still retrying UNAVAILABLE; that must still be reported as unreachable.
    runs = [subprocess.Popen(  # both at once: each spends most of its time waiting
        [sys.executable, "-m", "lrctl.client.cli", "--target", "127.0.0.1:1", "--timeout", timeout, "state"],
        cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for timeout in ("0.3", "5")]
    for run in runs:
        stdout, stderr = run.communicate(timeout=60)
        result = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
        assert result.returncode == 7, result.stderr
        assert result.stderr.startswith("lrctl: error: server unavailable"), result.stderr
        assert result.stderr.count("lrctl: error:") == 1, result.stderr  # reported once
        assert "127.0.0.1:1" in result.stderr
        # One line that says where to look.
        assert result.stderr.count("\n") == 1, result.stderr
        assert "is the trainer running? check --target or $LRCTL_TARGET" in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize(
    "target", ["localhost", "127.0.0.1", "[::1]", "::1", "h:", "h:0", "h:65536", "h:port"]
)
def test_target_without_a_valid_port_is_a_usage_error(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # gRPC would dial port 443 for a bare host and report only "unavailable".
    with pytest.raises(SystemExit) as info:
        parse("--target", target, "state")
    assert info.value.code == 2
    assert "argument --target:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "target",
    ["localhost:50051", "10.0.0.7:1", "[::1]:50051", "unix:/run/lrctl.sock",
     "unix-abstract:lrctl", "dns:///trainer-0:50051", "ipv4:127.0.0.1:50051"],
)  # fmt: skip
def test_target_forms_that_grpc_dials_are_accepted(target: str) -> None:
    assert parse("--target", target, "state").target == target
    assert parse("state", "--target", target).target == target


@pytest.mark.parametrize("target", ["http://localhost:50051", "https://trainer-0:443"])
def test_a_url_target_is_named_as_a_url(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    # It used to be taken for an IPv6 host without brackets.
    with pytest.raises(SystemExit) as info:
        parse("--target", target, "state")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "use HOST:PORT, not a URL" in err and "IPv6" not in err


def test_bad_target_from_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LRCTL_TARGET", "trainer-0")
    with pytest.raises(SystemExit):
        parse_fresh("state")
    assert "$LRCTL_TARGET" in capsys.readouterr().err
    assert parse_fresh("--target", "trainer-0:50051", "state").target == "trainer-0:50051"


def test_swap_help_shows_the_change_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("swap", "--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--origin", "--at-step", "--dry-run", "--expected-version", "--no-wait"):
        assert flag in out


def test_swap_change_flags_before_or_after_the_kind() -> None:
    before = parse("swap", "--origin", "global", "--at-step", "7", "--dry-run", "--reason", "r",
                   "constant", "--learning-rate", "0.1")  # fmt: skip
    after = parse("swap", "constant", "--learning-rate", "0.1", "--origin", "global",
                  "--at-step", "7", "--dry-run", "--reason", "r")  # fmt: skip
    expected = {"apply_at_step": 7, "expected_version": None, "wait": False,
                "validate_only": True, "reason": "r", "force": False,
                "preview_steps": cli.DEFAULT_PREVIEW_STEPS, "origin": "global",
                **SWAP_UNSET}  # fmt: skip
    assert change_kwargs(before) == expected
    assert change_kwargs(after) == expected
    # Left out everywhere, each flag keeps its default.
    kwargs = change_kwargs(parse("swap", "constant", "--learning-rate", "0.1"))
    assert kwargs == {"apply_at_step": None, "expected_version": None, "wait": True,
                      "validate_only": False, "reason": "", "force": False, "preview_steps": 0,
                      "origin": "restart", **SWAP_UNSET}  # fmt: skip


def _help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as info:
        parse(*argv, "--help")
    assert info.value.code == 0
    return capsys.readouterr().out


def test_a_commands_help_is_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help(monkeypatch, capsys, "set")
    assert len(out.splitlines()) <= 30, out
    for flag in ("--at-step", "--after-steps", "--expected-version", "--expected-run-id",
                 "--dry-run", "--preview-steps", "--force", "--no-wait"):  # fmt: skip
        assert flag in out
    assert "lrctl set 0.01" in out  # an example of it
    # The global options and the exit codes are `lrctl --help`'s, not repeated here.
    for text in ("--token-file", "--target", "exit codes", "3 invalid argument"):
        assert text not in out
    # The globals still work after the command.
    assert parse("set", "0.1", "--target", "h:9", "--token-file", "t").target == "h:9"


def test_the_main_help_has_the_globals_and_the_exit_codes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help(monkeypatch, capsys)
    for text in ("--target", "--token-file", "--ca", "--timeout", "exit codes",
                 "0 ok", "2 usage", "13 permission denied"):  # fmt: skip
        assert text in out
    for command in ("state", "set", "scale", "swap", "cancel", "history", "change", "wait", "watch",
                    "health"):
        assert f"    {command} " in out


def test_the_change_flags_help_is_the_change_options_docs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # One description: each flagged `ChangeOptions` field's help, as the Python docs state it.
    out = " ".join(_help(monkeypatch, capsys, "scale").split())
    flagged = [f for f in dataclasses.fields(ChangeOptions) if "flag" in f.metadata]
    assert len(flagged) == 10
    for field in flagged:
        assert field.metadata["flag"] in out
        if field.name != "wait":  # --no-wait says what clearing it does
            assert field.metadata["help"] in out
        assert field.metadata["help"] in (ChangeOptions.__doc__ or "")
