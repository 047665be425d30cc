"""Schedule specs: validation with Keras-style messages, and Keras config round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lrctl.service.errors import InvalidArgumentError
from lrctl.service.schedules import specs
from lrctl.service.schedules.registry import CAPACITY

INVALID = [
    # (builder, field, rule fragment, received)
    (lambda: specs.Constant(math.nan), "learning_rate", "must be finite and >= 0", "nan"),
    (lambda: specs.Constant(math.inf), "learning_rate", "must be finite and >= 0", "inf"),
    (lambda: specs.Constant(-1.0), "learning_rate", "must be finite and >= 0", "-1.0"),
    (lambda: specs.Constant("0.1"), "learning_rate", "must be a number", "0.1"),
    (lambda: specs.ExponentialDecay(0.1, 0, 0.9), "decay_steps", "must be > 0", "0"),
    (lambda: specs.ExponentialDecay(0.1, 10.5, 0.9), "decay_steps", "must be an integer", "10.5"),
    (lambda: specs.ExponentialDecay(0.1, 10, 0.0), "decay_rate", "must be finite and > 0", "0.0"),
    (lambda: specs.InverseTimeDecay(0.1, -3, 0.5), "decay_steps", "must be > 0", "-3"),
    (lambda: specs.PolynomialDecay(0.1, 0), "decay_steps", "must be > 0", "0"),
    (lambda: specs.PolynomialDecay(0.1, 10, power=0.0), "power", "must be finite and > 0", "0.0"),
    (lambda: specs.CosineDecay(0.1, 100, alpha=1.5), "alpha", "must be in [0, 1]", "1.5"),
    (lambda: specs.CosineDecay(0.1, 100, warmup_target=0.2, warmup_steps=-1), "warmup_steps",
     "must be >= 0", "-1"),
    (lambda: specs.CosineDecayRestarts(0.1, 0), "first_decay_steps", "must be > 0", "0"),
    (lambda: specs.CosineDecayRestarts(0.1, 10, t_mul=0.0), "t_mul", "must be finite and >= 1", "0.0"),
    (lambda: specs.CosineDecayRestarts(0.1, 10, t_mul=0.5), "t_mul", "must be finite and >= 1", "0.5"),
    (lambda: specs.PiecewiseConstantDecay((10, 5), (0.3, 0.2, 0.1)), "boundaries",
     "must be strictly increasing", "[10, 5]"),
    (lambda: specs.PiecewiseConstantDecay((5, 5), (0.3, 0.2, 0.1)), "boundaries",
     "must be strictly increasing", "[5, 5]"),
    (lambda: specs.PiecewiseConstantDecay((5, 10), (0.3, 0.2)), "values",
     "must have len(boundaries) + 1 = 3 entries", "2 entries"),
    (lambda: specs.PiecewiseConstantDecay((5,), (0.3, math.nan)), "values[1]",
     "must be finite and >= 0", "nan"),
    (lambda: specs.PiecewiseConstantDecay(tuple(range(CAPACITY + 1)), (0.1,) * (CAPACITY + 2)),
     "boundaries", "must have at most 64 entries", "65 entries"),
    (lambda: specs.PiecewiseLinear(tuple((i, 0.1) for i in range(CAPACITY + 1))), "knots",
     "must have 1 to 64 entries", "65 entries"),
    (lambda: specs.PiecewiseLinear(()), "knots", "must have 1 to 64 entries", "0 entries"),
    (lambda: specs.PiecewiseLinear(((0, 0.1), (0, 0.2))), "knots", "must be strictly increasing",
     "[0, 0]"),
    (lambda: specs.PiecewiseLinear(((-1, 0.1),)), "knots[0].step", "must be >= 0", "-1"),
    (lambda: specs.ExponentialDecay(0.1, 2**53 + 1, 0.9), "decay_steps", f"must be <= {2**53}",
     str(2**53 + 1)),
]


@pytest.mark.parametrize(("build", "field", "rule", "received"), INVALID)
def test_invalid_specs_raise_keras_style_value_errors(build, field, rule, received):
    with pytest.raises(ValueError) as info:
        build()
    error = info.value
    assert isinstance(error, InvalidArgumentError)
    assert error.field == field
    assert str(error) == f"Argument `{field}` {rule}. Received: {field}={received}"


def test_message_matches_keras_wording_exactly():
    with pytest.raises(ValueError) as info:
        specs.ExponentialDecay(0.1, 0, 0.9)
    assert str(info.value) == "Argument `decay_steps` must be > 0. Received: decay_steps=0"
    prefixed = info.value.with_prefix("schedule.exponential_decay.")
    assert str(prefixed) == (
        "Argument `schedule.exponential_decay.decay_steps` must be > 0. "
        "Received: schedule.exponential_decay.decay_steps=0"
    )


def test_specs_are_normalised_and_immutable():
    spec = specs.ExponentialDecay(1, 1000.0, 0.5, staircase=1)
    assert (spec.initial_learning_rate, spec.decay_steps, spec.staircase) == (1.0, 1000, True)
    assert type(spec.decay_steps) is int
    with pytest.raises(AttributeError):
        spec.decay_steps = 5  # type: ignore[misc]
    pl = specs.PiecewiseLinear([[0, 0], [10, 1]])  # lists (e.g. from JSON) are accepted
    assert pl.knots == ((0, 0.0), (10, 1.0))
    assert pl == specs.PiecewiseLinear(((0, 0.0), (10, 1.0)))


def test_full_capacity_is_accepted():
    specs.PiecewiseConstantDecay(tuple(range(CAPACITY)), (0.1,) * (CAPACITY + 1))
    specs.PiecewiseLinear(tuple((i, 0.1) for i in range(CAPACITY)))


def test_spec_from_config_and_as_spec():
    config = {"initial_learning_rate": 0.1, "decay_steps": 1000, "decay_rate": 0.96,
              "staircase": False, "name": "ExponentialDecay"}
    expected = specs.ExponentialDecay(0.1, 1000, 0.96)
    assert specs.spec_from_config("ExponentialDecay", config) == expected
    assert specs.as_spec({"class_name": "ExponentialDecay", "config": config}) == expected
    assert specs.as_spec(expected) is expected
    assert specs.as_spec(0.5) == specs.Constant(0.5)
    # Missing optional keys take Keras's defaults.
    assert specs.spec_from_config("CosineDecay", {"initial_learning_rate": 0.1, "decay_steps": 5}) == \
        specs.CosineDecay(0.1, 5, 0.0, None, 0)
    with pytest.raises(ValueError, match=r"Argument `class_name` must be one of"):
        specs.spec_from_config("Nope", {})
    with pytest.raises(ValueError, match=r"Argument `config` is incomplete for ExponentialDecay"):
        specs.spec_from_config("ExponentialDecay", {"initial_learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"Argument `decay_steps` must be > 0"):
        specs.as_spec({"class_name": "ExponentialDecay",
                       "config": {**config, "decay_steps": 0}})
    with pytest.raises(ValueError, match=r"Argument `schedule` must be a float"):
        specs.as_spec(object())
    with pytest.raises(ValueError):
        specs.as_spec(True)  # a bool is not a learning rate


def test_describe_names_the_keras_class():
    assert specs.PiecewiseConstantDecay((10,), (0.1, 0.01)).describe() == \
        "PiecewiseConstantDecay(boundaries=[10], values=[0.1, 0.01])"


# One spec of every registered kind, with every optional field set away from its default.
EXAMPLES = {
    "Constant": specs.Constant(0.05),
    "ExponentialDecay": specs.ExponentialDecay(0.1, 1000, 0.96, staircase=True),
    "InverseTimeDecay": specs.InverseTimeDecay(0.1, 100, 0.5, staircase=True),
    "PolynomialDecay": specs.PolynomialDecay(0.1, 500, end_learning_rate=0.001, power=2.0, cycle=True),
    "CosineDecay": specs.CosineDecay(0.1, 500, alpha=0.1, warmup_target=0.2, warmup_steps=50),
    "CosineDecayRestarts": specs.CosineDecayRestarts(0.1, 100, t_mul=1.5, m_mul=0.9, alpha=0.05),
    "PiecewiseConstantDecay": specs.PiecewiseConstantDecay((10, 20), (0.3, 0.2, 0.1)),
    "PiecewiseLinear": specs.PiecewiseLinear(((0, 0.0), (100, 0.1), (1000, 0.001))),
}


def test_every_proto_kind_is_registered_and_every_registered_kind_is_in_the_proto():
    """The proto's `Schedule.kind` oneof and the service's registry (schedules/kinds.py) name the
    same kinds: a kind added to the proto without its registration (spec, forms, derivation,
    extremes) fails here, and so does a registered kind the proto cannot carry."""
    from lrctl.service.schedules import forms
    from lrctl.v1 import training_control_pb2 as pb

    oneof = pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"]
    in_proto = {field.message_type.name: field for field in oneof.fields}
    registered = {spec_type.keras_name: spec_type for spec_type in specs.SPEC_TYPES}
    assert sorted(in_proto) == sorted(registered)
    for name, field in in_proto.items():
        spec_type = registered[name]
        # Each spec field is its message's field of the same name, and nothing else is.
        assert [f.name for f in dataclasses.fields(spec_type)] == [f.name for f in field.message_type.fields], name
        assert spec_type.forms, name
        for form_name, form in spec_type.forms.items():
            assert forms.FORMS[form_name] is form and form.spec_type is spec_type
            assert callable(form.compute) and callable(form.candidates)
    # Every form is some registered kind's, and every kind has an example below.
    assert {f.spec_type for f in forms.FORMS.values()} == set(specs.SPEC_TYPES)
    assert sorted(EXAMPLES) == sorted(registered)


def test_form_order_is_the_one_checkpoints_saved():
    """The engine stores a form's index in FORMS, and checkpoints keep it: forms are appended,
    never reordered."""
    from lrctl.service.schedules import forms

    assert list(forms.FORMS)[:13] == [
        "constant", "exponential", "exponential_staircase", "inverse_time", "inverse_time_staircase",
        "polynomial", "polynomial_cycle", "cosine", "cosine_warmup", "cosine_restarts",
        "cosine_restarts_linear", "piecewise_constant", "piecewise_linear",
    ]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_kind_round_trips_through_the_proto_and_json(name):
    from lrctl.service.rpc.convert import spec_from_proto, spec_to_proto
    from lrctl.service.schedules import forms

    spec = EXAMPLES[name]
    assert type(spec).keras_name == name
    message = spec_to_proto(spec)
    assert spec_from_proto(message) == spec
    assert spec_to_proto(spec_from_proto(message)) == message
    config = json.loads(json.dumps({"class_name": spec.keras_name, "config": spec.to_config()}))
    assert specs.as_spec(config) == spec
    assert specs.spec_from_config(config["class_name"], config["config"]) == spec
    # Its forms compute it: a finite learning rate, within its exact extremes.
    state = specs.ActiveSchedule(spec)
    assert forms.derive(state).form in type(spec).forms
    lo = forms.extremes(state, 0, 2000)
    assert 0 <= lo.min_lr <= forms.learning_rate(state, 700) <= lo.max_lr < math.inf


def test_an_unset_optional_field_takes_the_specs_default():
    from lrctl.service.rpc.convert import spec_from_proto
    from lrctl.v1 import training_control_pb2 as pb

    message = pb.Schedule(cosine_decay=pb.CosineDecay(initial_learning_rate=0.1, decay_steps=100))
    assert spec_from_proto(message) == specs.CosineDecay(0.1, 100)
    with pytest.raises(InvalidArgumentError) as info:
        spec_from_proto(pb.Schedule())
    assert info.value.field == "schedule"
