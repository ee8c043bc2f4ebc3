"""Each peer of the lab is the real program: prove it by using it the way meshvm will."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import consul
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from meshvm.envoy import types as t
from meshvm.kube.client import api_client
from meshvm.lab import network
from meshvm.lab.procs import free_port, spawn, stop
from meshvm.lab.state import LabState
from tests.support.mesh import ssh as _ssh

pytestmark = pytest.mark.lab


def _consul(lab: LabState) -> consul.Consul:
    assert lab.consul is not None
    host, port = lab.consul.local_http_addr.split(":")
    return consul.Consul(host=host, port=int(port), token=lab.consul.management_token)


def test_consul_has_a_leader_and_blocking_query_returns_on_register(lab: LabState) -> None:
    c = _consul(lab)
    assert c.status.leader().startswith(f"{network.BRIDGE_ADDRESS}:")
    index, services = c.catalog.services()
    assert "lab-blocking-probe" not in services
    result: dict[str, Any] = {}

    def block() -> None:
        started = time.monotonic()
        new_index, seen = c.catalog.services(index=index, wait="20s")
        result.update(index=new_index, seen=seen, took=time.monotonic() - started)

    waiter = threading.Thread(target=block)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "the blocking query returned before anything changed"
    c.agent.service.register("lab-blocking-probe", service_id="lab-blocking-probe", port=1)
    try:
        waiter.join(timeout=10)
        assert not waiter.is_alive(), "blocking query did not return after a service registered"
        assert int(result["index"]) > int(index)
        assert "lab-blocking-probe" in result["seen"]
        assert result["took"] < 10
    finally:
        c.agent.service.deregister("lab-blocking-probe")


def test_consul_acl_denies_anonymous_writes(lab: LabState) -> None:
    assert lab.consul is not None
    host, port = lab.consul.local_http_addr.split(":")
    anonymous = consul.Consul(host=host, port=int(port))
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.kv.put("meshvm/acl-probe", "x")


def _we(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "labels": {"app": "probe"}},
        "spec": {
            "address": "198.51.100.99",
            "ports": {"http": 8080},
            "labels": {"app": "probe"},
            "serviceAccount": "probe",
        },
    }


def test_kube_apiserver_stores_workload_entries_with_rbac(lab: LabState) -> None:
    assert lab.kube is not None
    kubeconfig = Path(lab.kube.kubeconfig)
    admin = k8s.CustomObjectsApi(api_client(kubeconfig, context="lab-admin"))
    restricted = k8s.CustomObjectsApi(api_client(kubeconfig, context="lab-registrar"))
    group, version, plural = "networking.istio.io", "v1", "workloadentries"
    name = f"lab-probe-{int(time.time() * 1000)}"
    body, status, _ = admin.create_namespaced_custom_object_with_http_info(group, version, "meshvm", plural, _we(name))
    try:
        assert status == 201
        assert body["metadata"]["uid"]
        assert body["metadata"]["resourceVersion"]
        with pytest.raises(ApiException) as dup:
            admin.create_namespaced_custom_object(group, version, "meshvm", plural, _we(name))
        assert dup.value.status == 409
        # The restricted identity may write in its namespace …
        _, status, _ = restricted.create_namespaced_custom_object_with_http_info(
            group, version, "meshvm", plural, _we(f"{name}-r")
        )
        assert status == 201
        restricted.delete_namespaced_custom_object(group, version, "meshvm", plural, f"{name}-r")
        # … and nowhere else, and nothing else.
        with pytest.raises(ApiException) as other_ns:
            restricted.create_namespaced_custom_object(group, version, "default", plural, _we(name))
        assert other_ns.value.status == 403
        core = k8s.CoreV1Api(api_client(kubeconfig, context="lab-registrar"))
        with pytest.raises(ApiException) as secrets:
            core.list_namespaced_secret("meshvm")
        assert secrets.value.status == 403
        bad = _we(f"{name}-bad")
        bad["spec"]["ports"] = {"http": "not-a-number"}
        with pytest.raises(ApiException) as schema:
            admin.create_namespaced_custom_object(group, version, "meshvm", plural, bad)
        assert schema.value.status == 422
    finally:
        admin.delete_namespaced_custom_object(group, version, "meshvm", plural, name)


def test_kube_apiserver_serves_discovery_v1(lab: LabState) -> None:
    assert lab.kube is not None
    apis = k8s.ApisApi(api_client(Path(lab.kube.kubeconfig))).get_api_versions()
    versions = {v.group_version for g in apis.groups for v in g.versions}
    assert "discovery.k8s.io/v1" in versions
    assert "networking.istio.io/v1" in versions


def _bootstrap(admin_port: int, listener_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "probe",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": t.HCM,
                                        "stat_prefix": "probe",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "ok"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": t.ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def test_envoy_validates_and_serves(lab: LabState, tmp_path: Path, envoy_bin: Path) -> None:
    good = _bootstrap(free_port(), free_port())
    bad = json.loads(json.dumps(good))
    bad["static_resources"]["listeners"][0]["no_such_field"] = True
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    ok = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(tmp_path / "good.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(tmp_path / "bad.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert "no_such_field" in refused.stdout + refused.stderr
    admin = good["admin"]["address"]["socket_address"]["port_value"]
    listener = good["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    pid = spawn(
        [str(envoy_bin), "-c", str(tmp_path / "good.json"), "--disable-hot-restart", "-l", "warning"],
        log_path=tmp_path / "envoy.log",
    )
    try:
        deadline = time.monotonic() + 20
        ready = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as response:
                    ready = response.read().decode().strip()
                    break
            except OSError:
                time.sleep(0.1)
        assert ready == "LIVE"
        with urllib.request.urlopen(f"http://127.0.0.1:{listener}/", timeout=2) as response:
            assert response.read() == b"ok"
    finally:
        stop(pid)


def test_vm_runs_systemd_and_reaches_peers_over_the_bridge(lab: LabState) -> None:
    assert lab.consul is not None
    assert lab.kube is not None
    pid1 = _ssh(lab, "vm1", "cat", "/proc/1/comm")
    assert pid1.returncode == 0, pid1.stderr
    assert pid1.stdout.strip() == "systemd"
    assert _ssh(lab, "vm1", "hostname").stdout.strip() == "vm1"
    vm2 = lab.host("vm2")
    reach = _ssh(lab, "vm1", "bash", "-c", f"exec 3<>/dev/tcp/{vm2.address}/22 && head -c 7 <&3")
    assert reach.stdout.startswith("SSH-2.0"), reach.stderr
    leader = _ssh(lab, "vm1", "curl", "-sf", f"http://{lab.consul.http_addr}/v1/status/leader")
    assert leader.returncode == 0
    assert json.loads(leader.stdout).startswith(network.BRIDGE_ADDRESS)
    api = _ssh(lab, "vm1", "curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", f"{lab.kube.server}/readyz")
    assert api.stdout == "401", "kube-apiserver should answer (and refuse anonymous requests)"
    # No way out: the VM has no default route.
    routes = _ssh(lab, "vm1", "ip", "-j", "route", "show", "default")
    assert json.loads(routes.stdout or "[]") == []


def test_vm_survives_reboot(lab: LabState) -> None:
    before = _ssh(lab, "vm2", "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
    assert before
    _ssh(lab, "vm2", "systemctl", "reboot", timeout=30)
    deadline = time.monotonic() + 90
    after = ""
    while time.monotonic() < deadline:
        probe = _ssh(lab, "vm2", "systemctl", "is-system-running", "--wait", timeout=60)
        if probe.stdout.strip() in {"running", "degraded"}:
            after = _ssh(lab, "vm2", "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()
            if after and after != before:
                break
        time.sleep(1)
    assert after, "vm2 did not answer after the reboot"
    assert after != before, "vm2 did not come back with a new boot id"
    assert _ssh(lab, "vm2", "cat", "/proc/1/comm").stdout.strip() == "systemd"
