"""The shortcuts of issue 20 on the submit and boundary paths give what the long ways gave:
the snapshot's copy-and-replace, and the exact extremes computed with fewer numpy calls.
TF-free (conftest.QUICK)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from fakes import MemoryTarget

from lrctl.service.control import broadcast
from lrctl.service.control.changes import Phase
from lrctl.service.control.controller import Controller
from lrctl.service.schedules import forms, kinds
from lrctl.service.schedules.specs import ActiveSchedule, Origin


def test_the_snapshot_replace_matches_dataclasses_replace() -> None:
    controller = Controller(MemoryTarget(ActiveSchedule(kinds.Constant(0.001))))
    snap = controller.snapshot()
    changes = {"step": 7, "phase": Phase.TRAINING, "learning_rate": 0.5, "seq": snap.seq + 1}
    fast = broadcast._replaced(snap, changes)
    assert fast == dataclasses.replace(snap, **changes)
    assert type(fast) is type(snap) and fast is not snap and snap.step == 0
    with pytest.raises(TypeError, match="no_such_field"):
        broadcast._replaced(snap, {"no_such_field": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.step = 8  # type: ignore[misc]


SPECS = [
    kinds.Constant(0.001), kinds.CosineDecay(0.1, 100, 0.01, 0.5, 10), kinds.CosineDecay(0.1, 50),
    kinds.ExponentialDecay(0.1, 10, 0.96, staircase=True), kinds.ExponentialDecay(0.1, 10, 1.5),
    kinds.PiecewiseConstantDecay((10, 20, 30), (0.1, 0.5, 0.01, 0.2)),
    kinds.PolynomialDecay(0.1, 40, 0.001, 2.0, cycle=True), kinds.InverseTimeDecay(0.1, 10, 0.5, staircase=True),
    kinds.CosineDecayRestarts(0.1, 7, 2.0, 0.5, 0.01), kinds.PiecewiseLinear(((0, 0.0), (30, 0.1), (90, 0.001))),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_extremes_are_those_of_every_step(spec: object) -> None:
    """Over every step of the range, computed one step at a time: the same smallest and
    largest learning rate, each at a step that gives it, or the same non-finite one."""
    rng = random.Random(20)
    for _ in range(20):
        state = ActiveSchedule(spec, rng.choice(list(Origin)), rng.randint(-20, 200),  # type: ignore[arg-type]
                               rng.choice([1.0, 0.5, 1e38]))
        start = rng.randint(0, 300)
        end = start + rng.choice([0, 1, 7, 150, 400])
        found = forms.extremes(state, start, end)
        every = forms.learning_rates(state, np.arange(start, end + 1))
        if not np.isfinite(every).all():
            assert not np.isfinite(found.max_lr) and found.min_step == found.max_step
            continue
        assert (found.min_lr, found.max_lr) == (float(every.min()), float(every.max()))
        assert start <= found.min_step <= end and start <= found.max_step <= end
        assert forms.learning_rate(state, found.min_step) == found.min_lr
        assert forms.learning_rate(state, found.max_step) == found.max_lr
