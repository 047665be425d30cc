"""The built-in demo task: a small regression on deterministic synthetic data, with no
downloads, where the loss visibly responds to the learning rate."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

STEPS_PER_EPOCH = 100


def build(seed: int = 0) -> tuple[keras.Model, tf.data.Dataset]:
    """A compiled MLP (SGD, LR 0.001: deliberately slow) and an endless dataset of batches."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8192, 16)).astype("float32")
    teacher = rng.normal(size=(16, 1)).astype("float32")
    y = (np.tanh(x @ teacher) + 0.1 * rng.normal(size=(8192, 1))).astype("float32")
    model = keras.Sequential([
        keras.Input((16,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1),
    ], name="lrctl_demo")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.001, momentum=0.9), loss="mse")
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(8192, seed=seed).batch(32).repeat()
    return model, data
