"""Tokens, roles, TLS and mutual TLS: every RPC against every credential, on the real server.

Certificates are made per test session with `cryptography` (a throwaway CA, a server
certificate for 127.0.0.1, a client certificate).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import keras
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from lrctl.client import LrctlError, TrainingControlClient, schedules
from lrctl.client.client import tls_credentials
from lrctl.service import TrainingControl
from lrctl.service.auth import server_credentials
from lrctl.service.journal import Journal, read
from lrctl.service.server import serve

WRITE, READ = "w" * 32, "r" * 32


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key, issuer: x509.Name | None, *, ca: bool = False, ip: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("lrctl test CA", None, None, ca=True)
    files = {}

    def write(name: str, key, cert) -> None:
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[name + "_key"], files[name + "_crt"] = str(folder / f"{name}.key"), str(folder / f"{name}.crt")

    write("ca", ca_key, ca)
    write("server", *_issue("127.0.0.1", ca_key, ca.subject, ip="127.0.0.1"))
    write("client", *_issue("orchestrator", ca_key, ca.subject))
    return files


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
    "SetLearningRate": lambda c: c.set_learning_rate(0.02, apply_at_step=10**6),
    "SwapSchedule": lambda c: c.swap_schedule(schedules.CosineDecay(0.01, 100), apply_at_step=10**6),
    "CancelChange": lambda c: c.cancel_change(request_id="no-such-change"),
}
READS = {"GetState", "WatchState", "ListChanges"}


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
                expected = "NOT_FOUND" if name == "CancelChange" else "OK"
            assert _outcome(call, client) == expected, (mode, who, name)
        # Probes and reflection stay open, with or without a token.
        assert client.health() == "SERVING"
        assert "lrctl.v1.TrainingControlService" in \
            ProtoReflectionDescriptorDatabase(client.channel).get_services()
    # Refused mutations are journaled too, with the code and no token anywhere.
    entries = read(journal_path)
    assert len(entries) == 3 and all(WRITE not in str(e) and READ not in str(e) for e in entries)
    assert {e["role"] for e in entries} == {{"none": "", "wrong": ""}.get(who, who)}


@pytest.mark.parametrize("server", ["mtls"], indirect=True)
def test_mutual_tls_refuses_a_client_without_a_certificate(server) -> None:
    _, connect, _ = server
    with connect(WRITE, client_cert=False) as client:
        with pytest.raises(LrctlError) as info:
            client.get_state(timeout=5)
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
