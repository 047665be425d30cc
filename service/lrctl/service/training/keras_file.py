"""Loading a `.keras` file with lrctl's schedule and the optimizer's own state intact.

`model.save("m.keras")` keeps both: lrctl's whole state is in the optimizer's config
(`ControllableSchedule.get_config`) and the optimizer's variables, lrctl's included, are in
the weights, in the optimizer's variable order. keras.models.load_model rebuilds the optimizer
from its config, so the schedule comes back, but not the optimizer's variables (step count,
slots such as Adam's moments): the rebuilt optimizer does not track lrctl's variables, so the
counts differ and Keras skips them all with a warning. `load_model` here restores them: the
config records where lrctl's variables (and the float LR variable lrctl retired) sat in the
saved list; the rest are the optimizer's own, in the order the rebuilt optimizer has them.
`attach` refuses an optimizer that was rebuilt from such a config but not restored.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Any

import h5py
import keras
import numpy as np

from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.training.attach import attach, lr_owner

_WEIGHTS = "model.weights.h5"  # the weights inside a .keras zip archive
_SKIPPED = "Skipping variable loading for optimizer"  # Keras's warning, moot once restored


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> keras.Model:
    """`keras.models.load_model(path, **kwargs)`, then lrctl attached to the optimizer and the
    optimizer's state restored: step count, slots, and lrctl's schedule, scale, origin and
    version. Raises if the saved optimizer state does not fit the rebuilt optimizer."""
    # Keras warns that it skipped the optimizer's variables: hold its warnings until we know.
    with warnings.catch_warnings(record=True) as caught:
        model = keras.models.load_model(path, **kwargs)
    optimizer = getattr(model, "optimizer", None)  # None when loaded with compile=False
    schedule = lr_owner(optimizer)._learning_rate if optimizer is not None else None
    restored = False
    if isinstance(schedule, ControllableSchedule):
        layout = schedule.saved_optimizer_layout
        schedule.saved_optimizer_layout = None  # restored below, so attach may proceed
        attach(optimizer)
        if layout is not None and layout.get("hyperparameters"):
            # The live hyperparameters' variables, rebuilt around the built values in the config.
            from lrctl.service.training.hyperparams import OptimizerParameters
            OptimizerParameters(optimizer)
        if layout is not None:
            _restore_optimizer(optimizer, schedule, layout, path)
            restored = True
    for w in caught:
        if not (restored and _SKIPPED in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return model


def _restore_optimizer(optimizer: keras.optimizers.Optimizer, schedule: ControllableSchedule,
                       layout: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Assign the optimizer's saved variables, a LossScaleOptimizer's (loss scale) included."""
    with zipfile.ZipFile(path) as archive:
        if _WEIGHTS not in archive.namelist():
            raise ValueError(f"{os.fspath(path)!r} holds no {_WEIGHTS}: lrctl.service.load_model "
                             "cannot restore the optimizer from it.")
        # h5py reads the (uncompressed) member in place: only the optimizer's groups are read.
        with archive.open(_WEIGHTS) as member, h5py.File(member, "r") as h5:
            group = "optimizer"  # where Keras saves `model.optimizer`
            while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                # A wrapper's saved list is its own variables, then its inner optimizer's; Keras
                # also saves the inner optimizer alone, as the wrapper's child.
                inner = optimizer.inner_optimizer
                own = optimizer.variables[: len(optimizer.variables) - len(inner.variables)]
                saved = _saved(h5, group)[: len(own)]
                if len(saved) != len(own):
                    raise _error(optimizer, path, f"the file holds {len(saved)} of its variables")
                _assign(optimizer, list(zip(own, saved, strict=True)), path)
                optimizer, group = inner, f"{group}/inner_optimizer"
            _restore(optimizer, schedule, layout, _saved(h5, group), path)


def _saved(h5: h5py.File, group: str) -> list[np.ndarray]:
    """An optimizer's variables as saved, in order."""
    variables = h5.get(f"{group}/vars")
    return [] if variables is None else [np.asarray(variables[str(i)]) for i in range(len(variables))]


def _restore(optimizer: keras.optimizers.Optimizer, schedule: ControllableSchedule,
             layout: dict[str, Any], values: list[np.ndarray], path: str | os.PathLike[str]) -> None:
    """Assign the saved values: lrctl's by the recorded indices, the optimizer's own in order
    (Keras's own rule for optimizer variables), the retired ones nowhere."""
    if len(values) != layout["count"]:
        raise _error(optimizer, path, f"the file holds {len(values)} of its variables, "
                                      f"its config {layout['count']}")
    saved_parameters = layout.get("hyperparameters", {})
    parameters = schedule.hyperparameters or {}
    if set(saved_parameters) - set(parameters):
        raise _error(optimizer, path, f"the file holds hyperparameters {sorted(saved_parameters)}, "
                                      f"the optimizer {sorted(parameters)}")
    not_own = {*layout["schedule"], *layout["retired"], *saved_parameters.values()}
    own_values = [value for i, value in enumerate(values) if i not in not_own]
    ours = {id(v) for v in schedule.checkpointed} | {id(v) for v in parameters.values()}
    own = [v for v in optimizer.variables if id(v) not in ours]
    if len(own) != len(own_values):
        raise _error(optimizer, path, f"it has {len(own)} variables of its own, the file "
                     f"{len(own_values)}" + ("" if optimizer.built else " (is the model built?)"))
    _assign(optimizer, [*zip(own, own_values),
                        # A file from before the clamp holds `variables` only: the rest stay.
                        *zip(schedule.checkpointed, (values[i] for i in layout["schedule"])),
                        *((parameters[name], values[i]) for name, i in saved_parameters.items())], path)


def _assign(optimizer: keras.optimizers.Optimizer, pairs: list[tuple[keras.Variable, np.ndarray]],
            path: str | os.PathLike[str]) -> None:
    for variable, value in pairs:  # check all before assigning any
        if tuple(variable.shape) != value.shape:
            raise _error(optimizer, path, f"{variable.path} has shape {tuple(variable.shape)}, "
                                          f"the file {value.shape}")
    for variable, value in pairs:
        variable.assign(value)


def _error(optimizer: keras.optimizers.Optimizer, path: str | os.PathLike[str], why: str) -> ValueError:
    return ValueError(f"Cannot restore optimizer '{optimizer.name}' from {os.fspath(path)!r}: {why}.")
