"""VM workloads in a real kube-apiserver, written by the restricted identity `meshvm rbac` describes."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshvm.config import ServiceSpec
from meshvm.errors import ConfigError, OperationFailedError
from meshvm.kube import registration as reg
from meshvm.kube.client import api_client
from meshvm.lab.state import LabState

pytestmark = pytest.mark.lab
NS = "meshvm"


def _svc(name: str, port: int, protocol: str = "http", version: str | None = None) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {"name": name, "port": port, "mesh_port": 21000, "protocol": protocol, "version": version}
    )


@pytest.fixture
def registrar(lab: LabState):  # type: ignore[no-untyped-def]
    assert lab.kube is not None
    api = api_client(Path(lab.kube.kubeconfig), context="lab-registrar")
    yield api
    reg.remove_hosts(api, NS, {"kt-vm1", "kt-vm2"})


def test_register_is_idempotent_updates_and_removes_by_host(registrar: object) -> None:
    vm1 = reg.VmWorkload(
        "kt-vm1",
        "198.51.100.11",
        (_svc("kt-api", 8080, version="v1"), _svc("kt-db", 5432, "tcp")),
        service_account="kt-api",
        network="vm-net",
        locality="lab/zone-a",
    )
    vm2 = reg.VmWorkload("kt-vm2", "198.51.100.12", (_svc("kt-api", 8080, version="v2"),), service_account="kt-api")
    first = reg.register(registrar, [vm1, vm2], NS, "istio")
    assert {c.action for c in first} == {"created"}
    kinds = sorted({c.kind for c in first})
    assert kinds == ["Role", "RoleBinding", "Secret", "Service", "ServiceAccount", "WorkloadEntry"]
    assert len([c for c in first if c.kind == "Service"]) == 2, "one Service per mesh service, shared by VMs"
    assert len([c for c in first if c.kind == "ServiceAccount"]) == 1, "one identity shared by the kt-api VMs"
    assert {c.action for c in reg.register(registrar, [vm1, vm2], NS, "istio")} == {"unchanged"}

    moved = reg.VmWorkload("kt-vm2", "198.51.100.13", vm2.services, service_account="kt-api")
    changed = {(c.kind, c.name): c.action for c in reg.register(registrar, [vm1, moved], NS, "istio")}
    assert changed[("WorkloadEntry", "kt-api-kt-vm2")] == "updated"
    assert changed[("Service", "kt-api")] == "unchanged"

    kinds_api = reg.Kinds(registrar)
    entry = kinds_api.read("WorkloadEntry", NS, "kt-api-kt-vm1")
    assert entry["spec"] == {
        "address": "198.51.100.11",
        "ports": {"http": 21000},
        "labels": {"app": "kt-api", "version": "v1", "security.istio.io/tlsMode": "istio"},
        "serviceAccount": "kt-api",
        "network": "vm-net",
        "locality": "lab/zone-a",
    }
    service = kinds_api.read("Service", NS, "kt-api")
    assert service["spec"]["selector"] == {"app": "kt-api"}
    assert (service["spec"]["ports"][0]["port"], service["spec"]["ports"][0]["targetPort"]) == (8080, 21000)
    assert service["spec"]["clusterIP"]
    role = kinds_api.read("Role", NS, "meshvm-token-kt-api")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["kt-api"], "verbs": ["create"]}
    ]

    assert set(reg.hosts_with_objects(registrar, NS)) >= {"kt-vm1", "kt-vm2"}
    gone = reg.remove_hosts(registrar, NS, {"kt-vm2"})
    assert {(c.kind, c.name) for c in gone} == {("WorkloadEntry", "kt-api-kt-vm2"), ("Secret", "meshvm-vm-kt-vm2")}, (
        "the shared Service and ServiceAccount stay while kt-vm1 still runs kt-api"
    )
    gone = reg.remove_hosts(registrar, NS, {"kt-vm1"})
    assert {(c.kind, c.name) for c in gone} >= {
        ("Service", "kt-api"),
        ("Service", "kt-db"),
        ("ServiceAccount", "kt-api"),
        ("Role", "meshvm-token-kt-api"),
        ("RoleBinding", "meshvm-token-kt-api"),
    }
    assert reg.remove_hosts(registrar, NS, {"kt-vm1"}) == [], "removal is idempotent"
    assert "kt-vm1" not in reg.hosts_with_objects(registrar, NS)


def test_kubernetes_mesh_needs_the_plaintext_opt_in_and_writes_no_istio_objects(registrar: object) -> None:
    vm = reg.VmWorkload("kt-vm1", "198.51.100.11", (_svc("kt-web", 80),))
    with pytest.raises(ConfigError, match="meshvm_kubernetes_plaintext"):
        reg.register(registrar, [vm], NS, "kubernetes")
    assert reg.hosts_with_objects(registrar, NS).get("kt-vm1") is None, "nothing applied"
    opted = reg.VmWorkload("kt-vm1", "198.51.100.11", (_svc("kt-web", 80),), plaintext=True)
    kinds = {c.kind for c in reg.register(registrar, [opted], NS, "kubernetes")}
    assert kinds == {"Service", "EndpointSlice"}
    assert reg.desired([vm], NS, "consul") == []


def test_restricted_identity_gets_403_outside_its_namespace(registrar: object) -> None:
    vm = reg.VmWorkload("kt-vm1", "198.51.100.11", (_svc("kt-web", 80),))
    with pytest.raises(OperationFailedError, match="403 forbidden"):
        reg.register(registrar, [vm], "default", "istio")


def test_bootstrap_material_is_readable_by_the_registrar_only_by_name(lab: LabState) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    from meshvm import bootstrap

    assert lab.kube is not None
    assert lab.consul is not None
    api = api_client(Path(lab.kube.kubeconfig), context="lab-registrar")
    material = bootstrap.from_cluster(api, NS)
    assert material.datacenter == lab.consul.datacenter
    assert material.retry_join == [lab.consul.serf_lan_addr]
    assert material.gossip_key.get_secret_value() == lab.consul.gossip_key
    assert material.acl_issuer_token is not None
    assert material.acl_issuer_token.get_secret_value() == lab.consul.issuer_token
    assert lab.consul.issuer_token not in repr(material), "secrets never show in reprs or logs"
    with pytest.raises(ApiException) as listing:
        k8s.CoreV1Api(api).list_namespaced_secret(NS)
    assert listing.value.status == 403
