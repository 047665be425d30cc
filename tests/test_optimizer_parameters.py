"""SetOptimizerParameters against real Keras optimizers in a compiled `fit`.

Parity: training with a live change at step k gives the same weights as a plain Keras run built
with the new value and restored from the step-k state (weights and every optimizer variable
copied into a freshly built optimizer). No retrace: the trace count is the plain run's. Refusals
(structure, ranges, unknown names, guardrails) change nothing and training goes on.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import keras
import numpy as np
import pytest

from lrctl.client import TrainingControlClient, cli, errors
from lrctl.service import TrainingControl
from lrctl.service.control.changes import ChangeRequest, ChangeStatus, SetParameters
from lrctl.service.control.guardrails import Guardrails
from lrctl.service.errors import FailedPreconditionError, InvalidArgumentError
from tests.live import LiveTrainer, state_until

STEPS, BATCH = 6, 4


class Counting(keras.Sequential):
    traces = 0

    def train_step(self, data: Any) -> Any:
        self.traces += 1
        return super().train_step(data)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 3)).astype("float32")
    return x, (x @ np.array([[3.0], [-2.0], [5.0]], "float32") + 4.0).astype("float32")


def _model(optimizer: keras.optimizers.Optimizer, **compile_options: Any) -> Counting:
    keras.utils.set_random_seed(1)
    model = Counting([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse", **compile_options)
    return model


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, callbacks: list[Any] = (), **options: Any) -> None:
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks), **options)


CASES = [
    (keras.optimizers.SGD, {"momentum": 0.5}, {"momentum": 0.9}),
    (keras.optimizers.SGD, {"momentum": 0.5, "nesterov": True}, {"momentum": 0.2}),
    (keras.optimizers.RMSprop, {"momentum": 0.5}, {"momentum": 0.8, "epsilon": 1e-3}),
    (keras.optimizers.Adam, {}, {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    (keras.optimizers.AdamW, {"weight_decay": 0.004}, {"weight_decay": 0.2, "beta_1": 0.7}),
    (keras.optimizers.Adamax, {}, {"beta_1": 0.6, "beta_2": 0.95, "epsilon": 1e-2}),
    (keras.optimizers.Nadam, {}, {"beta_1": 0.6, "beta_2": 0.95}),
    (keras.optimizers.SGD, {"clipnorm": 1.0}, {"clipnorm": 0.1}),
    (keras.optimizers.Adam, {"global_clipnorm": 1.0}, {"global_clipnorm": 0.05}),
    (keras.optimizers.SGD, {"clipvalue": 0.5}, {"clipvalue": 0.01}),
    (keras.optimizers.SGD, {"weight_decay": 0.01}, {"weight_decay": 0.3}),
]


def _parity(cls: type, old: dict[str, Any], new: dict[str, float], k: int = 3,
            **compile_options: Any) -> None:
    x, y = _data()
    lr = 0.05
    # Live: one fit, the change due at step k.
    live = _model(cls(learning_rate=lr, **old), **compile_options)
    control = TrainingControl(live.optimizer)
    control.controller.submit(ChangeRequest(SetParameters(tuple(sorted(new.items()))), apply_at_step=k))
    _fit(live, x, y, [control.callback])
    change = control.controller.snapshot().recent[-1]
    assert change.status is ChangeStatus.APPLIED and change.applied_step == k
    assert {u.name: u.after for u in change.parameter_updates} == pytest.approx(new)
    # Reference: plain Keras for k steps, then a fresh optimizer built with the new values
    # and the step-k state.
    first = _model(cls(learning_rate=lr, **old), **compile_options)
    _fit(first, x[:k * BATCH], y[:k * BATCH])
    second = _model(cls(learning_rate=lr, **{**old, **new}), **compile_options)
    second.optimizer.build(second.trainable_variables)
    second.set_weights(first.get_weights())
    assert len(second.optimizer.variables) == len(first.optimizer.variables)
    for target, source in zip(second.optimizer.variables, first.optimizer.variables):
        target.assign(source)
    _fit(second, x[k * BATCH:], y[k * BATCH:])
    for a, b in zip(live.get_weights(), second.get_weights()):
        # float32: Keras folds `1 - beta` in float64 before the cast; the live value is
        # float32 before the subtraction (one rounding apart, amplified a little by Adam).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert live.traces == first.traces  # no retrace for the change
    snap = control.controller.snapshot()
    values = {h.name: h.value for h in snap.hyperparameters}
    for name, value in new.items():
        assert values[name] == pytest.approx(value)
    assert int(live.optimizer.iterations.numpy()) == STEPS


@pytest.mark.parametrize(("cls", "old", "new"), CASES,
                         ids=[f"{c.__name__}-{'-'.join(n)}" for c, _, n in CASES])
def test_a_live_change_matches_keras_built_with_the_new_value(cls: type, old: dict[str, Any],
                                                              new: dict[str, float]) -> None:
    _parity(cls, old, new)


def test_parity_under_jit_compile() -> None:
    _parity(keras.optimizers.Adam, {}, {"beta_1": 0.5, "epsilon": 1e-3}, jit_compile=True)


def test_parity_with_steps_per_execution() -> None:
    _parity(keras.optimizers.SGD, {"momentum": 0.5}, {"momentum": 0.9}, k=2, steps_per_execution=2)


def _submit(control: TrainingControl, **values: float) -> Any:
    return control.controller.submit(ChangeRequest(SetParameters(tuple(sorted(values.items())))))


def test_refusals_name_the_parameter_change_nothing_and_training_goes_on() -> None:
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.05))  # momentum 0: no slots
    control = TrainingControl(model.optimizer, guardrails=Guardrails(parameter_bounds=(("lr_weight", 0.0, 2.0),)))
    weight = keras.Variable(1.0, name="lr_weight")
    control.register("lr_weight", weight, bounds=(0.0, 5.0))
    with pytest.raises(FailedPreconditionError) as structure:
        _submit(control, momentum=0.9)
    assert structure.value.kind == "OPTIMIZER_STRUCTURE"
    assert "SGD(momentum=0.9)" in str(structure.value) and structure.value.field == "parameters[momentum]"
    with pytest.raises(FailedPreconditionError, match=r"SGD\(clipnorm=1.0\)"):
        _submit(control, clipnorm=0.5)
    with pytest.raises(InvalidArgumentError) as unknown:
        _submit(control, beta_1=0.5)
    assert unknown.value.field == "parameters[beta_1]" and "momentum" in str(unknown.value)
    with pytest.raises(InvalidArgumentError) as bad:
        _submit(control, lr_weight=7.0)
    assert bad.value.field == "parameters[lr_weight]"
    with pytest.raises(FailedPreconditionError) as guard:
        _submit(control, lr_weight=3.0)
    assert guard.value.kind == "GUARDRAIL"
    with pytest.raises(InvalidArgumentError):
        _submit(control, lr_weight=float("nan"))
    assert _submit(control, lr_weight=1.5).status is ChangeStatus.PENDING
    _fit(model, x, y, [control.callback])
    assert float(weight.numpy()) == 1.5
    snap = control.controller.snapshot()
    assert snap.step == STEPS and snap.version == 1
    reported = {h.name: h for h in snap.hyperparameters}
    assert reported["lr_weight"].registered and reported["lr_weight"].value == 1.5
    assert reported["lr_weight"].max_value == 2.0  # the tighter of registration and guardrail
    assert not reported["momentum"].live and "momentum=0" in reported["momentum"].fixed_reason


def test_ranges_are_checked_with_the_field_named() -> None:
    model = _model(keras.optimizers.Adam(0.01, clipnorm=1.0))
    control = TrainingControl(model.optimizer)
    for name, value in (("beta_1", 1.0), ("beta_2", -0.1), ("epsilon", 0.0), ("clipnorm", 0.0),
                        ("clipnorm", 1e39)):
        with pytest.raises(InvalidArgumentError) as e:
            _submit(control, **{name: value})
        assert e.value.field == f"parameters[{name}]"
    with pytest.raises(FailedPreconditionError, match="weight_decay=0.0"):
        _submit(control, weight_decay=0.1)


def test_values_ride_in_the_optimizer_checkpoint_and_resume(tmp_path: Any) -> None:
    x, y = _data()
    model = _model(keras.optimizers.Adam(0.01, beta_1=0.9))
    control = TrainingControl(model.optimizer)
    _submit(control, beta_1=0.5)
    _fit(model, x, y, [control.callback])
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    resumed = _model(keras.optimizers.Adam(0.01, beta_1=0.9))
    resumed_control = TrainingControl(resumed.optimizer)
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(path)
    resumed_control.resync()
    assert {h.name: h.value for h in resumed_control.controller.snapshot().hyperparameters}["beta_1"] == 0.5
    assert float(resumed.optimizer.beta_1.variable.numpy()) == 0.5
    assert resumed.optimizer.beta_1 == 0.9  # the structure Keras traces with is the built one


def test_rpc_client_and_cli(tmp_path: Any) -> None:
    with LiveTrainer(optimizer=keras.optimizers.SGD(0.01, momentum=0.5)).running() as live:
        with TrainingControlClient(live.target, timeout=60) as client:
            change = client.set_optimizer_parameters({"momentum": 0.8}, wait=True, reason="pbt")
            assert change.status == 2 or change.parameter_updates  # applied
            assert [(u.name, u.before, round(u.after, 6)) for u in change.parameter_updates] == [
                ("momentum", 0.5, 0.8)]
            assert change.WhichOneof("action") == "set_optimizer_parameters"
            with pytest.raises(errors.InvalidArgument, match=r"parameters\[beta_2\]"):
                client.set_optimizer_parameters({"beta_2": 0.9})
            with pytest.raises(errors.FailedPrecondition):
                client.set_optimizer_parameters({"clipnorm": 1.0})
            out = StringIO()
            code = cli.main(["--target", live.target, "--timeout", "60", "set-param", "momentum=0.95",
                             "--json"], out=out)
            assert code == 0
            printed = json.loads(out.getvalue())
            assert printed["parameterUpdates"][0]["name"] == "momentum"
            state = state_until(client, lambda s: any(h.name == "momentum" and abs(h.value - 0.95) < 1e-6
                                                      for h in s.hyperparameters))
            momentum = next(h for h in state.hyperparameters if h.name == "momentum")
            assert momentum.live and momentum.max_value == 1.0
            history = [c for c in state.recent_changes if c.parameter_updates]
            assert len(history) == 2
        assert live.error is None


def test_a_keras_file_keeps_the_live_values_and_the_built_structure(tmp_path: Any) -> None:
    from lrctl.service import load_model

    x, y = _data()
    model = _model(keras.optimizers.Adam(0.01, beta_1=0.9))
    control = TrainingControl(model.optimizer)
    _submit(control, beta_1=0.5)
    _fit(model, x, y, [control.callback])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = load_model(path, custom_objects={"Counting": Counting})
    assert float(loaded.optimizer.beta_1.variable.numpy()) == 0.5 and loaded.optimizer.beta_1 == 0.9
    resumed = TrainingControl(loaded.optimizer)
    assert {h.name: h.value for h in resumed.controller.snapshot().hyperparameters}["beta_1"] == 0.5
    np.testing.assert_array_equal(loaded.optimizer.iterations.numpy(), STEPS)
