"""What a schedule kind is made of, and the registry of kinds.

A kind (kinds.py) is one frozen `Spec` dataclass, registered with `@register(form=Form(...))`:
its fields are Keras's arguments with Keras's defaults, `__post_init__` validates them with
the `check_*` helpers here, `derive` computes its form's coefficients, and each `Form` says how
the engine computes it and where its extremes lie. Everything else (the Keras config and JSON,
the proto conversion, the engine's switch) is derived from the registry. Pure Python and numpy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from lrctl.service.errors import InvalidArgumentError

#: Most boundaries (PiecewiseConstantDecay) or knots (PiecewiseLinear) one schedule may have.
#: Variable-length parameters live in fixed-size variables so that a swap never retraces.
CAPACITY = 64
#: Steps are stored exactly in int64 and float64 variables, so they stay below 2**53.
MAX_STEP = 2**53
#: The engine computes in float32: a larger magnitude is inf there.
FLOAT32_MAX = 3.4028234663852886e38
#: Most coefficients a form has.
NUM_COEFFICIENTS = 8
#: Padding of the step table: `step > pad` and `pad <= step` are never true.
PAD_STEP = np.iinfo(np.int64).max


# -- validation: Keras's message shape, "Argument `x` must be ... Received: x=..." --------------
def check_number(field: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    """A number >= `minimum` (> with `inclusive=False`) that is finite in float32, the
    precision the engine computes in; otherwise an InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(field, "must be a number", value)
    ok = value >= minimum if inclusive else value > minimum
    if not math.isfinite(value) or not ok:
        raise InvalidArgumentError(field, f"must be finite and {'>=' if inclusive else '>'} {minimum:g}", value)
    if abs(value) > FLOAT32_MAX:
        raise InvalidArgumentError(field, f"must be finite in float32 (at most {FLOAT32_MAX:.8g})", value)
    return float(value)


def check_learning_rate(field: str, value: object) -> float:
    return check_number(field, value, minimum=0)


def check_fraction(field: str, value: object) -> float:
    number = check_number(field, value, minimum=0)
    if number > 1:
        raise InvalidArgumentError(field, "must be in [0, 1]", value)
    return number


def check_step(field: str, value: object, *, minimum: int) -> int:
    """An integer step count. Integral floats (Keras configs often hold 1000.0) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(field, "must be an integer", value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidArgumentError(field, "must be an integer", value)
    step = int(value)
    if step < minimum:
        raise InvalidArgumentError(field, f"must be >= {minimum}" if minimum != 1 else "must be > 0", value)
    if step > MAX_STEP:
        raise InvalidArgumentError(field, f"must be <= {MAX_STEP}", value)
    return step


def check_increasing(field: str, steps: list[int]) -> None:
    for a, b in itertools.pairwise(steps):
        if b <= a:
            raise InvalidArgumentError(field, "must be strictly increasing", steps)


# -- what a kind declares ------------------------------------------------------------------------
class Terms(NamedTuple):
    """What a spec's `derive` returns: its form, and the values the form computes from, with
    the scale and every constant expression folded in."""

    form: str
    coefficients: dict[str, float]
    steps: tuple[int, ...] = ()  # boundaries or knot steps
    rates: tuple[float, ...] = ()  # values or knot learning rates
    slopes: tuple[float, ...] = ()  # per step after knot i - 1 (from the first knot's left)


@dataclass(frozen=True)
class Derived:
    """What the engine computes a schedule from: its form and float32 coefficients, and the
    tables of the knot kinds (padded to CAPACITY; unused otherwise)."""

    form: str
    coefficients: dict[str, np.float32]
    steps: np.ndarray  # int64[CAPACITY]: boundaries or knot steps, then PAD_STEP
    rates: np.ndarray  # float32[CAPACITY + 1]: values or knot learning rates, then the last
    slopes: np.ndarray  # float32[CAPACITY + 1]: per step after knot i - 1 (PiecewiseLinear)

    def tables(self) -> SimpleNamespace:
        """The `c` argument of the form's function, on the host."""
        return SimpleNamespace(**self.coefficients, steps=self.steps, rates=self.rates, slopes=self.slopes)


#: `compute(x, c, local)`: the learning rate at the (int64, >= 0) local step; `x` is keras.ops
#: in the graph or `HostOps` on the host, `c` holds the named coefficients and the tables.
Compute = Callable[[Any, Any, Any], Any]
#: `candidates(derived, a, b)`: local steps in [a, b] (clipped by the caller) among which the
#: form's smallest and largest learning rates lie, exactly (no sampling: a one-step spike counts).
Candidates = Callable[[Derived, int, int], Sequence[int] | np.ndarray]


def monotone(derived: Derived, a: int, b: int) -> list[int]:
    """Candidates of a form monotone in the step (flat is monotone): the range's ends."""
    return [a, b]


class Spec:
    """Base of every kind's spec: immutable, normalised and validated in `__post_init__`, so
    an invalid spec cannot exist. Its class name is the Keras class name (or ours) and the
    name of its message in the proto's `Schedule` oneof."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every kind is a dataclass
    #: The Keras class name: the spec class's name (set by `register`).
    keras_name: ClassVar[str]
    #: The engine's ways of computing this kind, by form name (set by `register`).
    forms: ClassVar[dict[str, Form]]

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def derive(self, scale: float) -> Terms:
        """The form and coefficients of `scale * self` (unpadded, float64)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """The Keras `get_config()` of the equivalent Keras schedule (tuples become lists)."""
        return {f.name: _listed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items())
        return f"{self.keras_name}({args})"


def _listed(value: object) -> object:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Form:
    """One way the engine computes a learning rate: one branch of its switch."""

    #: The coefficients' names, in the order the engine stores them.
    coefficients: tuple[str, ...]
    compute: Compute
    candidates: Candidates
    #: The kind computed this way (set by `register`).
    spec_type: type[Spec] = Spec


#: Every registered kind, in registration order.
KINDS: list[type[Spec]] = []
#: Every form, by name, in registration order: the engine's `kind` variable holds a form's
#: index here and checkpoints save it, so kinds and forms are only ever appended.
FORMS: dict[str, Form] = {}

S = TypeVar("S", bound=type[Spec])


def register(**forms: Form) -> Callable[[S], S]:
    """Register a spec dataclass as a schedule kind computed in `forms` (by form name)."""

    def add(spec_type: S) -> S:
        assert dataclasses.is_dataclass(spec_type) and spec_type not in KINDS, spec_type
        assert forms and not set(forms) & set(FORMS), (spec_type, sorted(forms))
        assert all(len(form.coefficients) <= NUM_COEFFICIENTS for form in forms.values())
        spec_type.keras_name = spec_type.__name__
        spec_type.forms = {name: dataclasses.replace(form, spec_type=spec_type) for name, form in forms.items()}
        KINDS.append(spec_type)
        FORMS.update(spec_type.forms)
        return spec_type

    return add


# -- what forms compute with on the host --------------------------------------------------------
class HostOps:
    """The operations the forms use, in numpy, under the names keras.ops gives them."""

    cos, log, floor, ceil, power = np.cos, np.log, np.floor, np.ceil, np.power
    minimum, maximum, where, take, sum = np.minimum, np.maximum, np.where, np.take, np.sum
    greater, less_equal = np.greater, np.less_equal

    @staticmethod
    def cast(value: Any, dtype: str) -> Any:
        return np.asarray(value).astype(dtype)[()]


def first_steps(period: Callable[[np.ndarray], np.ndarray], wanted: np.ndarray, a: int, b: int) -> np.ndarray:
    """For each period index in `wanted`, the first step in [a, b] (b + 1: none) whose period,
    as the float32 formula computes it (non-decreasing in the step), is at least that index:
    a bisection on the formula itself, so float32 rounding cannot move a boundary unseen."""
    lo = np.full(wanted.shape, a, np.int64)
    hi = np.full(wanted.shape, b + 1, np.int64)
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        reached = period(mid) >= wanted
        hi = np.where(open_ & reached, mid, hi)
        lo = np.where(open_ & ~reached, mid + 1, lo)
    return lo
