"""A throwaway mesh CA for unit tests of rendering (the lab tests use Consul's real Connect CA)."""

from __future__ import annotations

from meshvm import pki
from meshvm.envoy.snapshot import Leaf, Roots

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


class MeshCA:
    def __init__(self, trust_domain: str = TRUST_DOMAIN) -> None:
        self.trust_domain = trust_domain
        self.ca = pki.new_ca("test mesh CA", uris=(f"spiffe://{trust_domain}",))

    @property
    def roots(self) -> Roots:
        return Roots(trust_domain=self.trust_domain, pems=(self.ca.cert_pem,))

    def leaf(self, service: str, dc: str = "lab") -> Leaf:
        pair = pki.issue(self.ca, service, uris=(pki.spiffe_id(self.trust_domain, service, dc),))
        return Leaf(service=service, cert_pem=pair.cert_pem, key_pem=pair.key_pem)
