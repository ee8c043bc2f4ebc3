"""Each VM's two Consul ACL tokens, made on the controller with an issuer token (one holding ``acl = "write"``).

* The Consul agent's token: a node identity for the VM's node (``node:write`` on that node, read on services), what
  Consul gives a client agent.
* meshvm agent's token: a service identity per service the VM serves (``service:write`` on it and on its
  ``-sidecar-proxy``, read on the rest of the catalog) and the reader policy (read on the mesh policy's key prefix
  and on agents).

So neither token can register another service, write a key or speak for another node, and one VM's tokens are
worth nothing on the next. Each token has a fixed accessor ID made of the datacenter, node and kind: making them
again finds them (idempotent; the secret stays, so nothing on the VM changes) and ``leave`` removes them by ID.
The issuer token stays on the controller; only the two secrets go to the VM.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from meshvm.consul.client import ConsulClient

# Names the accessor IDs: uuid5(this, "<datacenter>/<node>/<kind>").
ACCESSOR_NAMESPACE = uuid.UUID("6d2c1f0e-4f53-4e8b-9a3c-6d657368766d")
CONSUL_AGENT = "consul-agent"
MESHVM_AGENT = "meshvm-agent"
KINDS = (CONSUL_AGENT, MESHVM_AGENT)
# What the issuer token needs: make and remove tokens and policies, and read the catalog for `meshvm join` health.
ISSUER_RULES: dict[str, Any] = {
    "acl": "write",
    "node_prefix": {"": {"policy": "read"}},
    "service_prefix": {"": {"policy": "read"}},
}


def accessor_id(datacenter: str, node: str, kind: str) -> str:
    return str(uuid.uuid5(ACCESSOR_NAMESPACE, f"{datacenter}/{node}/{kind}"))


def reader_policy(policy_prefix: str) -> tuple[str, dict[str, Any]]:
    """The ACL policy (name, rules) meshvm agents hold besides their service identities."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", policy_prefix).strip("-")
    rules = {"key_prefix": {policy_prefix: {"policy": "read"}}, "agent_prefix": {"": {"policy": "read"}}}
    return f"meshvm-agent-read-{slug}"[:128], rules


@dataclass(frozen=True)
class TokenSpec:
    """One token as meshvm wants it; :meth:`fields` are py-consul's arguments, :meth:`matches` reads Consul's form."""

    accessor_id: str
    description: str
    policies: tuple[str, ...] = ()
    node_identities: tuple[tuple[str, str], ...] = ()  # (node, datacenter)
    service_identities: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "policies_name": list(self.policies),
            "node_identities": [f"{node}:{dc}" for node, dc in self.node_identities],
            "service_identities": [{"ServiceName": name} for name in self.service_identities],
        }

    def matches(self, token: dict[str, Any]) -> bool:
        nodes = sorted((n["NodeName"], n["Datacenter"]) for n in token.get("NodeIdentities") or [])
        services = sorted(s["ServiceName"] for s in token.get("ServiceIdentities") or [])
        return (
            token.get("Description") == self.description
            and sorted(p["Name"] for p in token.get("Policies") or []) == sorted(self.policies)
            and nodes == sorted(self.node_identities)
            and services == sorted(self.service_identities)
        )


def host_tokens(datacenter: str, node: str, services: list[str], policy_prefix: str) -> dict[str, TokenSpec]:
    """The two tokens of VM ``node``, by kind."""
    reader, _rules = reader_policy(policy_prefix)
    return {
        CONSUL_AGENT: TokenSpec(
            accessor_id(datacenter, node, CONSUL_AGENT),
            f"meshvm: Consul agent of {node}",
            node_identities=((node, datacenter),),
        ),
        MESHVM_AGENT: TokenSpec(
            accessor_id(datacenter, node, MESHVM_AGENT),
            f"meshvm: meshvm agent of {node}",
            policies=(reader,),
            service_identities=tuple(sorted(set(services))),
        ),
    }


@dataclass
class Issued:
    secrets: dict[str, str]  # kind -> SecretID ("" for a token not made, in check mode)
    changed: list[str]  # kinds made or changed


def ensure(
    client: ConsulClient, datacenter: str, node: str, services: list[str], policy_prefix: str, *, check: bool = False
) -> Issued:
    """Make or correct the two tokens of ``node``; ``check``: only say what would change."""
    wanted = host_tokens(datacenter, node, services, policy_prefix)
    reader, rules = reader_policy(policy_prefix)
    if not check:
        client.ensure_acl_policy(reader, rules)
    issued = Issued(secrets={}, changed=[])
    for kind, spec in wanted.items():
        current = client.acl_token(spec.accessor_id)
        if current is None or not spec.matches(current):
            issued.changed.append(kind)
            if not check:
                current = client.put_acl_token(spec.accessor_id, exists=current is not None, **spec.fields())
        issued.secrets[kind] = str((current or {}).get("SecretID") or "")
    return issued


def remove(client: ConsulClient, datacenter: str, node: str, *, check: bool = False) -> list[str]:
    """Delete the tokens of ``node``; the kinds that existed."""
    removed = []
    for kind in KINDS:
        accessor = accessor_id(datacenter, node, kind)
        if check:
            if client.acl_token(accessor) is not None:
                removed.append(kind)
        elif client.delete_acl_token(accessor):
            removed.append(kind)
    return removed
