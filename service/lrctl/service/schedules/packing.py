"""The schedule's variables as one int64 vector, bit for bit, on the host and in the graph.

One tensor instead of twelve: reading the engine is then one compiled call with one output
(each extra argument of a tf.function costs a conversion, ~30 µs), and a multi-worker exchange
is one all-reduce. Floats travel as their bits, so nothing is rounded, and summing a vector
with zeros (the all-reduce) leaves it unchanged.

Each read and load is one compiled call, run by name with its captured handles
(`CompiledCall`): tf.function's Python dispatch costs ~0.3 ms here, more than the graph it
runs (~0.1 ms of CPU for a whole load), and more than eager assigns of the variables that
differ (~30 µs each, ~8 for a swap) right after a train step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.ops import gen_resource_variable_ops, resource_variable_ops


class Packer:
    """Packs the values of `variables` (their shapes and dtypes fixed) into int64 vectors."""

    def __init__(self, variables: Sequence[keras.Variable]) -> None:
        self._layout = [(tuple(v.shape), np.dtype(v.dtype), int(np.prod(v.shape, dtype=np.int64)))
                        for v in variables]
        self.size = sum(size for _, _, size in self._layout)
        starts = np.cumsum([0] + [size for _, _, size in self._layout])
        self._offset = {id(v): int(start) for v, start in zip(variables, starts, strict=False)}
        #: Each variable's (start, end) in the vector, in order.
        self.spans = [(int(a), int(b)) for a, b in itertools.pairwise(starts)]

    def offset_of(self, variable: keras.Variable) -> int:
        """Where a scalar variable's value sits in the vector."""
        return self._offset[id(variable)]

    # -- host (numpy) ----------------------------------------------------------------------
    def pack(self, values: Sequence[Any]) -> np.ndarray:
        return np.concatenate([_to_bits(np.asarray(v, dtype).ravel())
                               for v, (_, dtype, _) in zip(values, self._layout, strict=True)])

    def unpack(self, vector: np.ndarray) -> list[np.ndarray]:
        return [self.unpack_one(vector, i) for i in range(len(self._layout))]

    def unpack_one(self, vector: np.ndarray, index: int) -> np.ndarray:
        """The value of variable `index` in `vector`."""
        shape, dtype, _ = self._layout[index]
        start, end = self.spans[index]
        return _from_bits(vector[start:end], dtype).reshape(shape)

    # -- graph -----------------------------------------------------------------------------
    def pack_tensors(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.concat([_tensor_to_bits(tf.reshape(t, [-1]), dtype)
                          for t, (_, dtype, _) in zip(tensors, self._layout, strict=True)], 0)

    def unpack_tensor(self, vector: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(vector, [size for _, _, size in self._layout])  # one op, not one per part
        return [tf.reshape(_tensor_from_bits(part, dtype), shape)
                for part, (shape, dtype, _) in zip(parts, self._layout, strict=True)]


class PackedVariables:
    """`variables` read and assigned as one vector, each in one compiled call: the only way
    lrctl reads or loads the engine (see `ControllableSchedule.load_packed`)."""

    def __init__(self, variables: Sequence[keras.Variable]) -> None:
        self.packer = packer = Packer(variables)

        @tf.function(input_signature=[])
        def read() -> tf.Tensor:
            return packer.pack_tensors([v.value for v in variables])

        @tf.function(input_signature=[tf.TensorSpec([packer.size], tf.int64)])
        def assign(vector: tf.Tensor) -> None:
            # Under a tf.distribute strategy: cross-replica context, so every replica is assigned.
            for variable, value in zip(variables, packer.unpack_tensor(vector), strict=True):
                variable.assign(value)

        self._read = CompiledCall(read)
        self._assign = CompiledCall(assign)
        self._read_one = {id(v): value_reader(v) for v in variables}

    def read(self) -> np.ndarray:
        (vector,) = self._read()
        return np.asarray(vector)

    def read_one(self, variable: keras.Variable) -> np.ndarray:
        """One variable's value (see `value_reader`)."""
        return self._read_one[id(variable)]()

    def assign(self, vector: np.ndarray, previous: np.ndarray | None = None) -> None:
        """All or nothing: if the assignment fails, `previous` (what the variables hold, read
        now if not given) is put back and the error raised."""
        old = previous if previous is not None else self.read()
        try:
            self._assign(tf.constant(vector))
        except Exception:
            self._assign(tf.constant(old))
            raise


class CompiledCall:
    """A tf.function with a fixed input signature, called as its one traced graph: by name,
    with the variables' handles it captured, through the eager context (what the
    ConcreteFunction's own call ends in). Returns the outputs as a list ([] for none)."""

    def __init__(self, function: Any) -> None:
        concrete = function.get_concrete_function()
        self._context = context.context()
        self._name = concrete.function_def.signature.name.encode()
        self._captures = list(concrete.captured_inputs)
        self._outputs = len(concrete.outputs)
        self._concrete = concrete  # keeps the graph (and its registration) alive

    def __call__(self, *inputs: tf.Tensor) -> list[tf.Tensor]:
        return self._context.call_function(self._name, [*inputs, *self._captures], self._outputs) or []


def value_reader(variable: keras.Variable) -> Callable[[], np.ndarray]:
    """A function that reads `variable`'s value now: one eager ReadVariableOp on its handle
    (~20 µs) where it is one plain resource variable or a strategy's mirrored one, else (an
    autocast, a sync-on-read variable) `.numpy()`, which runs three ops with gradient
    bookkeeping (~80-150 µs)."""
    inner = variable.value
    if isinstance(inner, tf.distribute.DistributedValues) \
            and inner.synchronization != tf.VariableSynchronization.ON_READ:
        # Mirrored: every write goes to each local copy, so the first holds the value.
        # `.numpy()` would run the strategy's cross-replica read: ~0.5 ms at every boundary
        # of a MultiWorkerMirroredStrategy job, for the step clock alone.
        inner = inner.values[0]
    if not isinstance(inner, resource_variable_ops.BaseResourceVariable) \
            or isinstance(inner, tf.distribute.DistributedValues):
        return lambda: np.asarray(variable.numpy())
    handle, dtype = inner.handle, inner.dtype
    return lambda: np.asarray(gen_resource_variable_ops.read_variable_op(handle, dtype).numpy())


def _to_bits(value: np.ndarray) -> np.ndarray:
    if value.dtype == np.float64:
        return value.view(np.int64)
    if value.dtype == np.float32:
        return value.view(np.int32).astype(np.int64)
    return value.astype(np.int64)


def _from_bits(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    bits = np.ascontiguousarray(bits, np.int64)
    if dtype == np.float64:
        return bits.view(np.float64)
    if dtype == np.float32:
        return bits.astype(np.int32).view(np.float32)
    return bits.astype(dtype)


def _tensor_to_bits(t: tf.Tensor, dtype: np.dtype) -> tf.Tensor:
    if dtype == np.float64:
        return tf.bitcast(t, tf.int64)
    if dtype == np.float32:
        return tf.cast(tf.bitcast(t, tf.int32), tf.int64)
    return tf.cast(t, tf.int64)


def _tensor_from_bits(bits: tf.Tensor, dtype: np.dtype) -> tf.Tensor:
    if dtype == np.float64:
        return tf.bitcast(bits, tf.float64)
    if dtype == np.float32:
        return tf.bitcast(tf.cast(bits, tf.int32), tf.float32)
    return tf.cast(bits, tf.as_dtype(dtype))
