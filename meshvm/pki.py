"""Small X.509 helpers: checking the certificate files a configuration names, the lab's API-server certificates,
and placeholder mesh certificates for offline renders."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshvm.errors import ConfigError

VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()


def _builder(
    subject: str, issuer: x509.Name | None, public_key: ec.EllipticCurvePublicKey, validity: dt.timedelta
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
    )


def new_ca(common_name: str, *, uris: tuple[str, ...] = (), validity: dt.timedelta = VALIDITY) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, None, key.public_key(), validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return KeyPair(builder.sign(key, hashes.SHA256()), key)


def issue(
    ca: KeyPair,
    common_name: str,
    *,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = False,
    validity: dt.timedelta = VALIDITY,
) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = _builder(common_name, ca.cert.subject, key.public_key(), validity).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if server:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def spiffe_id(trust_domain: str, service: str, datacenter: str = "dc1") -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}"


def check_certificates(path: Path, what: str, now: dt.datetime | None = None) -> list[x509.Certificate]:
    """Every certificate in the PEM file ``path``; a ConfigError naming the file if it holds none, is not PEM, or
    holds one that is expired or not yet valid."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}", hint="check the path") from exc
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: not a PEM certificate ({exc})") from exc
    for cert in certificates:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        if cert.not_valid_after_utc <= now:
            raise ConfigError(f"{what} {path}: {subject} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
        if cert.not_valid_before_utc > now:
            raise ConfigError(f"{what} {path}: {subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    return certificates
