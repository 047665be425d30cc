"""Domain errors -> gRPC status, in one place: the code, the message, and `google.rpc`
details (`BadRequest` naming the field, `ErrorInfo` with a reason such as VERSION_CONFLICT)."""

from __future__ import annotations

from typing import Any, NoReturn

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from lrctl.service.errors import (
    ApplyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestIdReusedError,
    ResourceExhaustedError,
    RunIdMismatchError,
    UnavailableError,
    VersionConflictError,
    WaitTimeoutError,
)

#: The errors `status_of` maps; anything else is a bug, left to gRPC (UNKNOWN).
DOMAIN_ERRORS = (InvalidArgumentError, VersionConflictError, FailedPreconditionError, WaitTimeoutError,
                 RequestIdReusedError, NotFoundError, ResourceExhaustedError, ApplyError,
                 PermissionDeniedError)


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort(context: aio.ServicerContext, error: Exception) -> NoReturn:
    """End the call with `error`'s status (a domain error; anything else is re-raised)."""
    status = rpc_status.to_status(status_of(error))
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returns only by raising")


def status_of(error: Exception) -> status_pb2.Status:
    """The google.rpc.Status for a domain error (re-raises anything else)."""
    detail = any_pb2.Any()
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgumentError):
        code = code_pb2.INVALID_ARGUMENT
        rule = f"{error.rule}. Received: {error.received}"
        message = f"{error.field} {rule}"
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=rule)]))
    elif isinstance(error, VersionConflictError):
        code, message = code_pb2.ABORTED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(
            reason="VERSION_CONFLICT", domain="lrctl",
            metadata={"expected_version": str(error.expected), "current_version": str(error.current)}))
    elif isinstance(error, RunIdMismatchError):  # before its base, FailedPreconditionError
        code, message = code_pb2.FAILED_PRECONDITION, str(error)
        name = error.field.removeprefix("expected_")
        detail.Pack(error_details_pb2.ErrorInfo(
            reason=error.reason, domain="lrctl",
            metadata={f"current_{name}": error.current, error.field: error.expected}))
        details.append(_any(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=error.kind, subject=error.field, description=message)])))
    elif isinstance(error, UnavailableError):  # before its base, FailedPreconditionError
        code, message = code_pb2.UNAVAILABLE, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="lrctl"))
    elif isinstance(error, FailedPreconditionError):
        code, message = code_pb2.FAILED_PRECONDITION, str(error)
        detail.Pack(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type=error.kind, subject=error.field, description=message)]))
    elif isinstance(error, WaitTimeoutError):
        code, message = code_pb2.DEADLINE_EXCEEDED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="NOT_YET_APPLIED", domain="lrctl"))
    elif isinstance(error, RequestIdReusedError):
        code, message = code_pb2.INVALID_ARGUMENT, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="REQUEST_ID_REUSED", domain="lrctl",
                                                metadata={"request_id": error.request_id}))
        details.append(_any(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="request_id", description=message)])))
    elif isinstance(error, NotFoundError):
        code, message = code_pb2.NOT_FOUND, str(error)
        detail.Pack(error_details_pb2.ResourceInfo(resource_type=error.resource_type, description=message))
    elif isinstance(error, PermissionDeniedError):
        code, message = code_pb2.PERMISSION_DENIED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="OUTSIDE_CHECKPOINT_ROOT", domain="lrctl"))
    elif isinstance(error, ResourceExhaustedError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain="lrctl"))
    elif isinstance(error, ApplyError):
        code, message = code_pb2.INTERNAL, str(error)
        detail.Pack(error_details_pb2.ErrorInfo(reason="APPLY_FAILED", domain="lrctl"))
    else:
        raise error
    return status_pb2.Status(code=code, message=message, details=[detail, *details])
