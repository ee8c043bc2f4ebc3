"""Locality-aware load balancing on real sidecars: four api instances in two zones, a caller in one of them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.mesh import MeshNode, wait_for
from tests.support.traffic import HttpServer, Load, Summary, burst

pytestmark = pytest.mark.lab

REGION = "lab"
HOME, AWAY = "lab-a", "lab-b"


class Zones:
    def __init__(self, client: MeshNode, url: str, apps: dict[str, HttpServer]) -> None:
        self.client, self.url, self.apps = client, url, apps

    def served(self, n: int = 200) -> Summary:
        return burst(self.url, n, concurrency=8)

    def zone_of(self, server: str) -> str:
        return HOME if server.startswith("a") else AWAY


@pytest.fixture(scope="module")
def zones(node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]) -> Any:
    web, api = f"{mesh_tag}-web", f"{mesh_tag}-api"
    policy({"authorization": {"rules": [{"source": web, "destination": api, "action": "allow"}]}})
    apps = {name: HttpServer(name).start() for name in ("a1", "a2", "b1", "b2")}
    nodes = []
    for name, app in apps.items():
        node = node_factory(f"api-{name}")
        node.sections["locality"] = {"region": REGION, "zone": HOME if name.startswith("a") else AWAY}
        node.add_service(api, app.port, check={"type": "http", "path": "/health", "interval": "1s"})
        nodes.append(node)
    client = node_factory("client")
    client.sections["locality"] = {"region": REGION, "zone": HOME}
    client.add_service(web, 1, check={"type": "none"}, upstreams=[{"service": api}])
    nodes.append(client)
    for node in nodes:
        node.start()
    wait_for("four api instances", lambda: len(client.endpoints(f"out.{web}.{api}")) == 4, timeout=30)
    yield Zones(client, client.upstream_url(web, api), apps)
    for app in apps.values():
        app.stop()


def test_traffic_stays_in_the_callers_zone(zones: Zones) -> None:
    summary = zones.served(400)
    assert summary.failed == 0, summary.by_status
    assert set(summary.by_server) == {"a1", "a2"}, summary.by_server
    assert min(summary.by_server.values()) > 100, "both instances of the zone share the load"


def test_the_zone_going_down_under_load_fails_over_and_comes_back(zones: Zones) -> None:
    load = Load(zones.url, rate_per_s=200, concurrency=8).start()
    try:
        time.sleep(3)
        stopped = time.monotonic()
        for name in ("a1", "a2"):
            zones.apps[name].stop()

        def away_only(since: float) -> bool:
            recent = load.summary(since=since)
            return recent.ok > 50 and set(recent.by_server) == {"b1", "b2"}

        moved = wait_for("traffic in the other zone", lambda: away_only(time.monotonic() - 1), timeout=20)
        time.sleep(3)
        for name in ("a1", "a2"):
            zones.apps[name].start()  # the same ports again: the instances come back
        returned = time.monotonic()
        home = wait_for(
            "traffic home again",
            lambda: set(load.summary(since=time.monotonic() - 1).by_server) == {"a1", "a2"},
            timeout=20,
        )
        time.sleep(2)
    finally:
        load.stop()
    summary = load.summary()
    print(
        f"failover: {moved:.1f}s to move away, {home:.1f}s to come home; {summary.total} requests {summary.by_status}"
    )
    assert summary.total > 1500, "200 requests a second for ~10 s"
    assert summary.failed <= summary.total / 1000, summary.by_status
    during = load.summary(since=stopped)
    assert during.by_server.get("b1", 0) + during.by_server.get("b2", 0) > 0
    after = Summary.of(r for r in load.results if r.started >= returned + home)
    assert set(after.by_server) <= {"a1", "a2"}, after.by_server
    assert moved < 10
