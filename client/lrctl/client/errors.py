"""Exceptions raised by the lrctl client: one class per gRPC status the caller may handle.

Every client method converts `grpc.RpcError` with `from_rpc_error`, so callers never
see raw gRPC errors. Field-level problems reported by the server as a
`google.rpc.BadRequest` detail are exposed as `field_violations`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:  # typing.Self is 3.11+
    from typing_extensions import Self

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LrctlError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "from_rpc_error",
]


class LrctlError(Exception):
    """A failed lrctl RPC.

    Attributes:
        code: the gRPC status code.
        message: the server's (or gRPC's) error message.
        field_violations: `(field, description)` pairs from a `google.rpc.BadRequest`
            detail; empty when the server sent none.
        reason: `google.rpc.ErrorInfo.reason` (e.g. "VERSION_CONFLICT"); "" if none.
        metadata: `google.rpc.ErrorInfo.metadata` (e.g. {"current_version": "3"}).
        status: the full `google.rpc.Status`, or None when the server sent no rich
            status.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: list[tuple[str, str]] | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])
        self.status = status
        self.reason = ""
        self.metadata: dict[str, str] = {}
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason, self.metadata = info.reason, dict(info.metadata)

    #: The status a locally raised error of this class carries (`from_message`).
    CODE: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    @classmethod
    def from_message(
        cls, message: str, field_violations: list[tuple[str, str]] | None = None
    ) -> Self:
        """An error raised by the client itself, before any RPC (no rich status), with the
        class's status code: `InvalidArgument.from_message("...", [("field", "why")])`."""
        return cls(cls.CODE, message, field_violations)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else self.code.name
        for field, description in self.field_violations:
            text += f"\n  {field}: {description}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r})"


class InvalidArgument(LrctlError, ValueError):
    """INVALID_ARGUMENT: the request was rejected by validation; see `field_violations`.

    Also raised by the client itself for a value it cannot even send (e.g. a schedule
    config with an unknown `class_name`); it is a `ValueError` too, for code that
    caught those before."""

    CODE = grpc.StatusCode.INVALID_ARGUMENT


class VersionConflict(LrctlError):
    """ABORTED: `expected_version` did not match the current state version."""

    @property
    def current_version(self) -> int | None:
        """The server's current version, if it sent one (ErrorInfo metadata)."""
        value = self.metadata.get("current_version")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None


class FailedPrecondition(LrctlError):
    """FAILED_PRECONDITION: e.g. `apply_at_step` may already have passed, the change was
    cancelled, or training has ended. A fence that did not hold sets `reason`
    "RUN_ID_MISMATCH" (`metadata["current_run_id"]`) or "INCARNATION_MISMATCH" (the trainer
    process restarted: `metadata["current_incarnation"]`)."""


class DeadlineExceeded(LrctlError):
    """DEADLINE_EXCEEDED: the RPC deadline passed (a waited-for change stays pending)."""


class Unavailable(LrctlError):
    """UNAVAILABLE: the server could not be reached (after retries)."""


class NotFound(LrctlError):
    """NOT_FOUND: e.g. an unknown change to cancel, or an unknown service in a health check."""


class ResourceExhausted(LrctlError):
    """RESOURCE_EXHAUSTED: a server bound was reached (pending changes, waiting calls,
    open streams); retry later, or without `wait`."""


class Internal(LrctlError):
    """INTERNAL: the trainer failed to apply a change; nothing changed."""


class PermissionDenied(LrctlError):
    """PERMISSION_DENIED: the caller may not perform this operation."""


class Unauthenticated(LrctlError):
    """UNAUTHENTICATED: missing or invalid credentials."""


_DETAILS_KEY = "grpc-status-details-bin"

_BY_CODE: dict[grpc.StatusCode, type[LrctlError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ABORTED: VersionConflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


for _code, _cls in _BY_CODE.items():
    _cls.CODE = _code


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    # Duck-typed: `grpc.aio.AioRpcError` has the same methods but is not a `grpc.Call`.
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(trailing):
        return None
    try:
        for key, value in trailing() or ():
            if key == _DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
                code = error.code() if callable(getattr(error, "code", None)) else None
                # A trailer that disagrees with the call's code is ignored rather than
                # hiding the real error behind a parsing failure.
                if code is not None and status.code != code.value[0]:
                    return None
                return status
    except Exception:  # noqa: BLE001 -- a malformed trailer must not hide the error
        return None
    return None


def _field_violations(status: status_pb2.Status | None) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    if status is None:
        return violations
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return violations


def from_rpc_error(error: grpc.RpcError) -> LrctlError:
    """Convert a `grpc.RpcError` (sync, or `grpc.aio.AioRpcError`) into the matching
    `LrctlError` subclass, with the field violations and ErrorInfo of its rich status."""
    code = grpc.StatusCode.UNKNOWN
    message = str(error)
    if callable(getattr(error, "code", None)) and callable(getattr(error, "details", None)):
        code = error.code() or grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
        message = error.details() or ""  # type: ignore[attr-defined]
    status = _rich_status(error)
    cls = _BY_CODE.get(code, LrctlError)
    return cls(code, message, _field_violations(status), status)
