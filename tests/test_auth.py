"""Tokens, roles, TLS and mutual TLS: every RPC against every credential, on the real server.

Certificates are made per test module by tests/pki.py (a throwaway CA, a server certificate
for 127.0.0.1, a client certificate).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import keras
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pki import make_pki

from lrctl.client import LrctlError, TrainingControlClient, schedules
from lrctl.client.client import tls_credentials
from lrctl.service import TrainingControl
from lrctl.service.rpc.auth import is_loopback, server_credentials
from lrctl.service.rpc.journal import Journal, read
from lrctl.service.rpc.server import serve
from lrctl.v1 import training_control_pb2 as pb
from lrctl.v1 import training_control_pb2_grpc as pb_grpc

WRITE, READ = "w" * 32, "r" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


MODES = ["plaintext", "tls", "mtls"]


@pytest.fixture(params=MODES)
def server(request, pki, tmp_path) -> Iterator[tuple[str, Callable[..., TrainingControlClient], Path]]:
    mode = request.param
    credentials = None if mode == "plaintext" else server_credentials(
        pki["server_crt"], pki["server_key"], pki["ca_crt"] if mode == "mtls" else None)
    control = TrainingControl(keras.optimizers.SGD(0.01))
    journal_path = tmp_path / "journal.jsonl"
    with serve(control.controller, "127.0.0.1:0", write_tokens=[WRITE], read_tokens=[READ],
               credentials=credentials, journal=Journal(journal_path)) as (_, port):

        def connect(token: str | None = None, *, client_cert: bool = True) -> TrainingControlClient:
            channel_credentials = None
            if mode != "plaintext":
                with_cert = mode == "mtls" and client_cert
                channel_credentials = tls_credentials(
                    pki["ca_crt"], pki["client_crt"] if with_cert else None,
                    pki["client_key"] if with_cert else None)
            return TrainingControlClient(f"127.0.0.1:{port}", timeout=20, token=token,
                                         credentials=channel_credentials)
        yield mode, connect, journal_path


CALLS: dict[str, Callable[[TrainingControlClient], object]] = {
    "GetState": lambda c: c.get_state(),
    "WatchState": lambda c: next(iter(c.watch(timeout=20))),
    "ListChanges": lambda c: c.list_changes(),
    "GetChange": lambda c: c.get_change("changes/999999"),
    "WaitChange": lambda c: c.wait_change("changes/999999", timeout=20),
    "SetLearningRate": lambda c: c.set_learning_rate(0.02, apply_at_step=10**6),
    "SwapSchedule": lambda c: c.swap_schedule(schedules.CosineDecay(0.01, 100), apply_at_step=10**6),
    "CancelChange": lambda c: c.cancel_change(request_id="no-such-change"),
    "ListMeasurements": lambda c: c.list_measurements(),
}
READS = {"GetState", "WatchState", "ListChanges", "GetChange", "WaitChange", "ListMeasurements"}
UNKNOWN_CHANGE = {"CancelChange", "GetChange", "WaitChange"}  # name a change that does not exist


def _outcome(call: Callable[[TrainingControlClient], object], client: TrainingControlClient) -> str:
    try:
        call(client)
    except LrctlError as e:
        return e.code.name
    return "OK"


@pytest.mark.parametrize("who", ["none", "wrong", "read", "write"])
def test_the_auth_matrix(server, who) -> None:
    mode, connect, journal_path = server
    token = {"none": None, "wrong": "x" * 32, "read": READ, "write": WRITE}[who]
    with connect(token) as client:
        for name, call in CALLS.items():
            if who in ("none", "wrong"):
                expected = "UNAUTHENTICATED"
            elif who == "read" and name not in READS:
                expected = "PERMISSION_DENIED"
            else:
                expected = "NOT_FOUND" if name in UNKNOWN_CHANGE else "OK"
            assert _outcome(call, client) == expected, (mode, who, name)
        # Probes and reflection stay open, with or without a token.
        assert client.health() == "SERVING"
        assert "lrctl.v1.TrainingControlService" in \
            ProtoReflectionDescriptorDatabase(client.channel).get_services()
    # Refused mutations are journaled too, with the code and no token anywhere.
    entries = read(journal_path)
    assert len(entries) == 3 and all(WRITE not in str(e) and READ not in str(e) for e in entries)
    assert {e["role"] for e in entries} == {{"none": "", "wrong": ""}.get(who, who)}


#: Issue 19's mutations (hyperparameters and run control, LoadCheckpoint above all): each needs
#: the write role. What they answer with it depends on the trainer (no checkpoint folder or
#: root here: FAILED_PRECONDITION), never a refusal of the caller.
RUN_CONTROL: dict[str, Callable[[TrainingControlClient], object]] = {
    "SetOptimizerParameters": lambda c: c.set_optimizer_parameters({"momentum": 0.5}, apply_at_step=10**6),
    "PauseTraining": lambda c: c.pause_training(apply_at_step=10**6),
    "ResumeTraining": lambda c: c.resume_training(apply_at_step=10**6),
    "SaveCheckpoint": lambda c: c.save_checkpoint(apply_at_step=10**6),
    "StopTraining": lambda c: c.stop_training(apply_at_step=10**6),
    "LoadCheckpoint": lambda c: c.load_checkpoint("a", apply_at_step=10**6),
}


@pytest.mark.parametrize("server", ["plaintext"], indirect=True)
def test_run_control_and_hyperparameters_need_the_write_role(server) -> None:
    _, connect, _ = server
    for token, refused in ((None, "UNAUTHENTICATED"), ("x" * 32, "UNAUTHENTICATED"),
                           (READ, "PERMISSION_DENIED"), (WRITE, None)):
        with connect(token) as client:
            for name, call in RUN_CONTROL.items():
                outcome = _outcome(call, client)
                if refused is not None:
                    assert outcome == refused, (token, name, outcome)
                else:
                    assert outcome not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), (name, outcome)


@pytest.mark.parametrize("server", ["mtls"], indirect=True)
def test_mutual_tls_refuses_a_client_without_a_certificate(server) -> None:
    _, connect, _ = server
    with connect(WRITE, client_cert=False) as client:
        with pytest.raises(LrctlError) as info:
            client.get_state(timeout=5)
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_serve_beyond_loopback_needs_a_token_or_mutual_tls(pki) -> None:
    control = TrainingControl(keras.optimizers.SGD(0.01))
    tls = server_credentials(pki["server_crt"], pki["server_key"])
    mtls = server_credentials(pki["server_crt"], pki["server_key"], pki["ca_crt"])
    for credentials in (None, tls):  # TLS alone encrypts, but anyone who connects may write
        with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0:0 without "
                           r"authentication.*write_tokens.*insecure=True"), \
                serve(control.controller, "0.0.0.0:0", credentials=credentials):
            pytest.fail("served beyond loopback without authentication")
    for options in ({"write_tokens": [WRITE]}, {"credentials": mtls}, {"insecure": True}):
        with serve(control.controller, "0.0.0.0:0", **options) as (_, port):
            assert port > 0
    assert is_loopback("127.0.0.1:0") and is_loopback("[::1]:1") and is_loopback("localhost:1")
    assert is_loopback("unix:/tmp/lrctl.sock")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("[::]:1") and not is_loopback("example.org:1")


def test_a_plaintext_health_port_answers_probes_and_nothing_else(pki, caplog) -> None:
    """For kubelet's gRPC probes, which cannot speak TLS: health alone, without TLS or token."""
    caplog.set_level("INFO", logger="lrctl.server")
    control = TrainingControl(keras.optimizers.SGD(0.01))
    credentials = server_credentials(pki["server_crt"], pki["server_key"])
    with serve(control.controller, "127.0.0.1:0", write_tokens=[WRITE], credentials=credentials,
               health_address="127.0.0.1:0"):
        (port,) = re.findall(r"health checks alone, plaintext, on 127\.0\.0\.1:0 \(port (\d+)\)",
                             caplog.text)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service=""), timeout=20).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert check(health_pb2.HealthCheckRequest(service="lrctl.v1.TrainingControlService"),
                         timeout=20).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.TrainingControlServiceStub(channel).GetState(
                    pb.GetStateRequest(), timeout=20, metadata=(("authorization", f"Bearer {WRITE}"),))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as info:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
