"""A VM workload's Istio identity: its key (made on the VM, never sent anywhere), the CSR for its SPIFFE ID, and the
certificate istiod signs, with the arithmetic of when to renew it. Pure functions, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshvm.errors import OperationFailedError

RENEW_AT = 0.5  # renew once half the certificate's life has passed, as Istio's agent does


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def csr_pem(key: ec.EllipticCurvePrivateKey, identity: str) -> str:
    """A CSR whose only name is the SPIFFE ID (istiod signs exactly the identity it authenticated)."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshvm")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Certificate:
    """An issued workload certificate: the chain as istiod sent it (leaf first) and what matters about the leaf."""

    chain_pem: str
    identity: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime

    def renew_after(self) -> dt.datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.not_after


def _spki(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def parse_chain(chain: list[str] | str, key: ec.EllipticCurvePrivateKey | None = None) -> Certificate:
    """The leaf of ``chain``; with ``key``, also checks that the leaf is for that key."""
    text = "".join(p if p.endswith("\n") else p + "\n" for p in chain) if isinstance(chain, list) else chain
    try:
        certificates = x509.load_pem_x509_certificates(text.encode())
    except ValueError as exc:
        raise OperationFailedError(f"the workload certificate chain is not valid PEM: {exc}") from exc
    leaf = certificates[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise OperationFailedError("the workload certificate has no SPIFFE ID (no subjectAltName)") from exc
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise OperationFailedError(f"the workload certificate names {uris or 'no URI'}, not one SPIFFE ID")
    if key is not None and _spki(leaf.public_key()) != _spki(key.public_key()):
        raise OperationFailedError("the workload certificate is not for this VM's key")
    return Certificate(
        chain_pem=text,
        identity=uris[0],
        serial=format(leaf.serial_number, "x"),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )
