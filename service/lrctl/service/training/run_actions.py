"""The training layer's side of the run actions (`control.targets.RunTarget`): writing a
checkpoint through the run's Checkpointer, loading another one's weights and optimizer state
(`exploit`), and ending the run for good. Training thread, at a step boundary,
no controller lock held; the controller decides each change's record from what these return
or raise (`control.run_control`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lrctl.service.control import checkpoint_paths, persistence
from lrctl.service.control.changes import LoadCheckpoint
from lrctl.service.control.targets import RunResult
from lrctl.service.errors import ApplyError, FailedPreconditionError
from lrctl.service.training import exploit

if TYPE_CHECKING:
    from lrctl.service.training.integration import TrainingControl

logger = logging.getLogger("lrctl")


class RunActions:
    """`RunTarget` for one TrainingControl: what it can do follows what it was given (a
    Checkpointer: save; a checkpoint root: load)."""

    def __init__(self, control: TrainingControl) -> None:
        self._control = control

    @property
    def checkpoint_dir(self) -> str | None:
        checkpointer = self._control.checkpointer
        return None if checkpointer is None else checkpointer.directory

    @property
    def checkpoint_root(self) -> Path | None:
        return self._control.checkpoint_root

    @property
    def multi_worker(self) -> bool:
        return self._control.workers is not None

    def save_checkpoint(self, step: int) -> RunResult:
        """A checkpoint now, as --checkpoint-every writes them (same files, same rotation)."""
        checkpointer = self._control.checkpointer
        if checkpointer is None:
            raise FailedPreconditionError("the trainer has no checkpoint folder (--checkpoint-dir)")
        saved = checkpointer.save()
        if saved is None:  # logged and counted by the Checkpointer; training goes on
            error = self._control.controller.snapshot().checkpoint_error
            raise ApplyError(f"the checkpoint at step {step} could not be written ({error}); "
                             "training goes on")
        weights = os.path.abspath(os.path.join(checkpointer.directory, f"ckpt-{saved}.weights.h5"))
        return RunResult(checkpoint_path=weights, checkpoint_step=saved)

    def load_checkpoint(self, action: LoadCheckpoint, step: int) -> RunResult:
        """The weights and optimizer state of the checkpoint `action` names, this run's step
        kept; with `load_hyperparameters`, its schedule becomes the change's new state."""
        control = self._control
        weights = checkpoint_paths.resolve(action.path, control.checkpoint_root)
        model = control.model_for_load()
        loaded = exploit.load_checkpoint(model, control.optimizer, weights,
                                         keep=control.kept_on_load(action.load_hyperparameters))
        control.weights_replaced()
        if action.load_hyperparameters:  # the variables moved under the controller's view
            control.controller.refresh_parameters()
        schedule = None
        if action.load_hyperparameters:
            schedule = persistence.schedule_from_json(loaded.control["schedule"])
        logger.info("step %d: loaded %s (run %s, step %d)%s", step, loaded.path, loaded.run_id,
                    loaded.step, " with its schedule" if schedule is not None else "")
        return RunResult(checkpoint_path=str(loaded.path), checkpoint_step=int(loaded.step),
                         checkpoint_run_id=str(loaded.run_id), schedule=schedule)

    def stop(self, step: int) -> None:
        """After the StopTraining is recorded: the final checkpoint (it carries the stop, so a
        restart has nothing left to do), then the loop ends."""
        control = self._control
        control.finish_requested()
        checkpointer = control.checkpointer
        if checkpointer is not None and checkpointer.save() is None:
            logger.error("step %d: the final checkpoint of the stopped run could not be written; "
                         "the newest one is still step %s", step, checkpointer.last_step)
        logger.info("step %d: the run was stopped for good (StopTraining)", step)


__all__ = ["RunActions"]
