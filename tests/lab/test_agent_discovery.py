"""Discovery: the agent registers, follows health in Consul within a second, and deregisters when stopped."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from meshvm.lab.state import LabState
from tests.support.mesh import MeshNode, management, wait_for
from tests.support.traffic import HttpServer, Load, burst

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def topo(node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]) -> Any:
    names = {k: f"{mesh_tag}-{k}" for k in ("web", "api")}
    policy({"authorization": {"rules": [{"source": names["web"], "destination": names["api"], "action": "allow"}]}})
    apps = {"a": HttpServer("a").start(), "b": HttpServer("b").start()}
    first = node_factory("api-a")
    first.add_service(names["api"], apps["a"].port, check={"type": "http", "path": "/health", "interval": "1s"})
    client = node_factory("client")
    client.add_service(names["web"], 1, check={"type": "none"}, upstreams=[{"service": names["api"]}])
    first.start()
    client.start()
    cluster = f"out.{names['web']}.{names['api']}"
    wait_for("first instance", lambda: len(client.endpoints(cluster)) == 1, timeout=20)
    yield {"names": names, "client": client, "first": first, "apps": apps, "cluster": cluster, "factory": node_factory}
    for app in apps.values():
        app.stop()


def test_registration_has_service_sidecar_and_checks(topo: Any, lab: LabState) -> None:
    consul = management(lab)
    api = topo["names"]["api"]
    _, services = consul.catalog.service(api)
    assert [s["Node"] for s in services] == [topo["first"].name]
    assert services[0]["ServiceMeta"]["protocol"] == "http"
    _, sidecars = consul.catalog.service(f"{api}-sidecar-proxy")
    assert sidecars[0]["ServiceKind"] == "connect-proxy"
    assert sidecars[0]["ServiceProxy"]["DestinationServiceName"] == api
    assert sidecars[0]["ServicePort"] == topo["first"].mesh_port(api)
    _, checks = consul.health.node(topo["first"].name)
    names = {c["Name"] for c in checks}
    assert {f"{api} application", f"{api} application alive", f"{api} sidecar listener"} <= names


def test_new_healthy_instance_receives_traffic(topo: Any) -> None:
    names, client = topo["names"], topo["client"]
    second = topo["factory"]("api-b")
    second.add_service(names["api"], topo["apps"]["b"].port, check={"type": "http", "path": "/health"})
    second.start()
    topo["second"] = second
    wait_for("second instance in Envoy", lambda: len(client.endpoints(topo["cluster"])) == 2, timeout=15)
    result = burst(client.upstream_url(names["web"], names["api"]), 100)
    assert result.ok == 100
    assert set(result.by_server) == {"a", "b"}


def _critical(lab: LabState, node: str, check_name: str) -> bool:
    _, checks = management(lab).health.node(node)
    return any(c["Name"] == check_name and c["Status"] == "critical" for c in checks)


def test_failing_health_check_removes_the_instance_within_a_second(topo: Any, lab: LabState) -> None:
    names, client, second = topo["names"], topo["client"], topo["second"]
    bad = f"{second.address}:{second.mesh_port(names['api'])}"
    url = client.upstream_url(names["web"], names["api"])
    assert bad in client.endpoints(topo["cluster"])
    with Load(url, rate_per_s=100, concurrency=4) as load:
        time.sleep(0.5)
        topo["apps"]["b"].health_status = 500
        wait_for(
            "Consul marks it critical",
            lambda: _critical(lab, second.name, f"{names['api']} application"),
            timeout=10,
            interval=0.02,
        )
        marked = time.monotonic()
        took = wait_for(
            "Envoy drops it", lambda: bad not in client.endpoints(topo["cluster"]), timeout=5, interval=0.02
        )
        time.sleep(1)
        after = time.monotonic()
    assert took <= 1.0, f"{took:.2f}s from critical in Consul to gone from Envoy"
    late = [r for r in load.results if r.started > marked + 1.0 and r.server == "b"]
    assert late == [], "no request may reach the unhealthy instance a second after Consul marked it critical"
    assert load.summary(since=marked).failed == 0
    assert after > marked
    topo["apps"]["b"].health_status = 200
    wait_for("it comes back", lambda: bad in client.endpoints(topo["cluster"]), timeout=10)


def test_graceful_stop_deregisters(topo: Any, lab: LabState) -> None:
    names, second = topo["names"], topo["second"]
    second.stop_agent()
    _, services = management(lab).catalog.service(names["api"])
    assert second.name not in [s["Node"] for s in services]
    _, sidecars = management(lab).catalog.service(f"{names['api']}-sidecar-proxy")
    assert second.name not in [s["Node"] for s in sidecars]
    wait_for("Envoy forgets it", lambda: len(topo["client"].endpoints(topo["cluster"])) == 1, timeout=10)
