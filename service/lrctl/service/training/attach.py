"""Putting lrctl's schedule on an optimizer: `attach` (any built-in Keras schedule or float
becomes a ControllableSchedule whose variables the optimizer checkpoints) and `build_optimizer`.
Its own module because the façade, the `.keras` loader and the benchmarks all need it."""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lrctl.service.schedules import specs
from lrctl.service.schedules.engine import ControllableSchedule


def lr_owner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer whose learning rate moves the weights. A LossScaleOptimizer (what
    compile() makes under mixed precision) only wraps one and never reads its own."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def attach(optimizer: keras.optimizers.Optimizer) -> ControllableSchedule:
    """Give `optimizer` a ControllableSchedule that starts where its learning rate is now.

    Works for a float learning rate or any Keras built-in schedule, before the optimizer has
    taken its first step. Its variables join the optimizer's, so any checkpoint of the
    optimizer (`tf.train.Checkpoint`, `model.save_weights`, BackupAndRestore) carries them.
    To restore, attach first, then restore: Keras's `load_weights` skips (with a warning)
    the state of an optimizer that is not built yet, so build it before `load_weights`.
    A LossScaleOptimizer gets the schedule on its inner optimizer, which applies the updates.
    Load a `.keras` file with lrctl.service.load_model, not keras.models.load_model.
    """
    owner = lr_owner(optimizer)
    current = owner._learning_rate
    if isinstance(current, ControllableSchedule):
        schedule = current
        if schedule.saved_optimizer_layout is not None:
            raise ValueError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': it was rebuilt from a saved "
                "config (keras.models.load_model does this) without its saved state, so its step "
                "count and slots (e.g. Adam's moments) would restart from zero under lrctl's "
                f"restored schedule (version {schedule.read()[1]}). Keras skips that state because "
                "lrctl's variables change the optimizer's variable count. Load the file with "
                "lrctl.service.load_model(path), which restores it."
            )
    else:
        if owner.built:
            raise ValueError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': it has already been built, so "
                "a compiled train step may hold its current learning rate and would ignore a new "
                "one. Attach before the first step (after compile() and before fit() is fine), or "
                "build the optimizer with lrctl.service.build_optimizer()."
            )
        if isinstance(current, keras.Variable):
            # The shortest decimal that is this float32, i.e. what the user typed (0.1, not
            # 0.10000000149011612), so reports show the value as it was asked for.
            initial: Any = float(str(np.asarray(current.numpy()).astype(np.float32)))
        elif isinstance(current, keras.optimizers.schedules.LearningRateSchedule):
            try:
                initial = specs.as_spec(current)
            except ValueError as e:
                raise ValueError(
                    f"Cannot attach lrctl to optimizer '{optimizer.name}': its learning rate is a "
                    f"custom schedule ({type(current).__name__}) that lrctl cannot express. Use a "
                    "Keras built-in schedule or lrctl's PiecewiseLinear."
                ) from e
        else:
            raise TypeError(
                f"Cannot attach lrctl to optimizer '{optimizer.name}': its learning rate is a "
                f"callable ({current!r}), which lrctl cannot read. Pass a float or a schedule."
            )
        # The schedule's variables must live where the optimizer's do (same strategy).
        strategy = getattr(owner, "_distribution_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            schedule = ControllableSchedule(initial)
        # Not the `learning_rate` setter: it untracks the float LR variable, and deleting from
        # the optimizer's append-only variable list makes tf.train.Checkpoint refuse to save.
        owner._learning_rate = schedule
        if isinstance(current, keras.Variable):
            schedule.retired = (current,)  # still tracked, but a .keras load need not restore it
    # Tracked by the owner, so a wrapper's `variables` (its own + the owner's) hold them too.
    tracked = {id(v) for v in owner.variables}
    for variable in schedule.checkpointed:
        if id(variable) not in tracked:
            owner._track_variable(variable)
    schedule.optimizer_ref = weakref.ref(owner)  # get_config records where its variables sit
    return schedule


def build_optimizer(optimizer: str | type = "adam", learning_rate: object = 0.001,
                    **kwargs: Any) -> keras.optimizers.Optimizer:
    """An optimizer (a Keras name such as "adam", or a class) whose learning rate is a
    ControllableSchedule starting at `learning_rate` (a float or a Keras built-in schedule).

    Create it inside `strategy.scope()` when training under tf.distribute.
    """
    cls = type(keras.optimizers.get(optimizer)) if isinstance(optimizer, str) else optimizer
    instance = cls(learning_rate=ControllableSchedule(learning_rate), **kwargs)
    attach(instance)
    return instance
