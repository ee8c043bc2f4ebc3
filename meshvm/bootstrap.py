"""Bootstrap material: what a VM needs to join the mesh's Consul, read from the cluster or from a local file.

In the cluster it is a ConfigMap (non-secret settings) and a Secret (gossip key, ACL tokens), both named
``meshvm-bootstrap`` in meshvm's namespace; the registrar role may read exactly those two objects.

Consul ACLs, two ways: ``acl_issuer_token`` (a token with ``acl = "write"``, with ``consul_http_addr``) lets the
controller make each VM's own two tokens (meshvm.consul.tokens; the issuer token never goes to a VM); or
``acl_token``, one token the operator made, which every VM's Consul agent and meshvm agent then share.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from meshvm.config import format_validation_error, load_yaml
from meshvm.errors import ConfigError
from meshvm.values import Duration

NAME = "meshvm-bootstrap"
SECRET_KEYS = ("gossip_key", "acl_token", "acl_issuer_token")


class Bootstrap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    datacenter: str = Field(min_length=1)
    retry_join: list[str] = Field(min_length=1, description="Consul servers' LAN gossip addresses (host:port)")
    consul_http_addr: str | None = Field(None, description="a Consul HTTP API the controller may query for health")
    ca_pem: str | None = Field(None, description="Consul's TLS CA, when its RPC/HTTP use TLS")
    gossip_key: SecretStr
    acl_issuer_token: SecretStr | None = Field(None, description="makes each VM's own Consul tokens (acl write)")
    acl_token: SecretStr | None = Field(None, description="one Consul token shared by every VM's two agents")
    # The cluster's Istio mesh, as the VMs reach it (needed by `meshvm join --mesh istio`).
    istiod_address: str | None = Field(None, description="istiod's CA and xDS for the VMs, host:port")
    istiod_name: str = Field("istiod.istio-system.svc", description="the name in istiod's serving certificate")
    kube_api: str | None = Field(None, description="the API server as the VMs reach it (TokenRequest), https://…")
    kube_ca_pem: str | None = Field(None, description="the API server's CA certificate (PEM)")
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    istio_cert_lifetime: Duration = Field(86400.0, description="workload certificate lifetime the VMs ask for")
    istio_token_lifetime: Duration = Field(172800.0, description="lifetime of each VM refresh token")

    @model_validator(mode="after")
    def _one_way_to_tokens(self) -> Bootstrap:
        if self.acl_issuer_token is None and self.acl_token is None:
            raise ValueError("acl_issuer_token or acl_token is required (the VMs' Consul ACL tokens come from one)")
        if self.acl_issuer_token is not None and not self.consul_http_addr:
            raise ValueError("acl_issuer_token needs consul_http_addr: the controller makes the VMs' tokens there")
        return self

    def controller_token(self) -> str:
        """The token the controller reads Consul with (node and service health)."""
        token = self.acl_issuer_token or self.acl_token
        return token.get_secret_value() if token is not None else ""

    def token_vars(self) -> dict[str, Any]:
        """Where playbooks/tasks/consul_tokens.yml makes (or leave.yml removes) each VM's own tokens."""
        if self.acl_issuer_token is None:
            return {}
        return {
            "consul_agent_datacenter": self.datacenter,
            "meshvm_consul_http_addr": self.consul_http_addr,
            "meshvm_consul_acl_issuer_token": self.acl_issuer_token.get_secret_value(),
        }

    def ansible_vars(self) -> dict[str, Any]:
        """The role variables this material sets (secrets included: pass them only through files, not argv)."""
        values: dict[str, Any] = {
            "consul_agent_datacenter": self.datacenter,
            "consul_agent_retry_join": list(self.retry_join),
            "consul_agent_encrypt": self.gossip_key.get_secret_value(),
            **self.token_vars(),
        }
        if self.acl_issuer_token is None and self.acl_token is not None:
            shared = self.acl_token.get_secret_value()
            values |= {"consul_agent_acl_agent_token": shared, "meshvm_agent_consul_token": shared}
        if self.ca_pem:
            values["consul_agent_ca_pem"] = self.ca_pem
        return values

    def manifests(self, namespace: str) -> list[dict[str, Any]]:
        meta = {"name": NAME, "namespace": namespace, "labels": {"app.kubernetes.io/managed-by": "meshvm"}}
        data = self.model_dump(mode="json", exclude=set(SECRET_KEYS), exclude_none=True)
        data["retry_join"] = ",".join(self.retry_join)
        secret = {
            k: base64.b64encode(getattr(self, k).get_secret_value().encode()).decode()
            for k in SECRET_KEYS
            if getattr(self, k) is not None
        }
        return [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data},
            {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": secret},
        ]


def _parse(data: dict[str, Any], source: str) -> Bootstrap:
    try:
        return Bootstrap.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from exc


def from_file(path: Path) -> Bootstrap:
    data = load_yaml(path, "bootstrap file")
    if not isinstance(data, dict):
        raise ConfigError(
            f"bootstrap file {path}: expected a mapping with datacenter, retry_join, gossip_key and "
            "acl_issuer_token or acl_token"
        )
    return _parse(data, f"bootstrap file {path}")


def from_cluster(api: Any, namespace: str) -> Bootstrap:
    from kubernetes import client

    from meshvm.kube.client import call_or_fail

    core = client.CoreV1Api(api)
    what = f"reading {namespace}/{NAME}"
    missing = ConfigError(
        f"no bootstrap material in namespace {namespace}: ConfigMap and Secret {NAME} are needed",
        hint="create them (see README, `meshvm lab up` does in the lab) or pass --bootstrap FILE",
    )
    config_map = call_or_fail(what, lambda: core.read_namespaced_config_map(NAME, namespace), not_found=missing)
    secret = call_or_fail(what, lambda: core.read_namespaced_secret(NAME, namespace), not_found=missing).data or {}
    data: dict[str, Any] = dict(config_map.data or {})
    if "retry_join" in data:
        data["retry_join"] = [a for a in str(data["retry_join"]).split(",") if a]
    for key in SECRET_KEYS:
        if key in secret:
            data[key] = base64.b64decode(secret[key]).decode()
    return _parse(data, f"ConfigMap/Secret {namespace}/{NAME}")
