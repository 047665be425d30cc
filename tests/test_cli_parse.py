"""`lrctl` argument parsing and request mapping (no server needed)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from lrctl.client import cli, schedules
from lrctl.v1 import training_control_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> object:
    return cli.build_parser().parse_args(list(argv))


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
    _, _, kwargs = cli.build_change_call(args)
    assert kwargs == {
        "apply_at_step": 500,
        "expected_version": 3,
        "wait": False,  # --at-step implies --no-wait
        "validate_only": False,
        "reason": "cooldown",
        "origin": "global",
    }


def test_set_and_scale() -> None:
    method, call_args, kwargs = cli.build_change_call(parse("set", "0.01"))
    assert (method, call_args) == ("set_learning_rate", (0.01,))
    assert kwargs == {
        "apply_at_step": None,
        "expected_version": None,
        "wait": True,
        "validate_only": False,
        "reason": "",
    }
    method, call_args, kwargs = cli.build_change_call(parse("scale", "0.5", "--no-wait"))
    assert (method, call_args, kwargs["wait"]) == ("scale_learning_rate", (0.5,), False)
    _, _, kwargs = cli.build_change_call(parse("scale", "0.5", "--dry-run"))
    assert kwargs["validate_only"] is True
    assert kwargs["wait"] is False


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
    assert parse("state").target == "trainer:9000"


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
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    for text in ("3 invalid argument", "4 version conflict", "7 unavailable", "8 not serving"):
        assert text in out
    assert cli.__doc__ is not None
    assert "7  unavailable" in cli.__doc__


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


def test_unreachable_server_exits_7(subprocess_env: dict[str, str]) -> None:
    # Nothing listens on port 1. The deadline is short, so it may pass while gRPC
    # is still retrying UNAVAILABLE; that must still be reported as unreachable.
    for timeout in ("0.3", "5"):
        result = subprocess.run(
            [sys.executable, "-m", "lrctl.client.cli", "--target", "127.0.0.1:1",
             "--timeout", timeout, "state"],
            cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 7, result.stderr
        assert result.stderr.startswith("lrctl: error: server unavailable"), result.stderr
        assert result.stderr.count("lrctl: error:") == 1, result.stderr  # reported once
        assert "127.0.0.1:1" in result.stderr
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


def test_bad_target_from_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LRCTL_TARGET", "trainer-0")
    with pytest.raises(SystemExit):
        parse("state")
    assert "$LRCTL_TARGET" in capsys.readouterr().err
    assert parse("--target", "trainer-0:50051", "state").target == "trainer-0:50051"


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
                "validate_only": True, "reason": "r", "origin": "global"}  # fmt: skip
    assert cli.build_change_call(before)[2] == expected
    assert cli.build_change_call(after)[2] == expected
    # Left out everywhere, each flag keeps its default.
    _, _, kwargs = cli.build_change_call(parse("swap", "constant", "--learning-rate", "0.1"))
    assert kwargs == {"apply_at_step": None, "expected_version": None, "wait": True,
                      "validate_only": False, "reason": "", "origin": "restart"}  # fmt: skip
