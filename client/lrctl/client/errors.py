"""Exceptions raised by the lrctl client: one class per gRPC status the caller may handle.

Every client method converts `grpc.RpcError` with `from_rpc_error`, so callers never
see raw gRPC errors. Field-level problems reported by the server as a
`google.rpc.BadRequest` detail are exposed as `field_violations`.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

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

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}" if self.message else self.code.name
        for field, description in self.field_violations:
            text += f"\n  {field}: {description}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r})"


class InvalidArgument(LrctlError):
    """INVALID_ARGUMENT: the request was rejected by validation; see `field_violations`."""


class VersionConflict(LrctlError):
    """ABORTED: `expected_version` did not match the current state version."""

    @property
    def current_version(self) -> int | None:
        """The server's current version, if it sent one (ErrorInfo metadata)."""
        value = self.metadata.get("current_version")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None


class FailedPrecondition(LrctlError):
    """FAILED_PRECONDITION: e.g. `apply_at_step` may already have passed, the change was
    cancelled, or training has ended."""


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


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    if not isinstance(error, grpc.Call):
        return None
    try:
        return rpc_status.from_call(error)
    except ValueError:
        # The trailer's code/message disagree with the call's; ignore the details
        # rather than hide the real error behind a parsing failure.
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
    """Convert a `grpc.RpcError` into the matching `LrctlError` subclass."""
    code = grpc.StatusCode.UNKNOWN
    message = str(error)
    if isinstance(error, grpc.Call):
        code = error.code() or grpc.StatusCode.UNKNOWN
        message = error.details() or ""
    status = _rich_status(error)
    cls = _BY_CODE.get(code, LrctlError)
    return cls(code, message, _field_violations(status), status)
