"""Guardrails: the trainer's own limits on what any client may ask for.

Pure Python. The controller checks a change when it arrives, against the state it will meet
(the pending changes due before it applied first), and again at the step boundary where it
applies: its learning rate must stay within the bounds at every step of the trainer's horizon
(exact extremes, `forms.extremes`). A refused change names its rule.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lrctl.service.control.limits import APPLY_HORIZON
from lrctl.service.errors import FailedPreconditionError, ResourceExhaustedError
from lrctl.service.schedules import forms
from lrctl.service.schedules.registry import check_number
from lrctl.service.schedules.specs import ActiveSchedule

#: Points at which a validate_only request's preview shows the learning rate.
POINTS = 33
#: Steps from a change's step over which its learning rate must stay within the bounds.
DEFAULT_HORIZON = 10_000


@dataclass(frozen=True)
class Guardrails:
    """Limits on the learning rate a change may give, and on how often changes may come.

    The defaults limit nothing (beyond float32), as a library should; `lrctl-trainer` sets
    sane ones (see its --help).
    """

    min_learning_rate: float = 0.0
    max_learning_rate: float = math.inf
    #: Refuse a learning rate more than this many times (or less than 1/this of) the current
    #: one at the step where the change applies, unless the request says `force`. None: off.
    max_change_factor: float | None = None
    #: Accepted changes per minute, as a token bucket holding a minute's worth. None: off.
    max_changes_per_minute: float | None = None
    #: Reported only: TrainingControl(revert_on_nan=K) acts on it (see integration.py).
    revert_on_nan_steps: int = 0
    #: A change's learning rate must stay within the bounds at every step from the step where
    #: it applies to this many steps after it (the trainer's choice, never the client's).
    horizon_steps: int = DEFAULT_HORIZON
    #: Bounds on hyperparameters by name: (name, min, max), inclusive, None: that side open.
    #: SetParameters refuses a value outside them (a GUARDRAIL refusal).
    parameter_bounds: tuple[tuple[str, float | None, float | None], ...] = ()

    def __post_init__(self) -> None:
        check_number("min_learning_rate", self.min_learning_rate, minimum=0)
        if not self.max_learning_rate >= self.min_learning_rate:
            raise ValueError(f"max_learning_rate must be >= min_learning_rate ({self.min_learning_rate}). "
                             f"Received: max_learning_rate={self.max_learning_rate}")
        if self.max_change_factor is not None:
            check_number("max_change_factor", self.max_change_factor, minimum=1)
        if self.max_changes_per_minute is not None:
            check_number("max_changes_per_minute", self.max_changes_per_minute, minimum=0, inclusive=False)
        if isinstance(self.horizon_steps, bool) or not isinstance(self.horizon_steps, int) \
                or not 1 <= self.horizon_steps <= APPLY_HORIZON:
            raise ValueError(f"horizon_steps must be an integer in [1, {APPLY_HORIZON}]. "
                             f"Received: horizon_steps={self.horizon_steps}")
        for name, lo, hi in self.parameter_bounds:
            if lo is not None and hi is not None and not hi >= lo:
                raise ValueError(f"parameter_bounds[{name}]: max must be >= min. Received: {lo}:{hi}")

    def parameter_bound(self, name: str) -> tuple[float | None, float | None]:
        """(min, max) of `name` (None: that side open)."""
        for bound_name, lo, hi in self.parameter_bounds:
            if bound_name == name:
                return lo, hi
        return None, None

    def check_parameter(self, name: str, value: float) -> None:
        """FailedPreconditionError (GUARDRAIL) naming the parameter if `value` leaves its bounds."""
        lo, hi = self.parameter_bound(name)
        if lo is not None and not value >= lo:
            raise _refused(f"parameter_bounds[{name}]", f"{name}={value:g} is below the trainer's "
                           f"bound {lo:g}")
        if hi is not None and not value <= hi:
            raise _refused(f"parameter_bounds[{name}]", f"{name}={value:g} is above the trainer's "
                           f"bound {hi:g}")

    @property
    def float32_bounds(self) -> tuple[float, float]:
        """[min, max] as the engine holds them: rounded to float32, the precision of the LR."""
        lo, hi = np.float32(self.min_learning_rate), np.float32(self.max_learning_rate)
        return float(lo), float(hi)

    def check_bounds(self, points: Sequence[tuple[int, float]]) -> None:
        """FailedPreconditionError naming the rule if any (step, lr) leaves [min, max]. The
        comparisons are written so that a NaN fails them."""
        lo, hi = self.float32_bounds
        for step, lr in points:
            if not lr <= hi:
                raise _refused("max_learning_rate", f"the learning rate would be {lr:g} at step {step}, "
                               f"above the trainer's max_learning_rate {self.max_learning_rate:g}")
            if not lr >= lo:
                raise _refused("min_learning_rate", f"the learning rate would be {lr:g} at step {step}, "
                               f"below the trainer's min_learning_rate {self.min_learning_rate:g}")

    def check_schedule(self, state: ActiveSchedule, step: int) -> forms.Extremes:
        """Refuse `state` if its learning rate leaves [min, max] at any step of the horizon
        from `step` (exactly: its extremes there); return them."""
        extremes = forms.extremes(state, step, step + self.horizon_steps)
        self.check_bounds([(extremes.max_step, extremes.max_lr), (extremes.min_step, extremes.min_lr)])
        return extremes

    def check_factor(self, before: float, after: float, step: int) -> None:
        factor = self.max_change_factor
        if factor is None or after == before:
            return
        if before == 0 or not 1 / factor <= after / before <= factor:
            raise _refused("max_change_factor", f"the learning rate would go from {before:g} to {after:g} "
                           f"at step {step}, more than the trainer's max_change_factor {factor:g}; "
                           "set force to do it anyway")


NO_GUARDRAILS = Guardrails()


def _refused(rule: str, message: str) -> FailedPreconditionError:
    return FailedPreconditionError(f"guardrail {rule}: {message}", field=rule, kind="GUARDRAIL")


def sample(state: ActiveSchedule, start: int, horizon: int) -> list[tuple[int, float]]:
    """(step, learning rate) at POINTS steps spread evenly over [start, start + horizon]: a
    preview to draw, not a check."""
    steps = np.unique(start + np.round(np.arange(POINTS) * (horizon / (POINTS - 1))).astype(np.int64))
    return list(zip(steps.tolist(), forms.learning_rates(state, steps).tolist()))


class RateLimiter:
    """A token bucket: `rate_per_minute` tokens a minute, holding at most a minute's worth."""

    def __init__(self, rate_per_minute: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_minute
        self._clock = clock
        self._tokens = rate_per_minute or 0.0
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> None:
        """Spend one token, or raise ResourceExhaustedError naming the rule."""
        if self._rate is None:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate / 60)
            self._last = now
            if self._tokens < 1:
                raise ResourceExhaustedError(
                    f"guardrail max_changes_per_minute: the trainer accepts at most {self._rate:g} "
                    "changes a minute; retry later", reason="RATE_LIMITED")
            self._tokens -= 1
