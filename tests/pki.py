"""Throwaway certificates for the TLS tests: a CA, a server certificate for 127.0.0.1 and a
client certificate, made with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer: x509.Name | None,
           *, ca: bool = False, ip: str | None = None
           ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
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


def make_pki(folder: Path) -> dict[str, str]:
    """Write ca, server (for 127.0.0.1) and client certificates and keys as PEM files into
    `folder`; returns their paths as {"ca_crt", "ca_key", "server_crt", ..., "client_key"}."""
    ca_key, ca = _issue("lrctl test CA", None, None, ca=True)
    files: dict[str, str] = {}

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[name + "_key"], files[name + "_crt"] = str(folder / f"{name}.key"), str(folder / f"{name}.crt")

    write("ca", ca_key, ca)
    write("server", *_issue("127.0.0.1", ca_key, ca.subject, ip="127.0.0.1"))
    write("client", *_issue("orchestrator", ca_key, ca.subject))
    return files
