"""Domain errors, raised by every layer (a leaf: imports nothing of lrctl). The servicer maps each
class to one gRPC status code, in one place."""

from __future__ import annotations


class InvalidArgumentError(ValueError):
    """A request field breaks a rule. Worded the way Keras words its errors.

    `field` is relative to the object that was validated (e.g. ``decay_steps``);
    the servicer prefixes it with the request path (``schedule.exponential_decay.``).
    """

    def __init__(self, field: str, rule: str, received: object) -> None:
        self.field = field
        self.rule = rule
        self.received = received
        super().__init__(f"Argument `{field}` {rule}. Received: {field}={received}")

    def with_prefix(self, prefix: str) -> InvalidArgumentError:
        """The same error with its field moved under `prefix` (e.g. ``schedule.cosine_decay.``)."""
        return InvalidArgumentError(prefix + self.field, self.rule, self.received)


class VersionConflictError(Exception):
    """`expected_version` did not match the state version (optimistic concurrency)."""

    def __init__(self, expected: int, current: int, *, step: int | None = None) -> None:
        self.expected = expected
        self.current = current
        self.step = step  #: the boundary where it was checked; None: when the request arrived
        where = "" if step is None else f" at step {step}, where the change was due"
        super().__init__(
            f"expected_version={expected} does not match the current version {current}{where}; "
            "nothing changed: read the state again and retry"
        )


class FailedPreconditionError(Exception):
    """The request is well-formed but the run is not in a state that allows it.

    `field` names what failed (a request field such as ``apply_at_step``, or a guardrail);
    `kind` is the google.rpc.PreconditionFailure violation type: STEP, PHASE or GUARDRAIL.
    """

    def __init__(self, message: str, field: str = "", kind: str = "") -> None:
        self.field = field
        self.kind = kind or ("STEP" if field else "PHASE")
        super().__init__(message)


class WaitTimeoutError(TimeoutError):
    """Waiting for a change ran out of time. The change stays pending."""


class NotFoundError(LookupError):
    """The request names a change the server does not know (or no longer remembers), or a
    checkpoint that does not exist. `resource_type` is google.rpc.ResourceInfo's."""

    resource_type = "lrctl.v1.Change"


class PermissionDeniedError(Exception):
    """The request names something outside what this trainer may touch (a checkpoint path
    outside --checkpoint-root). PERMISSION_DENIED: no retry or other token makes it allowed."""


class ResourceExhaustedError(Exception):
    """A bound was reached (pending changes, waiting calls, streams, the change rate); retry
    later. `reason` is the google.rpc.ErrorInfo reason."""

    def __init__(self, message: str, reason: str = "LIMIT_REACHED") -> None:
        self.reason = reason
        super().__init__(message)


class RequestIdReusedError(Exception):
    """A request_id came back with a different payload: it is not a retry, and would be
    silently answered with another change's result if it were treated as one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(
            f"request_id {request_id!r} was already used for a different change; "
            "send a fresh request_id for each new change"
        )


class ApplyError(Exception):
    """The training thread could not apply a change (the engine raised). Nothing changed."""


class UnavailableError(FailedPreconditionError):
    """The trainer takes no changes now: it is shutting down (SIGTERM/SIGINT; `reason`
    SHUTTING_DOWN) or still starting (STARTING). UNAVAILABLE, not FAILED_PRECONDITION, because
    the condition is transient: a retry with the same request_id once it has (re)started is the
    right reaction. A subclass, so in-process callers that catch FailedPreconditionError keep
    working. `reason` is the google.rpc.ErrorInfo reason."""

    def __init__(self, message: str, reason: str = "SHUTTING_DOWN") -> None:
        self.reason = reason
        super().__init__(message, kind="STARTUP" if reason == "STARTING" else "SHUTDOWN")


class RunIdMismatchError(FailedPreconditionError):
    """Fencing: `expected_run_id` is not the current run's id (the trainer restarted as a new
    run, or the client talks to another run). FAILED_PRECONDITION with ErrorInfo reason
    RUN_ID_MISMATCH and metadata current_run_id."""

    reason = "RUN_ID_MISMATCH"
    subject = "run id"

    def __init__(self, expected: str, current: str) -> None:
        self.expected = expected
        self.current = current
        field = "expected_" + self.subject.replace(" ", "_")
        super().__init__(
            f"{field}={expected!r} does not match the current {self.subject} {current!r}: the "
            "trainer restarted or this is another run; read the state again before changing it",
            field=field, kind=self.reason.removesuffix("_MISMATCH"))


class IncarnationMismatchError(RunIdMismatchError):
    """Fencing on the process: `expected_incarnation` is not this process's incarnation id (a
    new one is drawn at every start, a resume from a checkpoint included). FAILED_PRECONDITION
    with ErrorInfo reason INCARNATION_MISMATCH and metadata current_incarnation."""

    reason = "INCARNATION_MISMATCH"
    subject = "incarnation"
