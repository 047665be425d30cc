"""Live PBT's exploit against real trainer processes (examples/pbt_trainer.py): the worse
member takes the better member's checkpoint and new hyperparameters through lrctl, in the
same process (same incarnation), and trains on from there. Plus the PBT rule itself."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from lrctl.client import TrainingControlClient, pb

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INTERVAL = 5  # steps per round: few, the point is the exploit, not the learning


def _pbt_live() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lrctl_example_pbt_live", EXAMPLES / "pbt_live.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pbt_live = _pbt_live()


def test_plan_round_copies_the_top_into_the_bottom_with_perturbed_hyperparameters() -> None:
    configs = [pbt_live.Hyper(0.1 * (i + 1), 0.9) for i in range(4)]
    plan = pbt_live.plan_round(random.Random(0), [0.5, 0.2, math.nan, 0.3], configs, 0.25)
    assert [(e.loser, e.donor) for e in plan] == [(2, 1)]  # NaN ranks last; the best donates
    new = plan[0].config
    assert new.learning_rate / configs[1].learning_rate in (pytest.approx(0.8), pytest.approx(1.2))
    assert new.momentum in (pytest.approx(0.72), pytest.approx(0.99))  # 0.9 * 1.2 is capped at 0.99
    assert plan == pbt_live.plan_round(random.Random(0), [0.5, 0.2, math.nan, 0.3], configs, 0.25)
    # At most half the population is exploited, at least one member.
    assert len(pbt_live.plan_round(random.Random(0), [1.0, 2.0], configs[:2], 0.9)) == 1


@pytest.fixture
def pair(tmp_path: Path, subprocess_env: dict[str, str]) -> Iterator[list[object]]:
    """Two members, serving and waiting on stdin, with the first round's pause queued."""
    configs = [pbt_live.Hyper(0.05, 0.9), pbt_live.Hyper(0.002, 0.6)]
    members = [pbt_live.Member(i, c, steps=2 * INTERVAL, interval=INTERVAL, root=tmp_path,
                               wait_for_stdin=True, env=subprocess_env) for i, c in enumerate(configs)]
    try:
        yield members
    finally:
        for member in members:
            member.kill()


def _weights(path: str) -> dict[str, object]:
    """The model's layer weights in a Keras weights file, by name (not the optimizer's)."""
    import h5py
    import numpy as np

    found: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def keep(name: str, item: object) -> None:
            if isinstance(item, h5py.Dataset):
                found[name] = np.array(item)
        f["layers"].visititems(keep)
    return found


def test_live_exploit_moves_the_worse_member_to_the_better_ones_checkpoint_without_restart(
    pair: list[pbt_live.Member],
) -> None:
    for member in pair:
        member.wait_for("ready")
    clients = [TrainingControlClient(m.target, timeout=pbt_live.LIMIT) for m in pair]
    try:
        pauses = [c.pause_training(apply_at_step=INTERVAL) for c in clients]
        for member in pair:
            member.go()
        for client, pause in zip(clients, pauses, strict=True):
            assert client.wait_change(pause.name, timeout=pbt_live.LIMIT).status == pb.CHANGE_STATUS_APPLIED
        losses = [pbt_live._ranked_loss(c, INTERVAL) for c in clients]
        better, worse = sorted(range(2), key=losses.__getitem__)
        before = clients[worse].get_state()
        assert before.phase == pb.PHASE_PAUSED

        saved = clients[better].save_checkpoint(wait=True)
        assert saved.status == pb.CHANGE_STATUS_APPLIED and saved.checkpoint_step == INTERVAL
        loaded = clients[worse].load_checkpoint(saved.checkpoint_path, wait=True,
                                                reason="exploit")
        assert loaded.status == pb.CHANGE_STATUS_APPLIED
        assert (loaded.checkpoint_step, loaded.checkpoint_run_id) == (INTERVAL, f"member-{better}")
        clients[worse].set_learning_rate(0.03, wait=True, reason="explore")
        clients[worse].set_optimizer_parameters({"momentum": 0.75}, wait=True,
                                                reason="explore")
        # The worse member now holds the better one's weights: its next checkpoint says so.
        copy = clients[worse].save_checkpoint(wait=True)
        assert copy.checkpoint_step == INTERVAL  # the load kept this run's step
        theirs, mine = _weights(saved.checkpoint_path), _weights(copy.checkpoint_path)
        assert theirs.keys() == mine.keys() and theirs
        for name, value in theirs.items():
            np.testing.assert_array_equal(mine[name], value, err_msg=name)

        after = clients[worse].get_state()
        assert after.incarnation == before.incarnation  # the same process: no restart
        assert after.learning_rate == pytest.approx(0.03)
        momentum = {h.name: h.value for h in after.hyperparameters}["momentum"]
        assert momentum == pytest.approx(0.75, rel=1e-6)
        for client in clients:
            client.resume_training(wait=True)
        for member in pair:
            member.finish()
        assert math.isfinite(pair[worse].loss_at(2 * INTERVAL))
        assert [e["event"] for e in pair[worse].events].count("ready") == 1  # started once
    finally:
        for client in clients:
            client.close()
