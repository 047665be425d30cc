"""TensorBoard (`--tensorboard-dir`): the LR scalar and the applied changes, read back from
the event files with tf.compat.v1.train.summary_iterator."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tiny

from lrctl.service import TrainingControl
from lrctl.service.control.changes import ChangeRequest, PinLearningRate
from lrctl.service.observability.tensorboard import CHANGES_TAG, LR_TAG, TensorBoardLogger


def _events(logdir: Path) -> dict[str, list[tuple[int, object, str]]]:
    """tag -> [(step, value, plugin name)] from every event file under `logdir`."""
    out: dict[str, list[tuple[int, object, str]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                item = array.item()
                out.setdefault(value.tag, []).append(
                    (event.step, item.decode() if isinstance(item, bytes) else item,
                     value.metadata.plugin_data.plugin_name))
    return out


def _fit(logdir: Path, every: int, steps: int = 10) -> tuple[TrainingControl, TensorBoardLogger]:
    keras.utils.set_random_seed(0)
    model = tiny.make_model(0.1)
    control = TrainingControl(model.optimizer)
    control.controller.submit(ChangeRequest(PinLearningRate(0.05), apply_at_step=5,
                                            reason="plateau at 0.3"))
    board = TensorBoardLogger(control, str(logdir), every=every)
    x, y = tiny.data(steps)
    model.fit(x, y, batch_size=tiny.BATCH, epochs=1, verbose=0, shuffle=False,
              callbacks=[control.callback, board])
    board.close()
    return control, board


def test_lr_scalar_every_step_and_the_change_at_its_step(tmp_path: Path) -> None:
    control, _ = _fit(tmp_path, every=1)
    assert control.controller.snapshot().version == 1
    events = _events(tmp_path)

    scalars = {step: value for step, value, plugin in events[LR_TAG]}
    assert {plugin for *_, plugin in events[LR_TAG]} == {"scalars"}
    assert sorted(scalars) == list(range(10))
    np.testing.assert_allclose([scalars[s] for s in range(10)],
                               [0.1] * 5 + [0.05] * 5, rtol=1e-6)

    (change,) = events[CHANGES_TAG]
    step, text, plugin = change
    assert (step, plugin) == (5, "text")
    assert "v1 at step 5" in text and "0.05" in text and "plateau at 0.3" in text


def test_lr_scalar_every_n_steps(tmp_path: Path) -> None:
    _fit(tmp_path, every=3)
    events = _events(tmp_path)
    assert sorted(step for step, *_ in events[LR_TAG]) == [0, 3, 6, 9]
    assert [step for step, *_ in events[CHANGES_TAG]] == [5]


def test_every_must_be_positive(tmp_path: Path) -> None:
    model = tiny.make_model(0.1)
    with pytest.raises(ValueError, match="every"):
        TensorBoardLogger(TrainingControl(model.optimizer), str(tmp_path), every=0)
