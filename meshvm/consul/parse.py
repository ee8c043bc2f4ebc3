"""Consul's JSON as the agent's watches read it, turned into snapshot values (pure functions)."""

from __future__ import annotations

import base64
from typing import Any

from meshvm.envoy.snapshot import Instance, Leaf, Roots
from meshvm.policy import AuthorizationRule


def parse_health_connect(entries: list[dict[str, Any]] | None) -> tuple[Instance, ...]:
    """Every sidecar of a service on a live node, with its health (a critical check = unhealthy).

    Unhealthy instances are kept and marked, not dropped: Envoy routes around them, and when too few are healthy
    (as right after a Consul server restart, before gossip has confirmed every node) its panic threshold keeps
    traffic flowing instead of answering 503 for an application that is fine.
    """
    instances = []
    for entry in entries or []:
        svc, node, checks = entry["Service"], entry["Node"], entry.get("Checks") or []
        if any(c.get("CheckID") == "serfHealth" and c.get("Status") == "critical" for c in checks):
            continue  # the node itself is gone (or not yet confirmed alive): never a target, even in panic
        instances.append(
            Instance(
                address=svc.get("Address") or node["Address"],
                port=int(svc["Port"]),
                node=node["Node"],
                tags=tuple(sorted(svc.get("Tags") or [])),
                meta=tuple(sorted((svc.get("Meta") or {}).items())),
                healthy=all(c.get("Status") != "critical" for c in checks),
            )
        )
    return tuple(sorted(instances, key=lambda i: (i.address, i.port, i.node)))


def parse_roots(data: dict[str, Any]) -> Roots:
    active = [r["RootCert"] for r in data["Roots"] if r.get("Active")]
    # Sorted: Consul lists them in no fixed order, and a reordered bundle would make Envoy rebuild TLS contexts.
    others = sorted(r["RootCert"] for r in data["Roots"] if not r.get("Active"))
    # Keep every root the CA still lists: during a CA rotation both must be trusted.
    return Roots(trust_domain=data["TrustDomain"], pems=tuple(active + others))


def parse_leaf(service: str, data: dict[str, Any]) -> Leaf:
    return Leaf(
        service=service,
        cert_pem=data["CertPEM"],
        key_pem=data["PrivateKeyPEM"],
        serial=data.get("SerialNumber", ""),
        valid_before=data.get("ValidBefore", ""),
    )


def parse_intentions(data: list[dict[str, Any]] | None) -> tuple[AuthorizationRule, ...]:
    rules = []
    for item in data or []:
        if item.get("SourceType", "consul") != "consul" or item.get("Action") not in {"allow", "deny"}:
            continue
        rules.append(
            AuthorizationRule(source=item["SourceName"], destination=item["DestinationName"], action=item["Action"])
        )
    return tuple(rules)


def parse_kv(items: list[dict[str, Any]] | None) -> bytes | None:
    if not items:
        return None
    value = items[0].get("Value")
    return base64.b64decode(value) if value else b""
