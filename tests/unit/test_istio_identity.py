"""The VM's Istio identity: key, CSR and certificate handling, token claims, and every renewal decision."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography import x509

from meshvm import pki
from meshvm.errors import OperationFailedError
from meshvm.istio import identity, renewal, tokens

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
ID = "spiffe://cluster.local/ns/meshvm/sa/api"


def certificate(not_before: dt.datetime, hours: float) -> identity.Certificate:
    return identity.Certificate("pem", ID, "1", not_before, not_before + dt.timedelta(hours=hours))


def token(issued: dt.datetime, minutes: float) -> tokens.Token:
    return tokens.Token("t", issued, issued + dt.timedelta(minutes=minutes))


def jwt(claims: dict[str, int]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"e30.{body}.c2ln"


def test_csr_names_only_the_spiffe_id_and_the_issued_chain_must_match_the_key() -> None:
    key = identity.new_key()
    request = x509.load_pem_x509_csr(identity.csr_pem(key, ID).encode())
    names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    ca = pki.new_ca("test Istio CA")
    pair = pki.issue(ca, "api", uris=(ID,))
    parsed = identity.parse_chain([pair.cert_pem, ca.cert_pem], pair.key)
    assert parsed.identity == ID
    assert parsed.renew_after() == parsed.not_before + (parsed.not_after - parsed.not_before) / 2
    with pytest.raises(OperationFailedError, match="not for this VM's key"):
        identity.parse_chain([pair.cert_pem], key)
    with pytest.raises(OperationFailedError, match="no SPIFFE ID"):
        identity.parse_chain([ca.cert_pem])
    assert identity.load_key(identity.key_pem(key)).public_key().public_numbers() == key.public_key().public_numbers()


def test_token_claims_give_its_lifetime_and_bad_tokens_are_refused() -> None:
    parsed = tokens.parse(jwt({"iat": 1_000, "exp": 1_600}))
    assert parsed.issued == dt.datetime.fromtimestamp(1_000, dt.UTC)
    assert parsed.refresh_after() == dt.datetime.fromtimestamp(1_300, dt.UTC)
    for bad in ("not-a-jwt", jwt({"iat": 1}), "a.!!!.c"):
        with pytest.raises(OperationFailedError, match="not a ServiceAccount token"):
            tokens.parse(bad)


def test_no_certificate_yet_means_renew_now() -> None:
    step_plan = renewal.plan(renewal.State(token=token(T0, 60)), T0)
    assert step_plan.steps == (renewal.Step.RENEW_CERTIFICATE,)


def test_a_fresh_certificate_and_token_wait_for_the_earlier_half_life() -> None:
    state = renewal.State(certificate=certificate(T0, 24), token=token(T0, 60))
    step_plan = renewal.plan(state, T0 + dt.timedelta(minutes=1))
    assert step_plan.steps == ()
    assert step_plan.wake == T0 + dt.timedelta(minutes=30), "the token's half life comes first"


def test_past_half_life_each_is_renewed() -> None:
    state = renewal.State(certificate=certificate(T0, 1), token=token(T0, 60))
    step_plan = renewal.plan(state, T0 + dt.timedelta(minutes=31))
    assert step_plan.steps == (renewal.Step.REFRESH_TOKEN, renewal.Step.RENEW_CERTIFICATE)


def test_an_expired_token_is_not_refreshed_and_the_certificate_still_renews() -> None:
    state = renewal.State(certificate=certificate(T0, 1), token=token(T0, 10))
    step_plan = renewal.plan(state, T0 + dt.timedelta(minutes=40))
    assert step_plan.steps == (renewal.Step.RENEW_CERTIFICATE,)


def test_failures_back_off_and_success_resets() -> None:
    state = renewal.State(token=token(T0, 60))
    waits = []
    for _ in range(8):
        state = renewal.failed(state, "istiod away")
        waits.append((renewal.plan(state, T0).wake - T0).total_seconds())
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]
    assert state.last_error == "istiod away"
    recovered = renewal.succeeded(state, certificate=certificate(T0, 24))
    assert recovered.failures == 0
    assert not recovered.last_error
    assert recovered.token == state.token, "a certificate renewal keeps the token"
