"""Everything the renderer needs, gathered by the agent from Consul: a pure value, so rendering is a function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshvm.config import AgentConfig
from meshvm.policy import AuthorizationRule, MeshPolicy


@dataclass(frozen=True, order=True)
class Instance:
    """One sidecar of a destination service, as Consul's /v1/health/connect reports it."""

    address: str
    port: int
    node: str = ""
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    healthy: bool = True

    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)


@dataclass(frozen=True)
class Leaf:
    service: str
    cert_pem: str
    key_pem: str
    serial: str = ""
    valid_before: str = ""


@dataclass(frozen=True)
class Roots:
    trust_domain: str
    pems: tuple[str, ...]


@dataclass(frozen=True)
class Snapshot:
    config: AgentConfig
    policy: MeshPolicy = field(default_factory=MeshPolicy)
    roots: Roots | None = None
    leaves: Mapping[str, Leaf] = field(default_factory=dict)
    upstreams: Mapping[str, tuple[Instance, ...]] = field(default_factory=dict)
    protocols: Mapping[str, str] = field(default_factory=dict)  # learned from registrations, kept when none is left
    intentions: tuple[AuthorizationRule, ...] = ()
    # The cluster's Istio mesh (when the config has istio:): the VM's Istio certificate and Istio's root. Until both
    # are here, the VM serves and calls Consul's mesh only: Istio being away never blocks the rest.
    istio_leaf: Leaf | None = None
    istio_roots: Roots | None = None

    def ready(self) -> bool:
        """Certificates for every local service and the CA roots: without them no listener can serve mTLS."""
        return self.roots is not None and all(s.name in self.leaves for s in self.config.services)

    def istio_ready(self) -> bool:
        return self.config.istio is not None and self.istio_leaf is not None and self.istio_roots is not None

    def upstream_protocol(self, source: str, destination: str) -> str:
        """Upstream setting, else the policy, else what the destination registered, else tcp (http for a Service of
        the cluster's mesh: what its ports mostly are, and what the policy's HTTP settings need)."""
        spec = next(u for u in self.config.service(source).upstreams if u.service == destination)
        if spec.protocol is not None:
            return spec.protocol
        policy = self.policy.for_service(destination)
        if policy.protocol is not None:
            return policy.protocol
        if spec.kubernetes is not None:
            return "http"
        registered = self.protocols.get(destination)
        if registered is None:
            found = {i.meta_dict().get("protocol") for i in self.upstreams.get(destination, ())}
            registered = found.pop() if len(found) == 1 else None
        return registered if registered in {"http", "http2", "grpc", "tcp"} else "tcp"
