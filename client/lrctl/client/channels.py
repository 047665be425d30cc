"""How every client channel is set up, sync or asyncio: the target, the retry policy, the
bearer token, TLS, and the error a failed call becomes."""

from __future__ import annotations

import json
from typing import Any

import grpc

from lrctl.client import errors
from lrctl.v1 import training_control_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingControlService"].full_name

# Retry only UNAVAILABLE (server not up yet, connection reset): the request never
# reached the application, so a retry cannot apply a change twice. Changes also
# carry a request_id, so even an ambiguous retry is deduplicated by the server.
# Backoff: 0.1s, 0.2s, 0.4s, 0.8s (randomized, capped by the RPC deadline).
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel_options(extra: Any) -> list[tuple[str, Any]]:
    """The retry configuration, then the caller's options (which override it)."""
    return [("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG), *(extra or ())]


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata: `authorization: Bearer <token>` (works on plaintext channels too,
    where gRPC's call credentials would be refused)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def tls_credentials(ca: str | None = None, cert: str | None = None,
                    key: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` to verify the trainer (None: the system's
    roots), `cert` and `key` to present a client certificate (mutual TLS)."""
    def data(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(data(ca), data(key), data(cert))


def map_error(exc: grpc.RpcError, target: str, transient_failure: bool) -> errors.LrctlError:
    """`errors.from_rpc_error`, except that a deadline that ran out while the channel was
    failing to connect (between UNAVAILABLE retries) is reported as Unavailable."""
    error = errors.from_rpc_error(exc)
    if isinstance(error, errors.DeadlineExceeded) and transient_failure:
        return errors.Unavailable(
            grpc.StatusCode.UNAVAILABLE,
            f"cannot connect to {target}; the deadline passed while retrying",
        )
    return error


def failing_to_connect(channel: grpc.Channel) -> bool:
    """Whether a sync channel is failing to connect, so that a deadline that expires while
    retrying against an unreachable server is reported as Unavailable. The sync channel
    has no public getter; `subscribe()` would cost every `close()` up to 0.2 s (gRPC's
    connectivity thread polls at that period), which `lrctl state` cannot afford."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if not callable(check):
        return False
    try:
        return bool(check(False) == grpc.ChannelConnectivity.TRANSIENT_FAILURE.value[0])
    except Exception:  # noqa: BLE001 -- a best-effort refinement of the error only
        return False
