"""Checkpoints of a controlled run: the model's weights, the optimizer (lrctl's schedule
variables, hence the schedule, scale and version, are among its variables) and the
controller's state (history, pending changes, the request ids of the dedup window).

A checkpoint at step N is three files in one folder, each written to a temporary name,
fsynced and renamed into place, the pointer last:

    ckpt-N.weights.h5     model.save_weights (the optimizer's state included)
    ckpt-N.control.json   Controller.export_state()
    latest.json           {"step": N, "weights": ..., "control": ...}

A kill at any moment leaves `latest.json` naming the newest complete pair, never a torn one.
The two newest checkpoints are kept.

With `model.fit`:

    control = TrainingControl(model.optimizer)
    checkpoints = Checkpointer(control, model, "ckpts", every=500)
    checkpoints.restore()            # resumes if "ckpts" holds a checkpoint
    model.fit(..., callbacks=[control.callback, checkpoints.callback])

Not restored: the input pipeline's position (a dataset starts over). The epochs completed are
`control.controller.epochs_done`: pass them to `fit` as `initial_epoch` (lrctl-trainer does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import keras

from lrctl.service.integration import TrainingControl

logger = logging.getLogger("lrctl.checkpoint")

LATEST = "latest.json"
KEEP = 2
_NAME = re.compile(r"^ckpt-(\d+)\.(weights\.h5|control\.json)$")


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, data: Any) -> None:
    """Write `data` as JSON to `path` atomically: a temporary file, fsync, rename, fsync the
    folder. A reader sees the old file or the new one, never part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(folder)


def latest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The newest complete checkpoint's pointer in `directory`, or None if it holds none."""
    try:
        with open(os.path.join(directory, LATEST), encoding="utf-8") as f:
            pointer: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return None
    return pointer


class Checkpointer:
    """Saves and restores checkpoints of `model` and `control` in `directory`. Training thread
    only: `save` at a step boundary (the callback does that every `every` steps)."""

    def __init__(self, control: TrainingControl, model: keras.Model,
                 directory: str | os.PathLike[str], every: int | None = None) -> None:
        if every is not None and every <= 0:
            raise ValueError(f"the checkpoint interval must be > 0 steps; got {every}")
        self.control = control
        self.model = model
        self.directory = os.fspath(directory)
        self.every = every
        self.last_step: int | None = None
        os.makedirs(self.directory, exist_ok=True)
        self.callback = _CheckpointCallback(self)

    def save(self) -> int:
        """Write a checkpoint of the current step (a step boundary); returns the step."""
        step = self.control.step
        started = time.monotonic()
        name = f"ckpt-{step}"
        weights = f"{name}.weights.h5"
        tmp = os.path.join(self.directory, f".tmp-{os.getpid()}-{weights}")
        self.model.save_weights(tmp)
        _fsync_path(tmp)
        os.replace(tmp, os.path.join(self.directory, weights))
        control = f"{name}.control.json"
        write_json(os.path.join(self.directory, control), self.control.controller.export_state(step))
        snap = self.control.controller.snapshot()
        write_json(os.path.join(self.directory, LATEST), {
            "step": step, "weights": weights, "control": control, "run_id": snap.run_id,
            "version": snap.version, "time": time.time()})
        self.last_step = step
        self._prune(step)
        logger.info("checkpoint at step %d (version %d) in %s, %.2f s", step, snap.version,
                    self.directory, time.monotonic() - started)
        return step

    def restore(self) -> Mapping[str, Any] | None:
        """Resume from the newest checkpoint, if any: weights, optimizer (step, slots, lrctl's
        schedule and version) and the controller's state. Call after TrainingControl is
        created and before training. Returns the control state restored, or None."""
        pointer = latest(self.directory)
        if pointer is None:
            return None
        optimizer = self.model.optimizer
        if not optimizer.built:  # Keras's load_weights skips an unbuilt optimizer's state
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.directory, pointer["weights"]))
        with open(os.path.join(self.directory, pointer["control"]), encoding="utf-8") as f:
            state: dict[str, Any] = json.load(f)
        self.control.controller.import_state(state)
        self.control.resync()  # the engine and the JSON come from one boundary: a no-op
        self.control.publish(force=True)
        self.last_step = int(pointer["step"])
        logger.info("resumed from the checkpoint at step %d (run %s, version %d) in %s",
                    self.last_step, state.get("run_id"), state["version"], self.directory)
        return state

    def _prune(self, newest: int) -> None:
        steps = sorted({int(m.group(1)) for name in os.listdir(self.directory)
                        if (m := _NAME.match(name))}, reverse=True)
        keep = {*steps[:KEEP], newest}
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            stale = name.startswith(".tmp-")  # a write a kill interrupted (ours are done)
            if (m and int(m.group(1)) not in keep) or stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))


class _CheckpointCallback(keras.callbacks.Callback):
    """Saves every `every` steps at a step boundary (batch begin, on the training thread). The
    step is read only when the count of batches says a checkpoint may be due."""

    async_safe = True

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self._checkpointer = checkpointer
        self._bound = 0  # at most this many steps have completed
        self._next = 0
        self._per_batch: int | None = 1

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        spe = getattr(self.model, "steps_per_execution", 1)
        self._per_batch = spe if isinstance(spe, int) and spe > 0 else None
        self._bound = self._checkpointer.control.step
        self._next = self._after(self._bound)

    def _after(self, step: int) -> int:
        every = self._checkpointer.every
        return step // every * every + every if every else 2**62

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._per_batch is None or self._bound >= self._next:
            step = self._bound = self._checkpointer.control.step
            if step >= self._next:
                self._checkpointer.save()
                self._next = self._after(step)
        self._bound += self._per_batch or 0


__all__ = ["KEEP", "LATEST", "Checkpointer", "latest", "write_json"]
