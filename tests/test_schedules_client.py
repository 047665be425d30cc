"""lrctl.client.schedules mirrors keras.optimizers.schedules (names, defaults, configs)."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import pytest

from lrctl.client import InvalidArgument, schedules
from lrctl.client.schedules import from_keras_config, to_keras_config, to_schedule
from lrctl.v1 import training_control_pb2 as pb

keras = pytest.importorskip("keras")
ks = keras.optimizers.schedules

KERAS_KINDS = [
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "CosineDecayRestarts",
]

# Keras schedules with non-default arguments, one or more per kind.
KERAS_SCHEDULES = [
    ks.ExponentialDecay(0.1, 1000, 0.96),
    ks.ExponentialDecay(0.5, decay_steps=7, decay_rate=0.5, staircase=True),
    ks.PiecewiseConstantDecay([100, 200], [0.1, 0.01, 0.001]),
    ks.PolynomialDecay(0.1, 500),
    ks.PolynomialDecay(0.1, 500, end_learning_rate=0.01, power=2.0, cycle=True),
    ks.InverseTimeDecay(0.1, 10, 0.5),
    ks.InverseTimeDecay(0.1, 10, 0.5, staircase=True),
    ks.CosineDecay(0.1, 1000),
    ks.CosineDecay(0.0, 1000, alpha=0.1, warmup_target=0.2, warmup_steps=100),
    ks.CosineDecayRestarts(0.1, 100),
    ks.CosineDecayRestarts(0.1, 100, t_mul=1.5, m_mul=0.9, alpha=0.01),
]


def _ids(s: Any) -> str:
    return type(s).__name__


@pytest.mark.parametrize("class_name", KERAS_KINDS)
def test_builder_signature_matches_keras(class_name: str) -> None:
    ours = inspect.signature(getattr(schedules, class_name)).parameters
    theirs = dict(inspect.signature(getattr(ks, class_name).__init__).parameters)
    theirs.pop("self")
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        if name == "name":  # accepted and ignored; Keras's default is a class-specific string
            assert ours[name].default is None
            continue
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name


@pytest.mark.parametrize("keras_schedule", KERAS_SCHEDULES, ids=_ids)
def test_from_keras_config_round_trips(keras_schedule: Any) -> None:
    serialized = ks.serialize(keras_schedule)
    schedule = from_keras_config(serialized)
    assert schedule.WhichOneof("kind") is not None
    # to_keras_config is the exact inverse of Keras's serialize() ...
    assert to_keras_config(schedule) == serialized
    # ... and Keras can deserialize it into an equal schedule.
    rebuilt = ks.deserialize(to_keras_config(schedule))
    assert type(rebuilt) is type(keras_schedule)
    assert rebuilt.get_config() == keras_schedule.get_config()
    # The plain {"class_name", "config"} form and Keras objects are accepted too.
    plain = {"class_name": serialized["class_name"], "config": serialized["config"]}
    assert from_keras_config(plain) == schedule
    assert to_schedule(keras_schedule) == schedule
    assert to_schedule(serialized) == schedule


def test_builders_positional_equal_keras() -> None:
    cases = [
        (schedules.ExponentialDecay(0.1, 1000, 0.96, True), ks.ExponentialDecay(0.1, 1000, 0.96, True)),
        (schedules.PiecewiseConstantDecay([1, 2], [3.0, 2.0, 1.0]), ks.PiecewiseConstantDecay([1, 2], [3.0, 2.0, 1.0])),
        (schedules.PolynomialDecay(0.1, 5, 0.01, 2.0, True), ks.PolynomialDecay(0.1, 5, 0.01, 2.0, True)),
        (schedules.InverseTimeDecay(0.1, 5, 0.5, True), ks.InverseTimeDecay(0.1, 5, 0.5, True)),
        (schedules.CosineDecay(0.1, 5, 0.1, None, 0.2, 3), ks.CosineDecay(0.1, 5, 0.1, "x", 0.2, 3)),
        (schedules.CosineDecayRestarts(0.1, 5, 3.0, 0.5, 0.1), ks.CosineDecayRestarts(0.1, 5, 3.0, 0.5, 0.1)),
    ]  # fmt: skip
    for ours, theirs in cases:
        assert ours == from_keras_config(ks.serialize(theirs))


def test_builder_fields() -> None:
    s = schedules.ExponentialDecay(0.1, 1000, 0.96)
    assert s.WhichOneof("kind") == "exponential_decay"
    assert s.exponential_decay == pb.ExponentialDecay(
        initial_learning_rate=0.1, decay_steps=1000, decay_rate=0.96, staircase=False
    )
    assert schedules.Constant(0.01).constant.learning_rate == 0.01
    knots = schedules.PiecewiseLinear([(0, 0.0), (100, 0.1), pb.Knot(step=1000, learning_rate=1e-3)])
    assert [(k.step, k.learning_rate) for k in knots.piecewise_linear.knots] == [
        (0, 0.0),
        (100, 0.1),
        (1000, 1e-3),
    ]


def test_optional_fields_presence() -> None:
    no_warmup = schedules.CosineDecay(0.1, 100)
    assert not no_warmup.cosine_decay.HasField("warmup_target")
    warmup = schedules.CosineDecay(0.0, 100, warmup_target=0.1, warmup_steps=10)
    assert warmup.cosine_decay.HasField("warmup_target")
    # Keras defaults are sent explicitly, so the server sees exactly what Keras would use.
    poly = schedules.PolynomialDecay(0.1, 100)
    assert poly.polynomial_decay.end_learning_rate == 0.0001
    assert poly.polynomial_decay.power == 1.0
    # An unset optional field comes out as the Keras default.
    config = to_keras_config(pb.Schedule(polynomial_decay=pb.PolynomialDecay(decay_steps=5)))
    assert config["config"]["end_learning_rate"] == 0.0001
    assert config["config"]["power"] == 1.0
    restarts = to_keras_config(pb.Schedule(cosine_decay_restarts=pb.CosineDecayRestarts()))
    assert (restarts["config"]["t_mul"], restarts["config"]["m_mul"]) == (2.0, 1.0)


def test_integral_floats_accepted_for_steps() -> None:
    config = {
        "class_name": "ExponentialDecay",
        "config": {"initial_learning_rate": 0.1, "decay_steps": 1000.0, "decay_rate": 0.5},
    }
    assert from_keras_config(config).exponential_decay.decay_steps == 1000
    assert schedules.PiecewiseConstantDecay([10.0, 20.0], [1, 2, 3]).piecewise_constant_decay.boundaries == [10, 20]
    with pytest.raises(ValueError, match="decay_steps"):
        schedules.ExponentialDecay(0.1, 10.5, 0.5)
    with pytest.raises(TypeError, match="initial_learning_rate"):
        schedules.ExponentialDecay("0.1", 10, 0.5)


def test_values_are_not_validated_client_side() -> None:
    # The server is the single authority on validation.
    s = schedules.ExponentialDecay(-1.0, 0, -5.0)
    assert s.exponential_decay.decay_steps == 0
    assert len(schedules.PiecewiseConstantDecay([2, 1], [0.1]).piecewise_constant_decay.values) == 1


def test_unknown_class_name() -> None:
    with pytest.raises(ValueError, match="'MySchedule'") as info:
        from_keras_config({"class_name": "MySchedule", "config": {}})
    for name in schedules.SUPPORTED_CLASS_NAMES:
        assert name in str(info.value)


def test_unknown_class_name_is_invalid_argument() -> None:
    # lrctl.client.InvalidArgument (a ValueError too), with a field violation.
    with pytest.raises(InvalidArgument) as info:
        from_keras_config({"class_name": "MySchedule", "config": {}})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in info.value.field_violations] == ["class_name"]
    assert type(InvalidArgument.from_message("x")) is InvalidArgument


def test_malformed_configs() -> None:
    with pytest.raises(ValueError, match="class_name"):
        from_keras_config({"config": {}})
    with pytest.raises(ValueError, match="bogus"):
        from_keras_config({"class_name": "Constant", "config": {"learning_rate": 1.0, "bogus": 1}})
    with pytest.raises(ValueError, match="decay_rate"):
        from_keras_config(
            {"class_name": "ExponentialDecay", "config": {"initial_learning_rate": 0.1, "decay_steps": 1}}
        )
    with pytest.raises(TypeError):
        to_schedule(object())


@pytest.mark.parametrize(
    "schedule",
    [schedules.Constant(0.01), schedules.PiecewiseLinear([(0, 0.0), (10, 0.1)])],
    ids=["Constant", "PiecewiseLinear"],
)
def test_lrctl_only_kinds_round_trip(schedule: pb.Schedule) -> None:
    config = to_keras_config(schedule)
    assert config["module"] == "lrctl.client.schedules"
    assert from_keras_config(config) == schedule


def test_to_schedule_forms() -> None:
    expected = schedules.ExponentialDecay(0.1, 100, 0.5)
    assert to_schedule(expected) == expected
    assert to_schedule(expected) is not expected  # a copy
    assert to_schedule(expected.exponential_decay) == expected
    assert to_schedule(to_keras_config(expected)) == expected
    assert to_schedule(0.25) == schedules.Constant(0.25)


def test_describe_schedule() -> None:
    text = schedules.describe_schedule(schedules.ExponentialDecay(0.005, 5, 0.8, staircase=True))
    assert text == (
        "ExponentialDecay(initial_learning_rate=0.005, decay_steps=5, decay_rate=0.8, staircase=True)"
    )
    assert schedules.describe_schedule(pb.Schedule()) == "(none)"


def test_every_proto_kind_is_known_with_the_proto_fields() -> None:
    # The client's kinds are read from the proto's Schedule.kind oneof; adding a kind
    # (or a field) there cannot be forgotten: each needs a public builder whose
    # arguments are exactly the message's fields, in proto order (plus Keras's `name`).
    from lrctl.client import cli

    oneof = pb.Schedule.DESCRIPTOR.oneofs_by_name["kind"]
    assert schedules.SUPPORTED_CLASS_NAMES == tuple(f.message_type.name for f in oneof.fields)
    assert set(cli.SWAP_KINDS) == {f.name.replace("_", "-") for f in oneof.fields}
    for field in oneof.fields:
        message = field.message_type
        proto_fields = [f.name for f in message.fields]
        assert message.name in schedules.__all__
        builder = getattr(schedules, message.name)
        assert [p for p in inspect.signature(builder).parameters if p != "name"] == proto_fields
        kind = cli.SWAP_KINDS[field.name.replace("_", "-")]
        assert (kind.class_name, kind.oneof_field) == (message.name, field.name)
        assert kind.builder is builder
        assert [a.name for a in kind.args] == proto_fields
        assert kind.message().DESCRIPTOR is message


def test_help_text_is_the_proto_comments() -> None:
    from lrctl.client import cli

    kind = cli.SWAP_KINDS["exponential-decay"]
    assert kind.help.startswith("lr(step) = initial_learning_rate * decay_rate ^")
    decay_steps = next(a for a in kind.args if a.name == "decay_steps")
    assert decay_steps.help == "Number of steps per decay period. Must be > 0; zero is invalid."
    knots = cli.SWAP_KINDS["piecewise-linear"].args[0]
    assert "STEP:LR" in knots.help
