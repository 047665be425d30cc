"""ControllableSchedule computes what the Keras built-in schedules compute.

One ControllableSchedule is loaded with each random schedule in turn and evaluated over a batch
of steps by one traced function (`tf.vectorized_map`), so hundreds of schedules cost one trace.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from keras.optimizers import schedules as ks

from lrctl.service.errors import InvalidArgumentError
from lrctl.service.schedules import forms, specs
from lrctl.service.schedules.engine import ControllableSchedule
from lrctl.service.schedules.registry import CAPACITY
from lrctl.service.schedules.specs import ActiveSchedule, Origin

N_RANDOM = 20  # random parameter sets per kind
STEPS = np.concatenate([np.arange(0, 5001), np.arange(10**6 - 64, 10**6 + 65)]).astype(np.int64)
RTOL = 1e-5


@pytest.fixture(scope="module")
def engine():
    """One engine and one compiled evaluator shared by every case: loading never retraces.
    It evaluates the schedule's own formula: what __call__ then clamps (to nothing here, the
    bounds being [0, inf]) is tested in test_guardrails.py."""
    schedule = ControllableSchedule(0.001)
    evaluate = tf.function(lambda steps: tf.vectorized_map(schedule.unbounded, steps))
    version = iter(range(1, 10**6))

    def values(spec, origin=Origin.GLOBAL, origin_step=0, scale=1.0, steps=STEPS):
        schedule.load(ActiveSchedule(spec, origin, origin_step, scale), next(version))
        return evaluate(tf.constant(steps, tf.int64)).numpy()

    values.function = evaluate
    values.schedule = schedule
    return values


def keras_values(schedule, steps=STEPS) -> np.ndarray:
    """The Keras object's own values. Keras's formulas are elementwise except CosineDecay's
    warmup `cond`, which needs one step at a time."""
    if isinstance(schedule, ks.CosineDecay) and schedule.warmup_target is not None:
        return tf.vectorized_map(schedule, tf.constant(steps, tf.int64)).numpy()
    return np.asarray(schedule(tf.constant(steps, tf.int64)))


def assert_matches(got, expected, err_msg=""):
    """float32 tolerance: relative, plus an absolute floor of 1e-6 of the schedule's peak where
    the value cancels towards 0 (cosine at the end of a period)."""
    finite = np.abs(expected[np.isfinite(expected)])
    atol = 1e-6 * float(finite.max(initial=0.0)) + 1e-12
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=atol, err_msg=err_msg)


def _lr(rng) -> float:
    return float(10 ** rng.uniform(-5, 0))


def _random_schedules(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(N_RANDOM):
        if kind == "ExponentialDecay":
            out.append(ks.ExponentialDecay(_lr(rng), int(rng.integers(1, 3000)),
                                           float(rng.uniform(0.05, 1.2)), staircase=bool(i % 2)))
        elif kind == "PiecewiseConstantDecay":
            n = int(rng.integers(1, CAPACITY + 1))
            high = 6000 if i % 3 else 2 * 10**6  # some boundaries near the 1e6 steps too
            boundaries = sorted(int(b) for b in rng.choice(high, size=n, replace=False))
            values = [_lr(rng) for _ in range(n + 1)]
            out.append(ks.PiecewiseConstantDecay(boundaries, values))
        elif kind == "PolynomialDecay":
            initial = _lr(rng)
            out.append(ks.PolynomialDecay(
                initial, int(rng.integers(1, 3000)), end_learning_rate=initial * float(rng.uniform(0, 0.5)),
                power=[1.0, 0.5, 2.0, float(rng.uniform(0.1, 4.0))][i % 4], cycle=bool(i % 2),
            ))
        elif kind == "InverseTimeDecay":
            out.append(ks.InverseTimeDecay(_lr(rng), int(rng.integers(1, 3000)),
                                           float(rng.uniform(0, 5)), staircase=bool(i % 2)))
        elif kind == "CosineDecay":
            initial = _lr(rng)
            warmup = {} if i % 2 else {"warmup_target": initial * float(rng.uniform(1, 10)),
                                       "warmup_steps": int(rng.integers(0, 2000))}
            out.append(ks.CosineDecay(initial, int(rng.integers(1, 4000)),
                                      alpha=float(rng.uniform(0, 1)), **warmup))
        elif kind == "CosineDecayRestarts":
            t_mul = 1.0 if i % 2 else float(rng.uniform(1.05, 3.0))
            out.append(ks.CosineDecayRestarts(
                _lr(rng), int(rng.integers(1, 1500)), t_mul=t_mul,
                m_mul=float(rng.uniform(0.3, 1.0)), alpha=float(rng.uniform(0, 0.5)),
            ))
    return out


KINDS = ["ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay", "InverseTimeDecay",
         "CosineDecay", "CosineDecayRestarts"]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_keras_over_random_parameters(engine, kind):
    traces = None
    for index, keras_schedule in enumerate(_random_schedules(kind, seed=KINDS.index(kind))):
        expected = keras_values(keras_schedule)
        # Through the ControllableSchedule constructor, as a user would pass it...
        direct = ControllableSchedule(keras_schedule)
        spec = specs.as_spec(keras_schedule)
        assert direct.read()[0].spec == spec
        # The spec's config is the Keras object's config (what get_config() reports back).
        keras_config = {k: v for k, v in keras_schedule.get_config().items() if k != "name"}
        assert spec.to_config() == keras_config
        # ...and loaded into the shared engine, evaluated over all the steps at once.
        got = engine(specs.as_spec(keras_schedule))
        if traces is None:  # the engine is shared: other tests may have traced other shapes
            traces = engine.function.experimental_get_tracing_count()
        assert_matches(got, expected, f"{kind} #{index}: {keras_schedule.get_config()}")
    # Every case above ran in the one trace.
    assert engine.function.experimental_get_tracing_count() == traces


def test_named_corner_cases_match_keras(engine):
    """Cases that random draws may miss: the branches the seed article calls out."""
    cases = [
        ks.PolynomialDecay(0.1, 100, 0.001, power=1.0, cycle=True),
        ks.PolynomialDecay(0.1, 100, 0.001, power=2.5, cycle=True),
        ks.PolynomialDecay(0.1, 100, 0.001, power=0.5, cycle=False),
        ks.InverseTimeDecay(0.1, 10, 0.5, staircase=True),
        ks.CosineDecay(0.1, 1000),
        ks.CosineDecay(0.1, 1000, alpha=0.1),
        ks.CosineDecay(0.0, 1000, warmup_target=0.1, warmup_steps=100),
        ks.CosineDecay(0.01, 1000, alpha=0.05, warmup_target=0.1, warmup_steps=250),
        ks.CosineDecay(0.01, 1000, alpha=0.05, warmup_target=0.1, warmup_steps=0),  # no warmup: from 0.1
        ks.CosineDecay(0.1, 1000, warmup_steps=50),  # Keras ignores warmup_steps without a target
        ks.CosineDecay(0.1, 1, alpha=0.5, warmup_target=0.2, warmup_steps=1),
        ks.CosineDecayRestarts(0.1, 100, t_mul=1.0, m_mul=1.0),
        ks.CosineDecayRestarts(0.1, 100, t_mul=2.0, m_mul=0.5, alpha=0.1),
        ks.CosineDecayRestarts(0.1, 37, t_mul=1.0, m_mul=0.9, alpha=0.2),
        ks.ExponentialDecay(0.1, 7, 0.5, staircase=True),
        ks.PiecewiseConstantDecay([0, 1, 2], [0.3, 0.2, 0.1, 0.05]),
    ]
    for keras_schedule in cases:
        assert_matches(engine(specs.as_spec(keras_schedule)), keras_values(keras_schedule),
                       str(keras_schedule.get_config()))


def test_every_form_is_used_and_constant_is_exact(engine):
    """Each spec picks its own form (one branch of the engine's switch per form)."""
    used = {forms.derive(ActiveSchedule(specs.as_spec(s))).form
            for kind in KINDS for s in _random_schedules(kind, seed=3)}
    used |= {forms.derive(ActiveSchedule(s)).form
             for s in (specs.Constant(0.1), specs.PiecewiseLinear(((0, 0.1),)))}
    assert used == set(forms.FORMS)
    got = engine(specs.Constant(0.3), scale=0.5, steps=np.array([0, 1, 10**6]))
    np.testing.assert_array_equal(got, np.float32(0.15))


def test_piecewise_linear_matches_numpy_interp(engine):
    rng = np.random.default_rng(99)
    for index in range(N_RANDOM):
        n = int(rng.integers(1, CAPACITY + 1))
        knot_steps = sorted(int(s) for s in rng.choice(6000, size=n, replace=False))
        rates = [_lr(rng) for _ in range(n)]
        got = engine(specs.PiecewiseLinear(tuple(zip(knot_steps, rates))))
        expected = np.interp(STEPS.astype(np.float64), knot_steps, rates)
        assert_matches(got, expected, f"case {index}: {list(zip(knot_steps, rates))}")


def test_piecewise_linear_warmup_then_decay(engine):
    spec = specs.PiecewiseLinear(((0, 0.0), (100, 0.1), (1000, 0.1), (2000, 0.001)))
    got = engine(spec, steps=np.array([0, 50, 100, 550, 1000, 1500, 2000, 10**6]))
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.1, 0.1, 0.0505, 0.001, 0.001], rtol=1e-6)


def test_full_capacity_works_and_one_more_is_rejected(engine):
    boundaries = [10 * (i + 1) for i in range(CAPACITY)]
    values = [float(CAPACITY + 1 - i) for i in range(CAPACITY + 1)]
    keras_schedule = ks.PiecewiseConstantDecay(boundaries, values)
    np.testing.assert_array_equal(engine(specs.as_spec(keras_schedule)), keras_values(keras_schedule))
    assert engine(specs.as_spec(keras_schedule), steps=np.array([10 * CAPACITY + 1]))[0] == 1.0

    knots = tuple((10 * i, float(i)) for i in range(CAPACITY))
    got = engine(specs.PiecewiseLinear(knots), steps=np.array([0, 5, 10 * (CAPACITY - 1), 10**6]))
    np.testing.assert_allclose(got, [0.0, 0.5, CAPACITY - 1, CAPACITY - 1])

    with pytest.raises(ValueError, match=r"Argument `boundaries` must have at most 64 entries"):
        specs.PiecewiseConstantDecay(tuple(boundaries + [10**5]), tuple(values + [0.5]))
    with pytest.raises(ValueError, match=r"Argument `knots` must have 1 to 64 entries"):
        specs.PiecewiseLinear(knots + ((10**5, 0.5),))
    with pytest.raises(InvalidArgumentError):  # a Keras object that does not fit is refused too
        ControllableSchedule(ks.PiecewiseConstantDecay(boundaries + [10**5], values + [0.5]))


def test_scale_multiplies_every_kind(engine):
    spec = specs.CosineDecay(0.1, 500, alpha=0.1, warmup_target=0.2, warmup_steps=50)
    base = engine(spec)
    np.testing.assert_allclose(engine(spec, scale=0.25), base * 0.25, rtol=1e-6)


def test_restart_origin_shifts_the_schedule(engine):
    spec = specs.ExponentialDecay(0.005, 5, 0.8, staircase=True)
    steps = np.arange(0, 60)
    got = engine(spec, origin=Origin.RESTART, origin_step=25, steps=steps)
    keras_at_local = keras_values(ks.ExponentialDecay(0.005, 5, 0.8, staircase=True),
                                  np.maximum(steps - 25, 0))
    np.testing.assert_array_equal(got, keras_at_local)
    assert got[25] == np.float32(0.005) and got[30] == np.float32(0.004)
    # Origin global evaluates the same schedule as Keras would from optimizer step 0: lower.
    global_values = engine(spec, steps=steps)
    assert global_values[25] == pytest.approx(0.005 * 0.8**5, rel=1e-6)
    assert global_values[25] < got[25]


def test_restart_at_a_large_origin_is_exact(engine):
    """Step arithmetic is int64: at step 2e7 float32 cannot tell neighbouring steps apart
    (spacing 2), yet the restarted schedule must see local steps 0, 1, 2, ... exactly."""
    origin = 20_000_000
    keras_schedule = ks.ExponentialDecay(0.1, 3, 0.9)  # not staircase: every step differs
    local = np.arange(0, 200)
    got = engine(specs.as_spec(keras_schedule), origin=Origin.RESTART, origin_step=origin,
                 steps=origin + local)
    np.testing.assert_array_equal(got, keras_values(keras_schedule, local))
    assert np.all(np.diff(got) < 0)  # strictly decreasing: no two steps collapsed
    # And the same for the knot kinds, whose boundaries are compared in int64.
    pl = specs.PiecewiseLinear(((0, 1.0), (1, 0.5), (3, 0.25)))
    got = engine(pl, origin=Origin.RESTART, origin_step=origin, steps=origin + np.arange(5))
    np.testing.assert_array_equal(got, [1.0, 0.5, 0.375, 0.25, 0.25])


HOST_STEPS = np.concatenate([np.arange(0, 3000, 7), np.arange(10**6 - 8, 10**6 + 9)]).astype(np.int64)


@pytest.mark.parametrize("kind", [*KINDS, "PiecewiseLinear"])
def test_the_host_evaluator_matches_the_graph(engine, kind):
    """`forms.learning_rate` (no TensorFlow: learning_rate_after, the float32 checks)
    computes what the engine computes, origin and scale included."""
    if kind == "PiecewiseLinear":
        rng = np.random.default_rng(99)
        cases = [specs.PiecewiseLinear(tuple(zip(sorted(int(s) for s in rng.choice(4000, n, replace=False)),
                                                 (_lr(rng) for _ in range(n)), strict=True)))
                 for n in rng.integers(1, CAPACITY + 1, size=N_RANDOM)]
    else:
        cases = [specs.as_spec(s) for s in _random_schedules(kind, seed=KINDS.index(kind))]
    for index, spec in enumerate(cases):
        state = ActiveSchedule(spec, Origin.RESTART, origin_step=index * 13, scale=0.5 + index / 7)
        got = np.array([forms.learning_rate(state, int(s)) for s in HOST_STEPS], np.float32)
        expected = engine(spec, Origin.RESTART, state.origin_step, state.scale, steps=HOST_STEPS)
        keep = _off_restart_boundaries(spec, HOST_STEPS - state.origin_step)
        assert keep.mean() > 0.95
        assert_matches(got[keep], expected[keep], f"{kind} #{index}: {spec}")


def _off_restart_boundaries(spec, local: np.ndarray) -> np.ndarray:
    """Steps not within a hair of a CosineDecayRestarts period boundary: there the float32
    log that picks the period may round either way, on the host as in Keras's own graph,
    and both values (the end of one period, the start of the next) are the schedule's."""
    if not isinstance(spec, specs.CosineDecayRestarts) or spec.t_mul == 1.0:
        return np.ones(local.shape, bool)
    fraction = np.maximum(local, 0) / spec.first_decay_steps
    period = np.floor(np.log1p(fraction * (spec.t_mul - 1.0)) / np.log(spec.t_mul))
    start = (1.0 - spec.t_mul**period) / (1.0 - spec.t_mul)
    within = (fraction - start) / spec.t_mul**period
    return (np.minimum(within, 1.0 - within) > 1e-4) | (local <= 0)


def test_every_spec_reads_back_as_it_was_loaded(engine):
    """The controller takes any difference between what it loaded and what it reads back for a
    checkpoint restore (and bumps the version), so the encoding must round-trip exactly."""
    cases = [specs.as_spec(s) for kind in KINDS for s in _random_schedules(kind, seed=7)]
    cases += [specs.CosineDecay(0.01, 100, warmup_steps=1),  # warmup_steps without a target
              specs.PolynomialDecay(0.1, 10), specs.PiecewiseLinear(((0, 0.1), (5, 0.0)))]
    for version, spec in enumerate(cases, start=1):
        state = ActiveSchedule(spec, Origin.RESTART, origin_step=version, scale=1 / 3)
        engine.schedule.load(state, version)
        assert engine.schedule.read() == (state, version), spec
