"""The hand-written IstioCertificateRequest/Response codec agrees with the protobuf runtime, field for field."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from meshvm.istio import ca


def _messages() -> tuple[type, type]:
    """The two messages of istio.io/api security/v1alpha1/ca.proto, built from a descriptor (metadata left out)."""
    proto = descriptor_pb2.FileDescriptorProto(name="meshvm_test_ca.proto", package="istio.v1.auth", syntax="proto3")
    request = proto.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=9, label=1)
    request.field.add(name="validity_duration", number=3, type=3, label=1)
    response = proto.message_type.add(name="IstioCertificateResponse")
    response.field.add(name="cert_chain", number=1, type=9, label=3)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")),
        get(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")),
    )


REQUEST, RESPONSE = _messages()


@given(csr=st.text(max_size=3000), validity=st.integers(min_value=0, max_value=2**62))
def test_request_bytes_match_protobuf(csr: str, validity: int) -> None:
    ours = ca.encode_request(csr, validity)
    theirs = REQUEST(csr=csr, validity_duration=validity).SerializeToString(deterministic=True)
    assert ours == theirs
    assert ca.decode_request(ours) == (csr, validity)


@given(chain=st.lists(st.text(max_size=2000), max_size=4))
def test_response_decodes_what_protobuf_encodes(chain: list[str]) -> None:
    wire = RESPONSE(cert_chain=chain).SerializeToString()
    assert ca.decode_response(wire) == chain
    assert ca.encode_response(chain) == wire


def test_unknown_fields_are_skipped() -> None:
    message = REQUEST(csr="x", validity_duration=5)
    wire = message.SerializeToString() + bytes([0x25]) + b"\x01\x02\x03\x04"  # field 4, fixed32
    assert ca.decode_request(wire) == ("x", 5)


@pytest.mark.parametrize("broken", [b"\x0a\x05ab", b"\x18\xff", b"\x0f"])
def test_truncated_or_bad_messages_raise(broken: bytes) -> None:
    with pytest.raises(ValueError, match=r"truncated|wire type|varint"):
        ca.decode_response(broken)
