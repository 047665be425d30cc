"""The schedule's variables as one int64 vector, bit for bit, on the host and in the graph.

One tensor instead of twelve: reading the engine is then one compiled call with one output
(each extra argument of a tf.function costs a conversion, ~30 µs), and a multi-worker exchange
is one all-reduce. Floats travel as their bits, so nothing is rounded, and summing a vector
with zeros (the all-reduce) leaves it unchanged.

A load against what the variables hold assigns only the variables whose bits differ, each with
one eager AssignVariableOp on its handle (~30 µs here): a compiled call costs ~0.5 ms on this
2-core machine whatever it does (issue 20: `docs/benchmarks.md`), and a change touches about
half of the thirteen variables. Variables of a `tf.distribute` strategy keep the compiled call,
which assigns every replica in cross-replica context.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
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
        self._read = tf.function(lambda: packer.pack_tensors([v.value for v in variables]))
        #: Each variable's resource handle, where every variable is one plain resource variable
        #: (not a strategy's mirrored one): then a load is eager assigns of what differs.
        self._handles = _plain_handles(variables)
        self._dtypes = [tf.as_dtype(v.dtype) for v in variables]
        self._index = {id(v): i for i, v in enumerate(variables)}

        @tf.function(input_signature=[tf.TensorSpec([packer.size], tf.int64)])
        def assign(vector: tf.Tensor) -> None:
            for variable, value in zip(variables, packer.unpack_tensor(vector), strict=True):
                variable.assign(value)

        self._assign = assign

    def read(self) -> np.ndarray:
        return np.asarray(self._read())

    def read_one(self, variable: keras.Variable) -> np.ndarray:
        """One variable's value: one eager read of its handle (~40 µs; `.numpy()` costs ~110)."""
        if self._handles is None:
            return np.asarray(variable.numpy())
        i = self._index[id(variable)]
        return np.asarray(gen_resource_variable_ops.read_variable_op(self._handles[i], self._dtypes[i]).numpy())

    def assign(self, vector: np.ndarray, previous: np.ndarray | None = None) -> None:
        """All or nothing: if the assignment fails, `previous` (what the variables hold, read
        now if not given) is put back and the error raised. Given `previous`, only the
        variables whose bits differ from it are assigned: it must be what they hold."""
        old = previous if previous is not None else self.read()
        if self._handles is None:
            try:
                self._assign(tf.constant(vector))
            except Exception:
                self._assign(tf.constant(old))
                raise
            return
        changed = [i for i, (start, end) in enumerate(self.packer.spans)
                   if not np.array_equal(vector[start:end], old[start:end])]
        try:
            self._assign_eagerly(vector, changed)
        except Exception:
            self._assign_eagerly(old, changed)
            raise

    def _assign_eagerly(self, vector: np.ndarray, indices: Sequence[int]) -> None:
        assert self._handles is not None
        for i in indices:
            # A numpy value of the variable's dtype: converted in C, no tf.constant (~15 µs).
            gen_resource_variable_ops.assign_variable_op(self._handles[i], self.packer.unpack_one(vector, i))


def _plain_handles(variables: Sequence[keras.Variable]) -> list[tf.Tensor] | None:
    """The resource handles of `variables` if each is one plain resource variable; else None."""
    inner = [v.value for v in variables]
    if not all(isinstance(x, resource_variable_ops.BaseResourceVariable)
               and not isinstance(x, tf.distribute.DistributedValues) for x in inner):
        return None
    return [x.handle for x in inner]


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
