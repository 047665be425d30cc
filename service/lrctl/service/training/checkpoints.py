"""Checkpoints of a controlled run: the model's weights, the optimizer (lrctl's schedule
variables, hence the schedule, scale and version, are among its variables) and the
controller's state (history, pending changes, the request ids of the dedup window).

A checkpoint at step N is two files in one folder, named by a pointer (`checkpoint_files`).
Both files are written to temporary names and fsynced, then renamed into place, the pointer
last: a kill at any moment leaves `latest.json` naming a complete pair, never a torn one.

Recovery never starts over silently. `restore` resumes from the checkpoint the pointer names;
if the pointer is missing, unreadable or not a pointer, or the checkpoint it names is damaged,
it falls back to the newest checkpoint that validates (with a warning naming the file and the
fault). If the folder holds checkpoint files and none can be resumed from, it raises
CheckpointError; `restore(fresh=True)` starts a new lineage there instead.

A failed write (a full or read-only disk, an I/O error) never ends the run: it is logged,
counted (`Controller.checkpointed`, hence GetState and the metrics), its files are removed,
the pointer still names the last complete checkpoint, and the next interval tries again.

Pruning keeps the newest `keep` complete checkpoints of this run's lineage (a resumed run
continues its checkpoint's lineage; a fresh one starts its own), and the one it resumed from.
Other lineages' checkpoints and stray files are left alone.

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
import errno
import itertools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from lrctl.service.control import wal
from lrctl.service.control.disk import CheckpointError, free_bytes, fsync_path, remove, write_bytes
from lrctl.service.training.checkpoint_files import (
    LATEST,
    TMP,
    Found,
    one_line,
    read_pointer,
    scan,
    write_json,
)
from lrctl.service.training.integration import TrainingControl
from lrctl.service.training.step_clock import Periodic

logger = logging.getLogger("lrctl.checkpoint")

KEEP = 2
#: Headroom on top of a checkpoint's expected size before a write is attempted: h5py crashes
#: the process (SIGSEGV) when the disk fills under it, so a write that may not fit is refused.
_SPARE_BYTES = 2**20


class Checkpointer:
    """Saves and restores checkpoints of `model` and `control` in `directory`. Training thread
    only: `save` at a step boundary (the callback does that every `every` steps). `keep`: how
    many of this lineage's newest checkpoints pruning keeps (at least 1)."""

    def __init__(self, control: TrainingControl, model: keras.Model,
                 directory: str | os.PathLike[str], every: int | None = None, *,
                 keep: int = KEEP) -> None:
        if every is not None and every <= 0:
            raise ValueError(f"the checkpoint interval must be > 0 steps; got {every}")
        if keep < 1:
            raise ValueError(f"Argument `keep` must be >= 1. Received: keep={keep}")
        self.control = control
        self.model = model
        self.directory = os.fspath(directory)
        self.every = every
        self.keep = keep
        self.last_step: int | None = None
        #: This run's lineage: its checkpoint's when resumed, else a new one.
        self.lineage = uuid.uuid4().hex[:12]
        self.failures = 0  #: checkpoint writes that failed in this process
        # This lineage's complete checkpoints by stem, valued by recency (higher: newer).
        self._ours: dict[str, int] = {}
        self._recency = itertools.count()
        self._resumed_from: str | None = None  # the stem recovery used: never pruned
        self._pointed: tuple[str, str] | None = None  # the files the pointer names
        self._weights_size: int | None = None  # the last weights file written (bytes)
        self._wal_seqs: dict[str, int] = {}  # this lineage's checkpoints: the last record each includes
        self._compacted = 0  # the log holds none of this lineage's records at or below this seq
        #: Changes put back from the write-ahead log by `restore`.
        self.replayed = 0
        os.makedirs(self.directory, exist_ok=True)
        #: The write-ahead log beside the checkpoints: every change's acceptance and ending is
        #: fsynced there before it is answered, and `restore` replays what a checkpoint lacks.
        self.wal = wal.WriteAheadLog(os.path.join(self.directory, wal.WAL_NAME), lineage=self.lineage)
        control.controller.wal = self.wal
        control.checkpointer = self  # SaveCheckpoint and StopTraining write with it
        self.callback = _CheckpointCallback(self)

    # -- saving ---------------------------------------------------------------------------
    def save(self) -> int | None:
        """Write a checkpoint of the current step (a step boundary); returns the step, or None
        if the disk refused (logged, counted, and nothing partial is left or pointed to)."""
        step = self.control.step
        started = time.monotonic()
        stem = f"ckpt-{step}"
        weights, control = f"{stem}.weights.h5", f"{stem}.control.json"
        tmp_weights, tmp_control = (os.path.join(self.directory, f"{TMP}{os.getpid()}-{name}")
                                    for name in (weights, control))
        controller = self.control.controller
        exported = controller.export_state(step)
        data = json.dumps({**exported, "lineage": self.lineage, "saved_time": time.time()},
                          allow_nan=True).encode()
        renamed: list[str] = []
        try:
            self._check_space(len(data))
            self.model.save_weights(tmp_weights)
            fsync_path(tmp_weights)
            size = os.path.getsize(tmp_weights)
            write_bytes(tmp_control, data)
            for tmp, name in ((tmp_weights, weights), (tmp_control, control)):
                os.replace(tmp, os.path.join(self.directory, name))
                renamed.append(name)
            fsync_path(self.directory)
            snap = controller.snapshot()
            write_json(os.path.join(self.directory, LATEST), {
                "step": step, "weights": weights, "control": control, "run_id": snap.run_id,
                "version": snap.version, "lineage": self.lineage, "time": time.time()})
        except Exception as e:  # noqa: BLE001 -- a disk error or h5py's own: never ends the run
            remove(tmp_weights, tmp_control, *(os.path.join(self.directory, name) for name in renamed
                                                if name not in (self._pointed or ())))
            self.failures += 1
            error = f"{type(e).__name__}: {one_line(e)}"
            controller.checkpointed(None, error)
            logger.error("checkpoint at step %d in %s failed (%d failure(s) so far): %s; the "
                         "newest checkpoint is still %s; trying again at the next interval",
                         step, self.directory, self.failures, error,
                         self._pointed[0] if self._pointed else "none")
            return None
        self._pointed = (weights, control)
        self._weights_size = size
        self.last_step = step
        controller.checkpointed(step)
        self._ours.pop(stem, None)
        self._ours[stem] = next(self._recency)
        self._wal_seqs[stem] = int(exported["wal_seq"])
        self._prune()
        self._compact()
        logger.info("checkpoint at step %d (version %d) in %s, %.2f s", step, snap.version,
                    self.directory, time.monotonic() - started)
        return step

    def _check_space(self, control_bytes: int) -> None:
        """Raise ENOSPC before a write that may not fit: the last weights file's size (or the
        variables' bytes before the first) with a quarter more and a margin."""
        expected = self._weights_size
        if expected is None:
            variables = [*self.model.weights, *self.model.optimizer.variables]
            expected = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
        needed = expected + expected // 4 + control_bytes + _SPARE_BYTES
        free = free_bytes(self.directory)
        if free < needed:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free, "
                          f"a checkpoint needs about {needed / 2**20:.1f} MiB)", self.directory)

    def _prune(self) -> None:
        """Keep this lineage's `keep` newest checkpoints and the one recovery used; remove
        what a killed write left behind. Nothing else in the folder is touched."""
        newest_first = sorted(self._ours, key=self._ours.__getitem__, reverse=True)
        for stem in newest_first[self.keep:]:
            if stem == self._resumed_from:
                continue
            try:
                for suffix in (".weights.h5", ".control.json"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.directory, stem + suffix))
            except OSError as e:
                logger.warning("cannot prune %s in %s: %s", stem, self.directory, e)
                continue
            del self._ours[stem]
        mine = f"{TMP}{os.getpid()}-"
        for name in os.listdir(self.directory):
            # Another process's temporary file: a write a kill interrupted (ours are done).
            if name.startswith(TMP) and not name.startswith(mine):
                remove(os.path.join(self.directory, name))

    def _compact(self) -> None:
        """Drop the log's records that every checkpoint recovery may use already includes:
        this lineage's, at or below the oldest kept checkpoint's seq. Other lineages' records
        are left alone, like their checkpoints."""
        floor = min((self._wal_seqs.get(stem, 0) for stem in self._ours), default=0)
        if floor <= self._compacted:
            return
        try:
            dropped = self.wal.compact(lambda r: r.get("lineage", "") != self.lineage or int(r["seq"]) > floor)
        except OSError as e:  # the log only grows: the next checkpoint tries again
            logger.warning("cannot compact the write-ahead log %s: %s", self.wal.path, e)
            return
        self._compacted = floor
        if dropped:
            logger.debug("dropped %d write-ahead log record(s) at or below seq %d", dropped, floor)

    def close(self) -> None:
        """Close the write-ahead log (the controller then writes to a closed file: call last)."""
        self.wal.close()

    def _replay(self, state: Mapping[str, Any] | None) -> None:
        """Replay this lineage's log records that `state` (a checkpoint's control state; None:
        no checkpoint yet) does not include."""
        self.wal.lineage = self.lineage
        self.wal.advance(max([int((state or {}).get("wal_seq", 0)), *self._wal_seqs.values()]))
        records = wal.after(self.wal.records, int((state or {}).get("wal_seq", 0)), self.lineage)
        try:
            self.replayed = self.control.controller.replay(records)
        except (KeyError, TypeError, ValueError) as e:  # a record lrctl did not write
            raise CheckpointError(f"{self.wal.path} holds a record that cannot be replayed "
                                  f"({type(e).__name__}: {one_line(e)[:160]})") from None
        if records:
            logger.info("replayed %d write-ahead log record(s) after %s: %d change(s) put back",
                        len(records), "the checkpoint" if state is not None else "no checkpoint",
                        self.replayed)

    # -- restoring ------------------------------------------------------------------------
    def restore(self, *, fresh: bool = False) -> Mapping[str, Any] | None:
        """Resume from the newest valid checkpoint: weights, optimizer (step, slots, lrctl's
        schedule and version) and the controller's state. Call after TrainingControl is
        created and before training. Returns the control state restored, or None for a fresh
        start: an empty folder, or `fresh=True` (a new lineage; the checkpoints already there
        are left alone, never pruned by this run).

        Raises CheckpointError if the folder holds a pointer or checkpoint files and none can
        be resumed from. A damaged or missing pointer, or a damaged newest checkpoint, falls
        back to the newest checkpoint that validates and loads, with a warning."""
        pointer, pointer_problem = read_pointer(self.directory)
        found, strays = scan(self.directory)
        if strays:
            logger.warning("ignoring files in %s that are not complete checkpoints: %s",
                           self.directory, ", ".join(sorted(strays)))
        if fresh:
            if found or pointer is not None or pointer_problem:
                logger.warning("starting a new run (lineage %s) in %s, which holds %d checkpoint(s) "
                               "of earlier runs: they are left alone", self.lineage, self.directory,
                               len(found))
            return None
        if not found and pointer is None and not pointer_problem:
            # A first start, or a run killed before its first checkpoint: its log holds what
            # it acknowledged, replayed from step 0 (training starts over from there too).
            if self.wal.records:
                self.lineage = str(self.wal.records[-1].get("lineage", "")) or self.lineage
                self._replay(None)
            return None
        newest_first = sorted(found.values(), key=lambda c: (c.saved, c.step), reverse=True)
        problems = [pointer_problem or f"{LATEST} is missing"] if pointer is None else []
        if pointer is not None:
            stem = pointer["weights"].removesuffix(".weights.h5")
            named = found.get(stem)
            if named is None or pointer["control"] != f"{stem}.control.json":
                problems.append(f"{LATEST} names {pointer['weights']} and {pointer['control']}, "
                                "which are not a complete checkpoint")
            else:
                newest_first = [named, *(c for c in newest_first if c is not named)]
        for candidate in newest_first:
            if candidate.problem:
                problems.append(candidate.problem)
                continue
            try:
                state = self._load(candidate)
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{candidate.stem}.weights.h5 cannot be loaded into this model "
                                f"({one_line(e)[:160]})")
                continue
            if problems:
                logger.warning("in %s: %s; resuming from %s (step %d) instead", self.directory,
                               "; ".join(problems), candidate.stem, candidate.step)
            # The lineage goes on: its valid checkpoints are this run's to prune, oldest first.
            # Checkpoints from before lineages existed ("") form one lineage of their own.
            self.lineage = candidate.lineage or self.lineage
            for c in reversed(newest_first):
                if not c.problem and c.lineage == candidate.lineage:
                    self._ours[c.stem] = next(self._recency)
                    self._wal_seqs[c.stem] = int((c.state or {}).get("wal_seq", 0))
            self._replay(state)
            return state
        files = ", ".join(sorted([*(f"{c}.*" for c in found), *strays,
                                  *([LATEST] if pointer is not None or pointer_problem else [])]))
        raise CheckpointError(f"no checkpoint in {self.directory} can be resumed from ({files}): "
                              + "; ".join(problems or ["none is complete"]))

    def _load(self, candidate: Found) -> dict[str, Any]:
        assert candidate.state is not None
        optimizer = self.model.optimizer
        if not optimizer.built:  # Keras's load_weights skips an unbuilt optimizer's state
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.directory, f"{candidate.stem}.weights.h5"))
        state = candidate.state
        self.control.controller.import_state(state)
        self.control.resync()  # the engine and the JSON come from one boundary: a no-op
        self.control.publish(force=True)
        self.last_step = candidate.step
        self.control.controller.checkpointed(candidate.step)
        self._resumed_from = candidate.stem
        self._pointed = (f"{candidate.stem}.weights.h5", f"{candidate.stem}.control.json")
        logger.info("resumed from the checkpoint at step %d (run %s, version %d) in %s",
                    candidate.step, state.get("run_id"), state["version"], self.directory)
        return state


class _CheckpointCallback(keras.callbacks.Callback):
    """Saves every `every` steps at a step boundary (batch begin, on the training thread).
    TrainingControl's step clock says when one may be due; the step is read only then."""

    async_safe = True

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__()
        self._checkpointer = checkpointer
        self._due: Periodic | None = None

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._due = Periodic(self._checkpointer.control.clock, self._checkpointer.every)

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._due is not None and self._due.due() is not None:
            self._checkpointer.save()  # a failure is retried at the next interval


__all__ = ["KEEP", "CheckpointError", "Checkpointer"]
