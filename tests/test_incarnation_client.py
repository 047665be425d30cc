"""The clients and the CLI fence on the trainer process (`expected_incarnation`) and show the
state's newer fields: the incarnation, the boundary spacing, the clamp count, PHASE_STOPPED,
automatic reverts and a swap's scale. Real server, real TrainingControl, real clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import StringIO

import keras
import pytest
from live import LiveTrainer

from lrctl.client import FailedPrecondition, Scale, TrainingControlClient, aio, cli, pb, schedules
from lrctl.service import Phase, TrainingControl
from lrctl.service.control.changes import Boundaries
from lrctl.service.rpc.server import serve

LIMIT = 120.0  # seconds: a safety limit for a hung call, not a timing check
WRONG = "not-this-process"


@pytest.fixture(autouse=True)
def _no_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRCTL_TOKEN", raising=False)
    monkeypatch.delenv("LRCTL_TARGET", raising=False)


@pytest.fixture
def idle() -> Iterator[tuple[TrainingControl, str]]:
    """A real server over a control whose run has not started (SGD at 0.1, step 0): nothing
    applies unless the test calls `step_boundary()`."""
    control = TrainingControl(keras.optimizers.SGD(learning_rate=0.1))
    with serve(control.controller, "127.0.0.1:0") as (_, port):
        yield control, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def trainer() -> Iterator[LiveTrainer]:
    with LiveTrainer(learning_rate=0.01).running() as live:
        yield live


def lrctl(target: str, *argv: str) -> tuple[int, str]:
    """`lrctl --target TARGET ARGV...` in-process: (exit code, stdout)."""
    out = StringIO()
    code = cli.main(["--target", target, "--timeout", "60", *argv], out=out)
    return code, out.getvalue()


def _assert_incarnation_refused(error: FailedPrecondition, current: str) -> None:
    assert error.reason == "INCARNATION_MISMATCH"
    assert error.metadata["current_incarnation"] == current
    assert "expected_incarnation" in error.message


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_changes_and_cancels_are_fenced_on_the_incarnation(
        idle: tuple[TrainingControl, str], capsys: pytest.CaptureFixture[str]) -> None:
    control, target = idle
    incarnation = control.controller.snapshot().incarnation
    assert incarnation
    commands = (["set", "0.05"], ["scale", "0.5"],
                ["swap", "constant", "--learning-rate", "0.02"])
    for command in commands:
        capsys.readouterr()
        code, out = lrctl(target, *command, "--no-wait", "--expected-incarnation", WRONG)
        err = capsys.readouterr().err
        assert (code, out) == (cli.EXIT_FAILED_PRECONDITION, ""), command
        assert "expected_incarnation" in err and incarnation in err, err
    assert control.controller.snapshot().pending == ()  # nothing was queued

    request_ids = []
    for command in commands:
        code, out = lrctl(target, "--json", *command, "--no-wait",
                          "--expected-incarnation", incarnation)
        change = json.loads(out)
        assert code == 0 and change["status"] == "CHANGE_STATUS_PENDING", command
        request_ids.append(change["requestId"])
    assert len(control.controller.snapshot().pending) == 3

    capsys.readouterr()
    code, _ = lrctl(target, "cancel", request_ids[0], "--expected-incarnation", WRONG)
    assert code == cli.EXIT_FAILED_PRECONDITION
    assert "expected_incarnation" in capsys.readouterr().err
    code, out = lrctl(target, "cancel", request_ids[0], "--expected-incarnation", incarnation)
    assert code == 0 and out.startswith("cancelled")
    assert len(control.controller.snapshot().pending) == 2


def test_cli_state_shows_incarnation_boundaries_clamps_and_stopped(
        idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    incarnation = control.controller.snapshot().incarnation
    code, out = lrctl(target, "state")
    assert code == 0
    assert out.splitlines()[0] == f"run_id:    {control.controller.snapshot().run_id} " \
                                  f"(incarnation {incarnation})"
    # Every step is a boundary and nothing was clamped: neither line is printed.
    assert "boundaries:" not in out and "warning:" not in out

    # As the training thread does under steps_per_execution=4 (here from step 8), and as it
    # publishes an engine that clamped the LR 3 times.
    control.controller.set_boundaries(Boundaries(8, 4), epoch_start_step=8)
    control.controller.publish(step=8, learning_rate=0.1, lr_clamp_count=3)
    control.controller.set_phase(Phase.STOPPED)
    code, out = lrctl(target, "state")
    lines = out.splitlines()
    assert code == 0
    assert "boundaries: changes apply every 4 steps from step 8" in lines
    assert "phase:     STOPPED (pending changes resume after a restart)" in lines
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "clamped" in warning and "3 times" in warning
    code, out = lrctl(target, "--json", "state")
    state = json.loads(out)
    assert (state["incarnation"], state["boundarySpacing"], state["boundaryOriginStep"],
            state["lrClampCount"], state["phase"]) == (incarnation, 4, 8, 3, "PHASE_STOPPED")


def test_cli_history_shows_an_automatic_revert_and_a_swaps_scale(
        idle: tuple[TrainingControl, str]) -> None:
    control, target = idle
    before, _ = control.controller.engine_state
    assert lrctl(target, "swap", "--scale", "0.5", "--schedule-start-step", "3",
                 "exponential-decay", "--initial-learning-rate", "0.04", "--decay-steps", "10",
                 "--decay-rate", "0.5", "--no-wait")[0] == 0
    assert len(control.step_boundary()) == 1
    # The divergence guard's way to put the old schedule back, as the training thread does.
    control.controller.apply_automatic(before, step=0, reason="auto-revert: test")
    code, out = lrctl(target, "history")
    revert, swap = out.splitlines()
    assert code == 0
    assert revert == "applied v2 at step 0: revert to Constant(learning_rate=0.1) " \
                     "origin_step=0 scale=1 -> lr 0.1 (auto-revert: test)"
    assert swap.startswith("applied v1 at step 0: swap ExponentialDecay(")
    assert "origin=restart start_step=3 scale=0.5 -> lr " in swap
    code, out = lrctl(target, "--json", "history", "--limit", "1")
    assert json.loads(out)["revert"]["scale"] == 1.0

    # From a server that sends no description, the CLI describes both actions the same way.
    with TrainingControlClient(target, timeout=LIMIT) as client:
        changes = list(client.iter_changes())
    assert [c.WhichOneof("action") for c in changes] == ["revert", "swap_schedule"]
    for change, line in zip(changes, (revert, swap), strict=True):
        change.ClearField("description")
        assert cli.describe_change(change) == line.split("  [")[0]


# -- Python clients --------------------------------------------------------------------------------
def test_sync_client_is_fenced_on_the_incarnation(trainer: LiveTrainer) -> None:
    with TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        incarnation = client.get_state().incarnation
        version = client.get_state().version
        refused = [
            lambda: client.set_learning_rate(0.02, expected_incarnation=WRONG),
            lambda: client.scale_learning_rate(0.5, expected_incarnation=WRONG),
            lambda: client.swap_schedule(schedules.Constant(0.03), expected_incarnation=WRONG),
            lambda: client.update(lambda s: Scale(0.5), expected_incarnation=WRONG),
            lambda: client.update_learning_rate(lambda s: 0.001, expected_incarnation=WRONG),
        ]
        for call in refused:
            with pytest.raises(FailedPrecondition) as info:
                call()
            _assert_incarnation_refused(info.value, incarnation)
        assert client.get_state().version == version  # nothing changed

        change = client.set_learning_rate(0.02, wait=True, expected_incarnation=incarnation)
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert trainer.lr_at(change.applied_step) == pytest.approx(0.02, rel=1e-4)
        change = client.update_learning_rate(lambda s: s.learning_rate * 0.5,
                                             expected_incarnation=incarnation)
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert trainer.lr_at(change.applied_step) == pytest.approx(0.01, rel=1e-4)

        far = client.get_state().step + 10_000_000
        pending = client.scale_learning_rate(0.5, apply_at_step=far,
                                             expected_incarnation=incarnation)
        with pytest.raises(FailedPrecondition) as info:
            client.cancel_change(request_id=pending.request_id, expected_incarnation=WRONG)
        _assert_incarnation_refused(info.value, incarnation)
        cancelled = client.cancel_change(request_id=pending.request_id,
                                         expected_incarnation=incarnation)
        assert cancelled.status == pb.CHANGE_STATUS_CANCELLED


@pytest.mark.asyncio
async def test_async_client_is_fenced_on_the_incarnation(trainer: LiveTrainer) -> None:
    async with aio.TrainingControlClient(trainer.target, timeout=LIMIT) as client:
        state = await client.get_state()
        incarnation = state.incarnation
        with pytest.raises(FailedPrecondition) as info:
            await client.scale_learning_rate(0.5, expected_incarnation=WRONG)
        _assert_incarnation_refused(info.value, incarnation)
        with pytest.raises(FailedPrecondition) as info:
            await client.swap_schedule(schedules.Constant(0.03), expected_incarnation=WRONG)
        _assert_incarnation_refused(info.value, incarnation)
        with pytest.raises(FailedPrecondition) as info:
            await client.update_learning_rate(lambda s: 0.001, expected_incarnation=WRONG)
        _assert_incarnation_refused(info.value, incarnation)
        assert (await client.get_state()).version == state.version

        change = await client.swap_schedule(schedules.Constant(0.03), wait=True,
                                            expected_incarnation=incarnation)
        assert change.status == pb.CHANGE_STATUS_APPLIED
        assert trainer.lr_at(change.applied_step) == pytest.approx(0.03, rel=1e-4)
        change = await client.update(lambda s: Scale(0.5), expected_incarnation=incarnation)
        assert change is not None and change.status == pb.CHANGE_STATUS_APPLIED
        assert trainer.lr_at(change.applied_step) == pytest.approx(0.015, rel=1e-4)

        far = (await client.get_state()).step + 10_000_000
        pending = await client.set_learning_rate(0.5, apply_at_step=far,
                                                 expected_incarnation=incarnation)
        with pytest.raises(FailedPrecondition) as info:
            await client.cancel_change(request_id=pending.request_id, expected_incarnation=WRONG)
        _assert_incarnation_refused(info.value, incarnation)
        cancelled = await client.cancel_change(request_id=pending.request_id,
                                               expected_incarnation=incarnation)
        assert cancelled.status == pb.CHANGE_STATUS_CANCELLED
