"""Consul answers a server that is away and a refusal alike with 500: the text tells them apart, the same way for
the HTTP client and the blocking watches."""

from __future__ import annotations

import pytest

from meshvm.consul.failures import server_error
from meshvm.errors import ExitCode, OperationFailedError, PeerUnreachableError


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (500, "No cluster leader"),
        (500, "rpc error making call: No cluster leader"),
        (500, "No known Consul servers"),
        (500, "No path to datacenter"),
        (500, "rpc error getting client: failed to get conn: dial tcp 10.0.0.5:8300: connect: connection refused"),
        (500, "rpc error making call: i/o timeout"),
        (500, ""),  # nothing said: nothing to tell it from an outage
        (502, "Bad Gateway"),  # a proxy in front of Consul
        (503, "anything"),
        (504, "Gateway Timeout"),
    ],
)
def test_servers_away_is_unreachable(status: int, text: str) -> None:
    error = server_error("listing ACL policies", status, text)
    assert isinstance(error, PeerUnreachableError)
    assert error.exit_code == ExitCode.UNREACHABLE
    assert str(error).startswith(f"Consul servers unreachable (listing ACL policies): {status}")


@pytest.mark.parametrize(
    "text",
    [
        'Invalid Policy: A Policy with Name "meshvm-reader" already exists',
        "rpc error making call: Invalid Service Identity: Service identity is missing the service name field",
    ],
)
def test_a_refusal_a_server_explains_is_a_failed_operation(text: str) -> None:
    error = server_error("creating ACL policy meshvm-reader", 500, text)
    assert isinstance(error, OperationFailedError)
    assert error.exit_code == ExitCode.FAILED
    assert str(error) == f"Consul refused creating ACL policy meshvm-reader: 500 {text}"
