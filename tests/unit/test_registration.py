"""What `meshvm join` registers in the cluster, as data: the Istio mesh never points at an application's port."""

from __future__ import annotations

from typing import Any

import pytest

from meshvm.config import ServiceSpec
from meshvm.errors import ConfigError, OperationFailedError, PeerUnreachableError
from meshvm.join import envoy_identities
from meshvm.kube import registration as reg
from meshvm.kube.client import call, call_or_fail


def _vm(host: str = "vm2", *, plaintext: bool = False) -> reg.VmWorkload:
    api = ServiceSpec.model_validate({"name": "api", "port": 8080, "mesh_port": 21000, "version": "v1"})
    return reg.VmWorkload(host, "198.51.100.12", (api,), service_account="api", plaintext=plaintext)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        found.setdefault(obj["kind"], []).append(obj)
    return found


def test_istio_registration_points_only_at_the_mesh_port() -> None:
    objects = _by_kind(reg.desired([_vm()], "meshvm", "istio"))
    assert set(objects) == {"ServiceAccount", "Role", "RoleBinding", "Secret", "Service", "WorkloadEntry"}
    (entry,) = objects["WorkloadEntry"]
    assert entry["spec"]["ports"] == {"http": 21000}
    assert entry["spec"]["labels"] == {"app": "api", "version": "v1", "security.istio.io/tlsMode": "istio"}
    (service,) = objects["Service"]
    assert service["spec"]["selector"] == {"app": "api"}
    assert service["spec"]["ports"][0]["targetPort"] == 21000
    assert 8080 not in {p.get("targetPort") for p in service["spec"]["ports"]}


def test_identity_objects_come_first_and_grant_only_self_tokens() -> None:
    objects = reg.desired([_vm("vm2"), _vm("vm3")], "meshvm", "istio")
    kinds = [o["kind"] for o in objects]
    assert kinds.index("Secret") < kinds.index("Service"), "the identity exists before the services"
    assert kinds.count("ServiceAccount") == 1, "VMs of one workload share its ServiceAccount"
    assert sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Secret") == ["meshvm-vm-vm2", "meshvm-vm-vm3"]
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["api"], "verbs": ["create"]}
    ]
    assert [o["kind"] for o in reg.desired([_vm()], "meshvm", "istio", "identity")] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Secret",
    ]
    assert {o["kind"] for o in reg.desired([_vm()], "meshvm", "istio", "services")} == {"Service", "WorkloadEntry"}


def test_plaintext_registration_needs_the_opt_in() -> None:
    with pytest.raises(ConfigError) as info:
        reg.desired([_vm("vm2"), _vm("vm3", plaintext=True)], "meshvm", "kubernetes")
    assert "vm2" in str(info.value)
    assert "vm3" not in str(info.value).split(":")[0]
    assert info.value.exit_code == 2
    opted = _by_kind(reg.desired([_vm(plaintext=True)], "meshvm", "kubernetes"))
    assert set(opted) == {"Service", "EndpointSlice"}
    assert opted["EndpointSlice"][0]["ports"][0]["port"] == 8080


def test_status_reads_both_identities_and_their_expiry_from_envoy() -> None:
    certs = {
        "certificates": [
            {
                "cert_chain": [
                    {
                        "subject_alt_names": [{"uri": "spiffe://x.consul/ns/default/dc/lab/svc/api"}],
                        "expiration_time": "2026-12-02T00:00:00Z",
                    }
                ]
            },
            {
                "cert_chain": [
                    {
                        "subject_alt_names": [{"uri": "spiffe://cluster.local/ns/meshvm/sa/api"}],
                        "expiration_time": "2026-12-01T12:10:00Z",
                    }
                ]
            },
        ]
    }
    import json

    assert envoy_identities(json.dumps(certs)) == {
        "spiffe://x.consul/ns/default/dc/lab/svc/api": "2026-12-02T00:00:00Z",
        "spiffe://cluster.local/ns/meshvm/sa/api": "2026-12-01T12:10:00Z",
    }
    assert envoy_identities("not json") == {}


def test_leaving_never_removes_meshvm_s_own_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registrar's Role carries managed-by=meshvm too: removing the last VM must leave it alone."""
    from meshvm.kube import rbac

    own = [{**m, "metadata": {**m["metadata"], "namespace": "meshvm"}} for m in rbac.manifests("meshvm")[1:]]
    vm_objects = reg.desired([_vm()], "meshvm", "istio")
    deleted: list[tuple[str, str]] = []

    class FakeKinds:
        def __init__(self, _api: object) -> None:
            pass

        def delete(self, kind: str, _ns: str, name: str) -> None:
            deleted.append((kind, name))

    monkeypatch.setattr(reg, "Kinds", FakeKinds)
    monkeypatch.setattr(reg, "managed", lambda _api, _ns: [o for o in own + vm_objects if o["kind"] != "Secret"])
    reg.remove_hosts(object(), "meshvm", {"vm2"})
    assert ("Role", "meshvm-registrar") not in deleted
    assert ("ServiceAccount", "meshvm-registrar") not in deleted
    assert {("ServiceAccount", "api"), ("Role", "meshvm-token-api"), ("Service", "api")} <= set(deleted)


def test_a_host_without_services_still_gets_a_workload_name() -> None:
    from meshvm.inventory import InventoryHost
    from meshvm.join import workload

    bare = InventoryHost(name="ghost", address="198.51.100.99", user="root", port=22)
    assert workload(bare).service_account == "ghost"
    named = InventoryHost(
        name="vm2", address="198.51.100.12", user="root", port=22, services=_vm().services, variables={}
    )
    assert workload(named).service_account == "api"
    chosen = InventoryHost(
        name="vm2", address="198.51.100.12", user="root", port=22, variables={"meshvm_service_account": "billing"}
    )
    assert workload(chosen).service_account == "billing"


@pytest.mark.parametrize(
    ("status", "error", "exit_code", "words"),
    [
        (401, ConfigError, 2, "401 unauthorized"),
        (403, OperationFailedError, 1, "403 forbidden"),
    ],
)
def test_api_errors_no_caller_can_handle_become_one_line(status: int, error: type, exit_code: int, words: str) -> None:
    from kubernetes.client.exceptions import ApiException

    def refused() -> None:
        raise ApiException(status=status, reason="refused")

    with pytest.raises(error) as raised:
        call("reading shop/x", refused)
    assert raised.value.exit_code == exit_code
    assert words in str(raised.value)
    assert "reading shop/x" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_api_errors_the_caller_handles_pass_through_and_an_unreachable_server_is_exit_3() -> None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import NewConnectionError

    def missing() -> None:
        raise ApiException(status=404, reason="Not Found")

    with pytest.raises(ApiException):
        call("reading shop/x", missing)

    def away() -> None:
        raise NewConnectionError(None, "connection refused")

    with pytest.raises(PeerUnreachableError) as raised:
        call("reading shop/x", away)
    assert raised.value.exit_code == 3
    assert call("reading shop/x", lambda: 7) == 7


def test_call_or_fail_makes_every_api_error_one_line() -> None:
    from kubernetes.client.exceptions import ApiException

    def failing(status: int) -> Any:
        def fn() -> None:
            raise ApiException(status=status, reason="why")

        return fn

    missing = ConfigError("no bootstrap material in namespace shop")
    with pytest.raises(ConfigError) as raised:
        call_or_fail("reading shop/meshvm-bootstrap", failing(404), not_found=missing)
    assert raised.value is missing
    with pytest.raises(OperationFailedError, match="reading shop/x: 404 why"):
        call_or_fail("reading shop/x", failing(404))
    with pytest.raises(OperationFailedError, match="reading shop/x: 500 why"):
        call_or_fail("reading shop/x", failing(500), not_found=missing)
    with pytest.raises(ConfigError, match="401 unauthorized"):
        call_or_fail("reading shop/x", failing(401), not_found=missing)
