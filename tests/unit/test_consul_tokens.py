"""Each VM's own Consul ACL tokens (meshvm.consul.tokens) and the bootstrap material's two ways to them."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from meshvm import bootstrap
from meshvm.consul import tokens
from meshvm.errors import ConfigError

BASE = {"datacenter": "dc1", "retry_join": ["10.0.0.5:8301"], "gossip_key": "k"}


def test_a_vm_gets_a_node_identity_for_consul_and_service_identities_for_meshvm() -> None:
    wanted = tokens.host_tokens("dc1", "vm7", ["web", "api", "web"], "meshvm/policy")
    agent, meshvm = wanted[tokens.CONSUL_AGENT], wanted[tokens.MESHVM_AGENT]
    assert agent.fields() == {
        "description": "meshvm: Consul agent of vm7",
        "policies_name": [],
        "node_identities": ["vm7:dc1"],
        "service_identities": [],
    }
    assert meshvm.fields()["service_identities"] == [{"ServiceName": "api"}, {"ServiceName": "web"}]
    assert meshvm.fields()["node_identities"] == []
    name, rules = tokens.reader_policy("meshvm/policy")
    assert meshvm.policies == (name,)
    # Read only: the policy key and agents; nothing to write anywhere.
    assert rules == {"key_prefix": {"meshvm/policy": {"policy": "read"}}, "agent_prefix": {"": {"policy": "read"}}}


def test_accessor_ids_are_fixed_per_datacenter_node_and_kind() -> None:
    ids = {
        tokens.accessor_id(dc, node, kind) for dc in ("dc1", "dc2") for node in ("vm1", "vm2") for kind in tokens.KINDS
    }
    assert len(ids) == 8
    assert tokens.accessor_id("dc1", "vm1", tokens.CONSUL_AGENT) == tokens.accessor_id("dc1", "vm1", "consul-agent")


def _as_consul_reads(spec: tokens.TokenSpec) -> dict[str, Any]:
    """The token as Consul's /v1/acl/token/:id answers it."""
    return {
        "AccessorID": spec.accessor_id,
        "SecretID": "s",
        "Description": spec.description,
        "Policies": [{"ID": "x", "Name": name} for name in spec.policies] or None,
        "NodeIdentities": [{"NodeName": n, "Datacenter": d} for n, d in spec.node_identities] or None,
        "ServiceIdentities": [{"ServiceName": s} for s in spec.service_identities] or None,
    }


def test_a_token_matches_only_when_it_holds_exactly_what_the_vm_needs() -> None:
    wanted = tokens.host_tokens("dc1", "vm7", ["web"], "meshvm/policy")
    for spec in wanted.values():
        assert spec.matches(_as_consul_reads(spec))
    meshvm = wanted[tokens.MESHVM_AGENT]
    more = tokens.host_tokens("dc1", "vm7", ["web", "api"], "meshvm/policy")[tokens.MESHVM_AGENT]
    assert not meshvm.matches(_as_consul_reads(more)), "a service more is a change"
    other_node = tokens.host_tokens("dc1", "vm8", ["web"], "meshvm/policy")[tokens.CONSUL_AGENT]
    assert not wanted[tokens.CONSUL_AGENT].matches(_as_consul_reads(other_node))


def test_bootstrap_with_an_issuer_token_hands_the_playbooks_no_shared_token() -> None:
    material = bootstrap.Bootstrap.model_validate(
        BASE | {"acl_issuer_token": "issuer", "consul_http_addr": "10.0.0.5:8500"}
    )
    values = material.ansible_vars()
    assert values["meshvm_consul_acl_issuer_token"] == "issuer"
    assert values["meshvm_consul_http_addr"] == "10.0.0.5:8500"
    assert "consul_agent_acl_agent_token" not in values
    assert "meshvm_agent_consul_token" not in values
    assert material.controller_token() == "issuer"
    secret = material.manifests("meshvm")[1]["data"]
    assert set(secret) == {"gossip_key", "acl_issuer_token"}
    assert base64.b64decode(secret["acl_issuer_token"]).decode() == "issuer"


def test_bootstrap_with_one_shared_token_gives_it_to_both_agents() -> None:
    values = bootstrap.Bootstrap.model_validate(BASE | {"acl_token": "shared"}).ansible_vars()
    assert values["consul_agent_acl_agent_token"] == values["meshvm_agent_consul_token"] == "shared"
    assert "meshvm_consul_acl_issuer_token" not in values


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "acl_issuer_token or acl_token is required"),
        ({"acl_issuer_token": "issuer"}, "acl_issuer_token needs consul_http_addr"),
    ],
)
def test_bootstrap_without_a_way_to_tokens_is_refused_in_one_line(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    path = tmp_path / "bootstrap.yml"
    path.write_text("".join(f"{k}: {v!r}\n" for k, v in (BASE | extra).items()))
    with pytest.raises(ConfigError) as raised:
        bootstrap.from_file(path)
    assert message in str(raised.value)
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)
