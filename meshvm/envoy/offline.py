"""Render without Consul: placeholder certificates and no endpoints, to inspect or validate the shape."""

from __future__ import annotations

from dataclasses import replace

from meshvm import pki
from meshvm.config import AgentConfig
from meshvm.envoy.bootstrap import static_equivalent
from meshvm.envoy.resources import Layout, build
from meshvm.envoy.snapshot import Leaf, Roots, Snapshot
from meshvm.envoy.types import JSON
from meshvm.policy import MeshPolicy

PLACEHOLDER_TRUST_DOMAIN = "placeholder.meshvm.invalid"


def placeholder_snapshot(config: AgentConfig, policy: MeshPolicy) -> Snapshot:
    ca = pki.new_ca("meshvm placeholder CA", uris=(f"spiffe://{PLACEHOLDER_TRUST_DOMAIN}",))
    leaves = {}
    for service in config.services:
        pair = pki.issue(ca, service.name, uris=(pki.spiffe_id(PLACEHOLDER_TRUST_DOMAIN, service.name),))
        leaves[service.name] = Leaf(service=service.name, cert_pem=pair.cert_pem, key_pem=pair.key_pem)
    snapshot = Snapshot(
        config=config, policy=policy, roots=Roots(PLACEHOLDER_TRUST_DOMAIN, (ca.cert_pem,)), leaves=leaves
    )
    if config.istio is None:
        return snapshot
    istio_ca = pki.new_ca("meshvm placeholder Istio CA")
    pair = pki.issue(istio_ca, config.istio.service_account, uris=(config.istio.identity,))
    return replace(
        snapshot,
        istio_leaf=Leaf(service="istio", cert_pem=pair.cert_pem, key_pem=pair.key_pem),
        istio_roots=Roots(config.istio.trust_domain, (istio_ca.cert_pem,)),
    )


def render_offline(config: AgentConfig, policy: MeshPolicy, *, static: bool = True) -> JSON:
    resources = build(placeholder_snapshot(config, policy), Layout(config.envoy.config_dir))
    if static:
        return static_equivalent(config, resources)
    return {
        "listeners": resources.listeners,
        "clusters": resources.clusters,
        "routes": resources.routes,
        "endpoints": resources.endpoints,
        "secrets": sorted(resources.secrets),
    }
