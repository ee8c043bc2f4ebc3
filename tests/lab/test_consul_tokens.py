"""Each VM's own Consul ACL tokens (meshvm.consul.tokens) against the lab's real Consul server, with the lab's
issuer token: made once and found again, corrected when the VM's services change, removed with the VM; and what
each token may do, asked of Consul itself (the same rights as on a VM: tests/lab/test_ansible_enroll.py)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest

from meshvm.config import ConsulSpec
from meshvm.consul import tokens
from meshvm.consul.client import ConsulClient
from meshvm.lab.state import LabState
from tests.support.traffic import http_request

pytestmark = pytest.mark.lab

PREFIX = "meshvm/tokens-test/policy"


@pytest.fixture
def node(lab: LabState) -> Iterator[str]:
    """A node name of this test's own; its tokens are removed afterwards whatever happens."""
    name = f"tokens-{secrets.token_hex(3)}"
    yield name
    assert lab.consul is not None
    tokens.remove(_client(lab, lab.consul.management_token), lab.consul.datacenter, name)


def _client(lab: LabState, token: str) -> ConsulClient:
    assert lab.consul is not None
    return ConsulClient(ConsulSpec(http_addr=lab.consul.local_http_addr), token)


def _put(lab: LabState, token: str, path: str, body: object) -> int:
    assert lab.consul is not None
    url = f"http://{lab.consul.local_http_addr}{path}"
    status, _headers, _body = http_request("PUT", url, {"X-Consul-Token": token}, json.dumps(body).encode())
    return status


def _get(lab: LabState, token: str, path: str) -> int:
    assert lab.consul is not None
    url = f"http://{lab.consul.local_http_addr}{path}"
    status, _headers, _body = http_request("GET", url, {"X-Consul-Token": token})
    return status


def test_tokens_are_made_once_corrected_in_place_and_removed(lab: LabState, node: str) -> None:
    assert lab.consul is not None
    issuer = _client(lab, lab.consul.issuer_token)
    dc = lab.consul.datacenter
    first = tokens.ensure(issuer, dc, node, ["web"], PREFIX)
    assert sorted(first.changed) == sorted(tokens.KINDS)
    agent, meshvm = first.secrets[tokens.CONSUL_AGENT], first.secrets[tokens.MESHVM_AGENT]
    assert len({agent, meshvm, lab.consul.issuer_token}) == 3
    again = tokens.ensure(issuer, dc, node, ["web"], PREFIX)
    assert again.changed == []
    assert again.secrets == first.secrets
    checked = tokens.ensure(issuer, dc, node, ["web", "api"], PREFIX, check=True)
    assert checked.changed == [tokens.MESHVM_AGENT], "check mode says what would change"
    assert tokens.ensure(issuer, dc, node, ["web"], PREFIX).changed == [], "and changes nothing"
    moved = tokens.ensure(issuer, dc, node, ["web", "api"], PREFIX)
    assert moved.changed == [tokens.MESHVM_AGENT]
    assert moved.secrets == first.secrets, "a VM keeps its secrets when its services change"
    me = _client(lab, meshvm).api.acl.token.read_self()
    assert sorted(s["ServiceName"] for s in me["ServiceIdentities"]) == ["api", "web"]
    assert tokens.remove(issuer, dc, node) == list(tokens.KINDS)
    assert _get(lab, meshvm, "/v1/catalog/services") == 403, "a removed token is refused"
    assert tokens.remove(issuer, dc, node) == []


def test_each_token_may_do_only_its_agent_s_work(lab: LabState, node: str) -> None:
    assert lab.consul is not None
    issued = tokens.ensure(_client(lab, lab.consul.issuer_token), lab.consul.datacenter, node, ["web"], PREFIX)
    agent, meshvm = issued.secrets[tokens.CONSUL_AGENT], issued.secrets[tokens.MESHVM_AGENT]
    intruder = {"Name": f"intruder-{node}", "Port": 1}
    # meshvm agent: its own services (the leaf certificate needs service:write), the catalog, the policy to read.
    assert _get(lab, meshvm, "/v1/agent/connect/ca/leaf/web") == 200
    assert _get(lab, meshvm, "/v1/catalog/services") == 200
    assert _get(lab, meshvm, "/v1/health/connect/api") == 200
    assert _get(lab, meshvm, "/v1/connect/intentions") == 200
    assert _get(lab, meshvm, f"/v1/kv/{PREFIX}") == 404, "allowed to read (there is no key)"
    assert _put(lab, meshvm, "/v1/agent/service/register", intruder) == 403
    assert _get(lab, meshvm, "/v1/agent/connect/ca/leaf/api") == 403
    assert _put(lab, meshvm, f"/v1/kv/{PREFIX}", {"services": {}}) == 403
    # The Consul agent: its node only; no services to write, no keys.
    assert _put(lab, agent, "/v1/agent/service/register", {"Name": "web", "Port": 1}) == 403
    assert _put(lab, agent, f"/v1/kv/{PREFIX}", {}) == 403
    node_body = {"Node": node, "Address": "198.51.100.250"}
    other = {"Node": f"{node}-other", "Address": "198.51.100.251"}
    assert _put(lab, agent, "/v1/catalog/register", other) == 403, "another node is not its own"
    assert _put(lab, agent, "/v1/catalog/register", node_body) == 200
    assert _put(lab, agent, "/v1/catalog/deregister", {"Node": node}) == 200
    # And neither may make tokens.
    for secret in (agent, meshvm):
        assert _put(lab, secret, "/v1/acl/token", {"Description": "x"}) == 403
