"""What the lab writes for a pod, as a kubelet and Istio's injector would, checked without a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshvm.errors import ConfigError
from meshvm.lab import istiod, network, pods
from meshvm.lab.kube import NODE, _kubeconfig
from meshvm.lab.state import IstiodInfo, LabState, Pod


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    return pods.new_pod(2, tmp_path)


def test_pods_get_their_own_addresses_apart_from_vms() -> None:
    assert pods.new_pod(1, Path("/x")).address == "198.51.100.101"
    assert network.pod_address(50) == "198.51.100.150"
    vm_addresses = {network.host_address(i) for i in range(1, 51)}
    assert not vm_addresses & {network.pod_address(i) for i in range(1, 51)}


def test_a_host_keeps_its_mac_across_restarts_and_no_two_share_one() -> None:
    addresses = [network.host_address(i) for i in range(1, 51)] + [network.pod_address(i) for i in range(1, 51)]
    macs = [network.mac_address(a) for a in addresses]
    assert macs == [network.mac_address(a) for a in addresses]
    assert len(set(macs)) == len(macs)
    assert network.mac_address("198.51.100.102") == "02:00:c6:33:64:66"
    first = int(macs[0].split(":")[0], 16)
    assert first & 0b10  # locally administered
    assert not first & 0b01  # unicast


def test_service_selects_the_pod_and_names_its_protocols(pod: Pod) -> None:
    namespace, account, service = pods.manifests(pod)
    assert namespace["metadata"]["name"] == pod.namespace == "shop"
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"] == {"name": "pod2", "namespace": "shop"}
    spec = service["spec"]
    assert spec["selector"] == {"app": "pod2"}
    assert pods.pod_object(pod)["metadata"]["labels"]["app"] == "pod2"
    assert {(p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in spec["ports"]} == {
        ("http", 80, pods.HTTP_PORT, "http"),
        ("grpc", 9090, pods.GRPC_PORT, "grpc"),
    }


def test_pod_object_is_bound_to_the_lab_node_and_marked_for_istio_mtls(pod: Pod) -> None:
    obj = pods.pod_object(pod)
    assert obj["spec"]["nodeName"] == NODE
    assert obj["spec"]["serviceAccountName"] == "pod2"
    assert obj["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    assert [c["name"] for c in obj["spec"]["containers"]] == ["app", "istio-proxy"]


@pytest.mark.parametrize("ready", [True, False])
def test_status_reports_the_address_and_readiness(pod: Pod, ready: bool) -> None:
    status = pods.pod_status(pod, ready=ready, started="2026-12-01T00:00:00Z")["status"]
    assert status["phase"] == "Running"
    assert status["podIP"] == pod.address
    assert status["podIPs"] == [{"ip": pod.address}]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == conditions["ContainersReady"] == ("True" if ready else "False")
    assert all(c["ready"] is ready for c in status["containerStatuses"])


def test_sidecar_environment_points_at_the_lab_istiod(pod: Pod) -> None:
    info = IstiodInfo(
        pid=1,
        log="x",
        version="v0",
        http_addr="127.0.0.1:1",
        xds_addr="198.51.100.1:15012",
        pilot_agent="/lab/bin/pilot-agent",
        envoy="/lab/bin/envoy",
    )
    env = pods.sidecar_environment(pod, info)
    assert env["CA_ADDR"] == f"{istiod.HOST}:15012"
    assert env["INSTANCE_IP"] == pod.address
    assert env["SERVICE_ACCOUNT"] == "pod2"
    assert env["JWT_POLICY"] == "third-party-jwt"
    assert json.loads(env["PROXY_CONFIG"])["binaryPath"] == "/lab/bin/envoy"
    probers = json.loads(env["ISTIO_KUBE_APP_PROBERS"])
    assert probers[pods.APP_PROBE]["httpGet"]["port"] == pods.HTTP_PORT
    assert pods.spiffe_id(pod) == "spiffe://cluster.local/ns/shop/sa/pod2"


def test_downward_api_labels_file_quotes_values() -> None:
    text = pods._downward({"b": 'say "hi"', "a": "1"})
    assert text == 'a="1"\nb="say \\"hi\\""\n'


def test_commands_run_in_the_pod_namespace_as_the_proxy_user(pod: Pod) -> None:
    assert pods.in_pod(pod, ["curl", "x"]) == ["ip", "netns", "exec", "meshvm-pod2", "curl", "x"]
    as_proxy = pods.in_pod(pod, ["pilot-agent"], uid=pods.PROXY_UID)
    assert as_proxy[:4] == ["ip", "netns", "exec", "meshvm-pod2"]
    assert "--reuid=1337" in as_proxy
    assert as_proxy[-1] == "pilot-agent"


def test_lab_kubeconfig_has_one_context_per_identity() -> None:
    config = _kubeconfig(
        "https://198.51.100.1:6443", Path("/ca.crt"), {"lab-admin": ("lab-admin", "a"), "lab-registrar": ("r", "b")}
    )
    assert config["current-context"] == "lab-admin"
    assert [c["name"] for c in config["contexts"]] == ["lab-admin", "lab-registrar"]
    assert {u["name"]: u["user"]["token"] for u in config["users"]} == {"lab-admin": "a", "r": "b"}


def test_unknown_pod_names_the_ones_there_are(tmp_path: Path) -> None:
    lab = LabState(state_dir=str(tmp_path), pods=[pods.new_pod(1, tmp_path)])
    with pytest.raises(ConfigError) as info:
        lab.pod("pod9")
    assert "pod9" in str(info.value)
    assert "pod1" in str(info.value)
    assert info.value.exit_code == 2
