"""istiod's CA: ``istio.v1.auth.IstioCertificateService/CreateCertificate`` over gRPC, on istiod's port 15012.

The messages are written by hand from Istio's ``security/v1alpha1/ca.proto`` (istio.io/api)::

    message IstioCertificateRequest {
      string csr = 1; int64 validity_duration = 3; google.protobuf.Struct metadata = 4;
    }
    message IstioCertificateResponse { repeated string cert_chain = 1; }

Three scalar fields do not need the protobuf runtime: :func:`encode_request` and :func:`decode_response` speak the
wire format directly (and are tested against it). The server is verified against Istio's root
(``istio-ca-root-cert``) under its Kubernetes name; the caller authenticates either with a Kubernetes
ServiceAccount token (audience ``istio-ca``) or with its current, still valid, Istio certificate (mTLS), which is how
a certificate renews without any token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from meshvm.errors import OperationFailedError, PeerUnreachableError

log = logging.getLogger(__name__)

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
DEFAULT_SERVER_NAME = "istiod.istio-system.svc"
TIMEOUT = 10.0


# --- protobuf wire format (proto3) ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def encode_request(csr_pem: str, validity_seconds: int) -> bytes:
    """IstioCertificateRequest{csr, validity_duration}; metadata (field 4) is for istiod's node authorizer only."""
    csr = csr_pem.encode()
    message = _field(1, 2) + _varint(len(csr)) + csr if csr else b""  # proto3 leaves default values out
    if validity_seconds:
        message += _field(3, 0) + _varint(validity_seconds)
    return message


def decode_request(data: bytes) -> tuple[str, int]:
    """(csr, validity_duration): the inverse of :func:`encode_request`, for tests and diagnostics."""
    csr, validity = "", 0
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            csr = value.decode()
        elif number == 3 and isinstance(value, int):
            validity = value
    return csr, validity


def decode_response(data: bytes) -> list[str]:
    """IstioCertificateResponse.cert_chain: the leaf first, then intermediates, the root last."""
    return [value.decode() for number, value in _fields(data) if number == 1 and isinstance(value, bytes)]


def encode_response(chain: list[str]) -> bytes:
    return b"".join(_field(1, 2) + _varint(len(p.encode())) + p.encode() for p in chain)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Every (field number, value) of a message; unknown fields are skipped as protobuf readers do."""
    found: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            found.append((number, value))
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated length-delimited field")
            found.append((number, data[pos : pos + length]))
            pos += length
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return found


# --- the client -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to istiod's CA: a token, or the current certificate (key and chain, PEM)."""

    token: str | None = None
    cert_chain_pem: str | None = None
    key_pem: str | None = None

    def describe(self) -> str:
        return "a ServiceAccount token" if self.token else "the current Istio certificate"


def create_certificate(
    address: str,
    root_pem: str,
    csr_pem: str,
    credentials: Credentials,
    *,
    validity_seconds: int = 0,
    server_name: str = DEFAULT_SERVER_NAME,
    cluster_id: str = "Kubernetes",
    timeout: float = TIMEOUT,
) -> list[str]:
    """Ask istiod at ``address`` (host:port) to sign ``csr_pem``; returns the certificate chain (PEM each)."""
    import grpc

    client_key = credentials.key_pem.encode() if credentials.key_pem else None
    client_chain = credentials.cert_chain_pem.encode() if credentials.cert_chain_pem else None
    channel_credentials = grpc.ssl_channel_credentials(
        root_certificates=root_pem.encode(), private_key=client_key, certificate_chain=client_chain
    )
    metadata = [("clusterid", cluster_id)]
    if credentials.token:
        metadata.append(("authorization", f"Bearer {credentials.token}"))
    options = [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
    with grpc.secure_channel(address, channel_credentials, options=options) as channel:
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=decode_response)
        try:
            chain: list[str] = call(encode_request(csr_pem, validity_seconds), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}:
                raise PeerUnreachableError(f"istiod's CA at {address} is unreachable: {detail}") from exc
            raise OperationFailedError(
                f"istiod's CA at {address} refused the certificate request ({credentials.describe()}): "
                f"{code.name if code else 'error'}: {detail}"
            ) from exc
    if not chain:
        raise OperationFailedError(f"istiod's CA at {address} answered with no certificate")
    return chain
