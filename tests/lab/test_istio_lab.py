"""The lab's Istio mesh is real: istiod configures pods' sidecars, and pods talk over Istio mTLS by service name.

Every check uses the real programs: istiod (pilot-discovery), pilot-agent with the wheel's Envoy as each pod's
sidecar, kube-controller-manager's EndpointSlice controller, and Istio's own iptables capture in each pod.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from meshvm.kube.client import api_client
from meshvm.lab import istiod, pods
from meshvm.lab.state import LabState, Pod
from tests.support.pods import curl, curl_until, envoy_admin, eventually, in_pod

pytestmark = pytest.mark.lab

SECURITY = ("security.istio.io", "v1")


def workload_uris(lab: LabState, name: str) -> tuple[set[str], str]:
    """The SPIFFE URIs of the pod sidecar's workload certificate, and its serial number."""
    certs = json.loads(envoy_admin(lab, name, "/certs"))["certificates"]
    chains = [c for entry in certs for c in entry.get("cert_chain", [])]
    uris = {san["uri"] for c in chains for san in c.get("subject_alt_names", []) if "uri" in san}
    serials = sorted(c["serial_number"] for c in chains if c.get("subject_alt_names"))
    return uris, ",".join(serials)


@pytest.fixture(scope="module")
def kube(lab: LabState) -> Any:
    assert lab.kube is not None
    return api_client(Path(lab.kube.kubeconfig), context="lab-admin")


@pytest.fixture(scope="module")
def istio_policies(kube: Any) -> Iterator[Callable[[str, dict[str, Any]], None]]:
    """Apply Istio security policies in namespace shop; all are removed when the module ends."""
    custom = k8s.CustomObjectsApi(kube)
    made: list[tuple[str, str]] = []

    def apply(plural: str, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        try:
            custom.delete_namespaced_custom_object(*SECURITY, pods.NAMESPACE, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        custom.create_namespaced_custom_object(*SECURITY, pods.NAMESPACE, plural, body)
        made.append((plural, name))

    yield apply
    for plural, name in made:
        try:
            custom.delete_namespaced_custom_object(*SECURITY, pods.NAMESPACE, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="module")
def strict(istio_policies: Callable[[str, dict[str, Any]], None]) -> None:
    istio_policies(
        "peerauthentications",
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": pods.NAMESPACE},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    )


def test_istiod_is_ready_and_serves_xds_to_every_pod(lab: LabState) -> None:
    assert lab.istiod is not None
    assert len(lab.pods) >= 2
    with urllib.request.urlopen(f"http://{lab.istiod.http_addr}/ready", timeout=5) as response:
        assert response.status == 200
    expected = {f"{p.name}.{p.namespace}" for p in lab.pods}

    def connected() -> set[str]:
        with urllib.request.urlopen(f"http://{lab.istiod.http_addr}/debug/syncz", timeout=5) as response:
            proxies = json.loads(response.read())
        return {p["proxy"] for p in proxies if p.get("proxy_type", "sidecar") == "sidecar"}

    seen = eventually("every pod's sidecar connected to istiod", lambda: expected <= connected() and connected())
    assert expected <= seen


def test_istiod_publishes_its_root_and_endpoint_slices_come_from_the_controller(lab: LabState, kube: Any) -> None:
    core = k8s.CoreV1Api(kube)
    root = core.read_namespaced_config_map(istiod.ROOT_CONFIGMAP, pods.NAMESPACE).data["root-cert.pem"]
    assert root.startswith("-----BEGIN CERTIFICATE-----")
    pod = lab.pods[0]
    slices = k8s.DiscoveryV1Api(kube).list_namespaced_endpoint_slice(
        pod.namespace, label_selector=f"kubernetes.io/service-name={pod.name}"
    )
    assert len(slices.items) == 1
    found = slices.items[0]
    assert found.metadata.labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert [(e.addresses, e.conditions.ready, e.target_ref.name) for e in found.endpoints] == [
        ([pod.address], True, pod.name)
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_sidecar_is_live_with_its_spiffe_certificate_and_nothing_rejected(lab: LabState, index: int) -> None:
    pod: Pod = lab.pods[index]
    assert envoy_admin(lab, pod.name, "/ready").strip() == "LIVE"
    uris, _serial = workload_uris(lab, pod.name)
    assert uris == {pods.spiffe_id(pod)}
    stats = envoy_admin(lab, pod.name, "/stats?filter=update_(rejected|success)$")
    counters = dict(line.split(": ") for line in stats.strip().splitlines())
    assert int(counters["cluster_manager.cds.update_success"]) >= 1
    assert int(counters["listener_manager.lds.update_success"]) >= 1
    assert {k: v for k, v in counters.items() if "rejected" in k and v != "0"} == {}


def test_pod_calls_pod_by_service_name_over_istio_mtls_under_strict(lab: LabState, strict: None) -> None:
    caller, callee = lab.pods[0], lab.pods[1]

    answer = json.loads(curl_until(lab, caller.name, f"http://{pods.service_host(callee)}/hello", 200))
    assert answer["pod"] == callee.name
    assert answer["path"] == "/hello"
    # The callee's sidecar terminated mTLS and tells the app who called: the caller's Istio identity.
    xfcc = answer["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={pods.spiffe_id(caller)}" in xfcc
    assert f"By={pods.spiffe_id(callee)}" in xfcc


def test_caller_without_a_sidecar_is_refused_under_strict(lab: LabState, strict: None) -> None:
    callee = lab.pods[1]

    def refused() -> bool:
        done = subprocess.run(
            ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", f"http://{callee.address}:8080/"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout in {"000", ""}

    assert eventually("plaintext caller refused under STRICT", refused)
    # The same pod still answers meshed callers.
    assert curl(lab, lab.pods[0].name, f"http://{pods.service_host(callee)}/")[0] == 200


def test_cluster_dns_answers_what_istio_dns_proxy_does_not(lab: LabState, kube: Any) -> None:
    """Forward names come from Istio's DNS proxy; the rest (reverse lookups, names that do not exist) from CoreDNS."""
    callee = lab.pods[1]
    cluster_ip = k8s.CoreV1Api(kube).read_namespaced_service(callee.name, callee.namespace).spec.cluster_ip
    forward = in_pod(lab, lab.pods[0].name, "getent", "hosts", pods.service_host(callee))
    assert forward.stdout.split() == [cluster_ip, pods.service_host(callee)]
    reverse = in_pod(lab, lab.pods[0].name, "getent", "hosts", cluster_ip)
    assert reverse.stdout.split() == [cluster_ip, pods.service_host(callee)]
    started = time.monotonic()
    missing = in_pod(lab, lab.pods[0].name, "getent", "ahosts", f"no-such-service.{pods.NAMESPACE}.svc.cluster.local")
    assert missing.returncode == 2  # not found: NXDOMAIN, not a timeout
    assert time.monotonic() - started < 2


def test_grpc_health_through_both_sidecars(lab: LabState) -> None:
    caller, callee = lab.pods[0], lab.pods[1]
    script = (
        "import grpc, sys\n"
        "from grpc_health.v1 import health_pb2, health_pb2_grpc\n"
        f"channel = grpc.insecure_channel('{pods.service_host(callee)}:{pods.GRPC_PORT}')\n"
        "reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)\n"
        "print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))\n"
    )
    done = in_pod(lab, caller.name, sys.executable, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SERVING"


def test_authorization_policy_denying_the_caller_gives_403(
    lab: LabState, istio_policies: Callable[[str, dict[str, Any]], None], kube: Any
) -> None:
    caller, callee = lab.pods[0], lab.pods[1]
    url = f"http://{pods.service_host(callee)}/"
    assert curl(lab, caller.name, url)[0] == 200
    istio_policies(
        "authorizationpolicies",
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-pod1", "namespace": pods.NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"app": callee.name}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"principals": [pods.spiffe_id(caller).removeprefix("spiffe://")]}}]}],
            },
        },
    )
    assert "RBAC: access denied" in curl_until(lab, caller.name, url, 403)
    k8s.CustomObjectsApi(kube).delete_namespaced_custom_object(
        *SECURITY, pods.NAMESPACE, "authorizationpolicies", "deny-pod1"
    )
    curl_until(lab, caller.name, url, 200)


def test_restarted_pod_gets_a_new_certificate_by_itself(lab: LabState, meshvm_cli: str, kube: Any) -> None:
    caller, callee = lab.pods[0], lab.pods[1]
    core = k8s.CoreV1Api(kube)
    uid_before = core.read_namespaced_pod(callee.name, callee.namespace).metadata.uid
    _uris, serial_before = workload_uris(lab, callee.name)
    done = subprocess.run(
        [meshvm_cli, "lab", "reset", callee.name], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    restarted = core.read_namespaced_pod(callee.name, callee.namespace)
    assert restarted.metadata.uid != uid_before
    assert {c.type: c.status for c in restarted.status.conditions}["Ready"] == "True"
    uris, serial_after = workload_uris(lab, callee.name)
    assert uris == {pods.spiffe_id(callee)}
    assert serial_after != serial_before
    body = curl_until(lab, caller.name, f"http://{pods.service_host(callee)}/", 200)
    assert json.loads(body)["pod"] == callee.name


def test_lab_status_lists_istiod_and_the_pods(lab: LabState, meshvm_cli: str) -> None:
    done = subprocess.run([meshvm_cli, "lab", "status"], capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lab.istiod is not None
    istiod_row = next(line for line in done.stdout.splitlines() if "istiod" in line)
    assert lab.istiod.version in istiod_row
    assert "running" in istiod_row
    assert lab.jaeger is not None
    jaeger_row = next(line for line in done.stdout.splitlines() if "jaeger" in line)
    assert lab.jaeger.version in jaeger_row
    assert "running" in jaeger_row
    for pod in lab.pods:
        row = next(line for line in done.stdout.splitlines() if f"{pod.namespace}/{pod.name}" in line)
        assert pod.address in row
        assert "running" in row
        assert f"sa {pod.service_account}" in row
