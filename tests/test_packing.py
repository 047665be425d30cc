"""The engine's variables as one int64 vector: exact both ways, on the host and in the graph,
for every dtype the engine uses and the awkward values (NaN, -0.0, subnormals, int64 limits)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from lrctl.service import TrainingControl
from lrctl.service.schedules.kinds import CosineDecay
from lrctl.service.schedules.packing import Packer, value_reader
from lrctl.service.schedules.specs import ActiveSchedule, Origin


def _variables() -> list[keras.Variable]:
    return [
        keras.Variable(np.array([np.nan, -0.0, 5e-324, 1.7976931348623157e308]), dtype="float64"),
        keras.Variable(np.array([[np.float32(1e-45), -np.inf], [3.0, np.nan]], np.float32), dtype="float32"),
        keras.Variable(np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]), dtype="int64"),
        keras.Variable(np.int32(-7), dtype="int32"),
        keras.Variable(True, dtype="bool"),
    ]


def test_host_and_graph_round_trips_are_bit_exact() -> None:
    variables = _variables()
    packer = Packer(variables)
    values = [np.asarray(v.numpy()) for v in variables]
    vector = packer.pack(values)
    assert vector.dtype == np.int64 and vector.shape == (packer.size,) == (4 + 4 + 2 + 1 + 1,)
    in_graph = np.asarray(tf.function(lambda: packer.pack_tensors([v.value for v in variables]))())
    assert np.array_equal(in_graph, vector)
    for before, after in zip(values, packer.unpack(vector), strict=True):
        assert after.dtype == before.dtype and after.tobytes() == before.tobytes()
    for before, after in zip(values, tf.function(packer.unpack_tensor)(tf.constant(vector)), strict=True):
        assert after.numpy().tobytes() == before.tobytes()
    # A sum with zeros (what a multi-worker all-reduce does) changes no bit.
    assert np.array_equal(vector + np.zeros_like(vector), vector)


def test_the_engine_reads_and_loads_through_one_vector() -> None:
    control = TrainingControl(keras.optimizers.SGD(0.1))
    target = control.engine
    state = ActiveSchedule(CosineDecay(0.1, 1000, 0.01, 0.5, 100), Origin.RESTART, 12, 0.25)
    target.load(state, 3)
    assert target.read() == control.schedule.read() == (state, 3)
    vector = target.read_packed()
    control.schedule.load(ActiveSchedule(CosineDecay(0.2, 10)), 4)
    target.load_packed(vector)
    assert control.schedule.read() == (state, 3)


def test_every_load_is_complete_after_a_restore_between_two_changes() -> None:
    """A restore between two changes (a new stamp) must be noticed: a load that trusted what
    it loaded last (to skip what looks unchanged, or to know what to put back) would keep
    the restored values."""
    from lrctl.service.control.changes import ChangeRequest, PinLearningRate

    mine, other = (TrainingControl(keras.optimizers.SGD(learning_rate=0.1)) for _ in range(2))
    for control, lr in ((mine, 0.5), (other, 0.02)):
        control.begin()
        control.controller.submit(ChangeRequest(PinLearningRate(lr)))
        control.step_boundary()
    for into, value in zip(mine.schedule.variables, other.schedule.variables, strict=True):
        into.assign(value.numpy())  # a restore of the other run's checkpoint, after the last load
    # Pin 0.5 again: its vector differs from the last one loaded only in the version and the
    # stamp, so a load that trusted what it loaded last would keep the restored 0.02.
    mine.controller.submit(ChangeRequest(PinLearningRate(0.5)))
    (change,) = mine.step_boundary()
    assert change.learning_rate_after == 0.5
    assert mine.engine.learning_rate(mine.step) == np.float32(0.5)
    state, version = mine.schedule.read()
    assert (state, version) == (change.schedule_after, change.version)
    assert np.array_equal(mine.schedule.read_packed(), mine.engine.read_packed())


def test_a_load_outside_a_boundary_reads_the_stamp_first() -> None:
    """Outside `EngineTarget.unchanged()` (the exchange, a revert), a load checks the stamp:
    a restore just before it makes it a load of every variable."""
    control = TrainingControl(keras.optimizers.SGD(0.1))
    target = control.engine
    first = ActiveSchedule(CosineDecay(0.1, 1000, 0.01, 0.5, 100), Origin.RESTART, 12, 0.25)
    target.load(first, 3)
    vector = target.read_packed()
    control.schedule.load(ActiveSchedule(CosineDecay(0.2, 10)), 4)  # behind the target's back
    again = vector.copy()
    again[control.schedule.offset_of(control.schedule.stamp_variable)] += 1  # a new stamp, same schedule
    target.load_packed(again)
    assert control.schedule.read() == (first, 3)
    assert np.array_equal(control.schedule.read_packed(), again)
    with target.unchanged():  # just read or loaded: the load needs no stamp read
        target.load(ActiveSchedule(CosineDecay(0.3, 10)), 5)
    assert control.schedule.read() == (ActiveSchedule(CosineDecay(0.3, 10)), 5)


def test_a_mirrored_variable_is_read_from_its_first_copy_and_a_sync_on_read_one_aggregated(
        mirrored: tf.distribute.MirroredStrategy) -> None:
    """`value_reader` reads a strategy's mirrored variable (the step counter of a
    tf.distribute job) with one op on its first copy: every write reaches every copy, so that
    is its value. A sync-on-read variable's copies differ: it is read as the strategy
    aggregates it."""
    with mirrored.scope():
        mirrored_variable = keras.Variable(0, dtype="int64", trainable=False, aggregation="only_first_replica")
        summed = tf.Variable(0.0, synchronization=tf.VariableSynchronization.ON_READ,
                             aggregation=tf.VariableAggregation.SUM)
    read_mirrored, read_summed = value_reader(mirrored_variable), value_reader(summed)
    for value in (7, 2**40 + 3, -1):
        mirrored_variable.assign(value)
        assert read_mirrored() == value == mirrored_variable.numpy()
    mirrored.run(lambda: summed.assign(1.5))  # each replica's copy holds 1.5
    assert read_summed() == 3.0 == summed.numpy()  # aggregated over the two replicas
