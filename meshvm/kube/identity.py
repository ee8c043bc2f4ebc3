"""What `meshvm join --mesh istio` gives each VM for its Istio identity: its settings, Istio's root certificate, and
its first refresh token (a TokenRequest token of its ServiceAccount, bound to the VM's own Secret)."""

from __future__ import annotations

from typing import Any

from meshvm.bootstrap import Bootstrap
from meshvm.errors import ConfigError, OperationFailedError, PeerUnreachableError
from meshvm.kube.client import call_or_fail
from meshvm.kube.registration import VmWorkload, token_secret

ROOT_CONFIGMAP = "istio-ca-root-cert"


def require_istio(material: Bootstrap, source: str) -> tuple[str, str, str]:
    """(istiod address, API server URL, API server CA) from the bootstrap material, or one line saying what to add."""
    missing = [name for name in ("istiod_address", "kube_api", "kube_ca_pem") if not getattr(material, name)]
    if missing:
        raise ConfigError(
            f"{source} lacks {', '.join(missing)}, which --mesh istio needs to give VMs their Istio identity",
            hint="add them to the meshvm-bootstrap ConfigMap (or the --bootstrap file)",
        )
    return str(material.istiod_address), str(material.kube_api), str(material.kube_ca_pem)


def settings(material: Bootstrap, vm: VmWorkload, namespace: str) -> dict[str, Any]:
    """The agent's ``istio:`` section for one VM (meshvm.config.IstioSpec)."""
    address, api, _ca = require_istio(material, "the bootstrap material")
    return {
        "namespace": namespace,
        "service_account": vm.service_account,
        "trust_domain": material.trust_domain,
        "istiod_address": address,
        "istiod_name": material.istiod_name,
        "cluster_id": material.cluster_id,
        "network": vm.network,
        "kube_api": api,
        "token_secret": token_secret(vm.host),
        "cert_lifetime": f"{material.istio_cert_lifetime:g}s",
        "token_lifetime": f"{material.istio_token_lifetime:g}s",
    }


def root_certificate(api: Any, namespace: str) -> str:
    """Istio's root, from the ConfigMap istiod writes into every namespace (none: there is no istiod)."""
    from kubernetes import client

    missing = PeerUnreachableError(
        f"no {ROOT_CONFIGMAP} ConfigMap in namespace {namespace}: istiod has not published its root here",
        hint="is istiod running, and does the namespace exist?",
    )
    found = call_or_fail(
        f"reading {namespace}/{ROOT_CONFIGMAP}",
        lambda: client.CoreV1Api(api).read_namespaced_config_map(ROOT_CONFIGMAP, namespace),
        not_found=missing,
    )
    data = found.data or {}
    root = str(data.get("root-cert.pem", ""))
    if "BEGIN CERTIFICATE" not in root:
        raise OperationFailedError(f"{namespace}/{ROOT_CONFIGMAP} holds no root-cert.pem")
    return root


def first_token(api: Any, namespace: str, vm: VmWorkload, seconds: int) -> str:
    """A token of the VM's ServiceAccount for the API server, bound to the VM's Secret: what the VM renews itself."""
    from kubernetes import client

    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Secret", "name": token_secret(vm.host)},
        },
    }
    core: Any = client.CoreV1Api(api)
    answer = call_or_fail(
        f"a token for {namespace}/{vm.service_account}",
        lambda: core.create_namespaced_service_account_token(vm.service_account, namespace, request),
        forbidden_hint="the registrar needs `meshvm rbac` (serviceaccounts/token create)",
    )
    return str(answer.status.token)
