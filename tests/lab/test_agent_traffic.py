"""Every traffic feature of the mesh policy, with real requests through real Envoys configured by the agent."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import websockets.exceptions
import websockets.sync.client

from tests.support.mesh import MeshNode, wait_for
from tests.support.traffic import (
    GrpcHealthServer,
    H2Server,
    HttpServer,
    TcpEchoServer,
    WebSocketEchoServer,
    burst,
    grpc_health_check,
    h2_get,
    http_get,
    tcp_echo,
)

pytestmark = pytest.mark.lab


def _syncs(node: MeshNode) -> float:
    match = re.search(r"^meshvm_syncs_total (\S+)$", node.agent_metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Topology:
    def __init__(
        self,
        names: dict[str, str],
        nodes: dict[str, MeshNode],
        apps: dict[str, Any],
        policy: Callable[[dict[str, Any]], None],
    ) -> None:
        self.names = names
        self.nodes = nodes
        self.apps = apps
        self._policy = policy

    @property
    def client(self) -> MeshNode:
        return self.nodes["client"]

    def url(self, upstream: str = "api", path: str = "/") -> str:
        return self.client.upstream_url(self.names["web"], self.names[upstream], path)

    def cluster(self, upstream: str = "api") -> str:
        return f"out.{self.names['web']}.{self.names[upstream]}"

    def apply(self, api_policy: dict[str, Any] | None = None) -> None:
        """Apply a policy (allowing web to call everything) and wait until every agent rendered it."""
        n = self.names
        before = {name: _syncs(node) for name, node in self.nodes.items()}
        self._policy(
            {
                "authorization": {
                    "default_action": "deny",
                    "rules": [{"source": n["web"], "destination": "*", "action": "allow"}],
                },
                "services": {n["api"]: api_policy} if api_policy else {},
            }
        )
        for name, node in self.nodes.items():
            wait_for(f"{name} rendered the policy", lambda nd=node, b=before[name]: _syncs(nd) > b, timeout=10)
        time.sleep(0.3)  # Envoy picks up renamed files within milliseconds; leave a margin
        for app in self.apps.values():
            if isinstance(app, HttpServer):
                app.fail_ratio, app.delay, app.status = 0.0, 0.0, 200


@pytest.fixture(scope="module")
def topo(node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]) -> Any:
    names = {k: f"{mesh_tag}-{k}" for k in ("web", "api", "echo", "rpc", "h2", "ws", "outsider")}
    apps: dict[str, Any] = {
        "v1": HttpServer("v1").start(),
        "v2": HttpServer("v2").start(),
        "echo": TcpEchoServer().start(),
        "rpc": GrpcHealthServer().start(),
        "h2": H2Server("h2").start(),
        "ws": WebSocketEchoServer().start(),
    }
    policy({"authorization": {"rules": [{"source": names["web"], "destination": "*", "action": "allow"}]}})
    v1 = node_factory("api-v1")
    v1.add_service(names["api"], apps["v1"].port, version="v1", check={"type": "http", "path": "/health"})
    v2 = node_factory("api-v2")
    v2.add_service(
        names["api"], apps["v2"].port, version="v2", tags=["canary"], check={"type": "http", "path": "/health"}
    )
    misc = node_factory("misc")
    misc.add_service(names["echo"], apps["echo"].port, protocol="tcp")
    misc.add_service(names["rpc"], apps["rpc"].port, protocol="grpc", check={"type": "grpc"})
    misc.add_service(names["h2"], apps["h2"].port, protocol="http2")
    misc.add_service(names["ws"], apps["ws"].port)
    client = node_factory("client")
    client.add_service(
        names["web"],
        1,
        check={"type": "none"},
        upstreams=[
            {"service": names["api"]},
            {"service": names["echo"]},
            {"service": names["rpc"]},
            {"service": names["h2"]},
            {"service": names["ws"]},
        ],
    )
    # Calls nothing the policy allows: what a caller outside the rules gets.
    client.add_service(names["outsider"], 1, check={"type": "none"}, upstreams=[{"service": names["ws"]}])
    nodes = {"api-v1": v1, "api-v2": v2, "misc": misc, "client": client}
    for node in nodes.values():
        node.start()
    topology = Topology(names, nodes, apps, policy)
    wait_for("both api instances", lambda: len(client.endpoints(topology.cluster())) == 2, timeout=20)
    yield topology
    for app in apps.values():
        app.stop()


def test_protocol_is_learned_from_the_destination_registration(topo: Topology) -> None:
    listeners = topo.client.admin("/listeners?format=json")
    assert topo.cluster("echo") in topo.client.admin("/clusters")
    # http upstreams get an HTTP connection manager (routes, retries); tcp gets a TCP proxy.
    assert "outbound." in listeners
    status, headers, _ = http_get(topo.url())
    assert status == 200
    assert headers["x-served-by"] in {"v1", "v2"}


def test_path_and_header_routing_to_subsets(topo: Topology) -> None:
    topo.apply(
        {
            "subsets": {"v1": {"version": "v1"}, "v2": {"tags": ["canary"]}},
            "routes": [
                {"match": {"headers": [{"name": "x-canary", "exact": "yes"}]}, "to": "v2"},
                {"match": {"path_prefix": "/beta/"}, "to": "v2"},
                {"to": "v1"},
            ],
        }
    )
    plain = burst(topo.url(), 40)
    assert plain.by_server == {"v1": 40}
    canary = burst(topo.url(), 40, headers={"x-canary": "yes"})
    assert canary.by_server == {"v2": 40}
    beta = burst(topo.url(path="/beta/feature"), 40)
    assert beta.by_server == {"v2": 40}


def test_weighted_split_90_10_over_2000_requests(topo: Topology) -> None:
    topo.apply(
        {
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            "routes": [{"split": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
        }
    )
    result = burst(topo.url(), 2000, concurrency=16)
    assert result.ok == 2000
    share = result.by_server.get("v2", 0) / 2000
    # Binomial(2000, 0.1): sd = 0.67 %; ±2.5 points is about 3.7 sd.
    assert 0.075 <= share <= 0.125, result.by_server


def test_retries_turn_a_failing_upstream_into_success(topo: Topology) -> None:
    topo.apply({"subsets": {"v1": {"version": "v1"}}, "routes": [{"to": "v1"}]})
    topo.apps["v1"].fail_ratio = 0.5
    without = burst(topo.url(), 200)
    assert 80 <= without.failed <= 120, "control: half the requests fail without retries"
    topo.apply(
        {
            "subsets": {"v1": {"version": "v1"}},
            "routes": [{"to": "v1"}],
            # Under concurrency each attempt fails with p = 0.5 independently: 10 retries leave 0.05 %.
            "retries": {"attempts": 10, "retry_on": ["5xx"]},
        }
    )
    topo.apps["v1"].fail_ratio = 0.5
    with_retries = burst(topo.url(), 500)
    assert with_retries.ok / with_retries.total >= 0.99, with_retries.by_status
    assert topo.client.stat(f"cluster.{topo.cluster()}.v1.upstream_rq_retry") >= with_retries.total * 0.4


def test_request_timeout_fires(topo: Topology) -> None:
    topo.apply({"timeout": "300ms"})
    for app in ("v1", "v2"):
        topo.apps[app].delay = 1.5
    started = time.monotonic()
    status, _, _ = http_get(topo.url(), timeout=5)
    elapsed = time.monotonic() - started
    assert status == 504
    assert 0.25 <= elapsed < 1.2


def test_circuit_breaker_overflow_gives_503_and_the_stat_rises(topo: Topology) -> None:
    topo.apply(
        {"circuit_breaker": {"max_connections": 1, "max_pending_requests": 1, "max_requests": 1, "max_retries": 0}}
    )
    for app in ("v1", "v2"):
        topo.apps[app].delay = 0.3
    stat = f"cluster.{topo.cluster()}.upstream_rq_pending_overflow"
    before = topo.client.stat(stat)
    result = burst(topo.url(), 40, concurrency=20)
    assert result.by_status.get(503, 0) > 0, result.by_status
    assert result.ok > 0
    assert topo.client.stat(stat) > before


def test_outlier_detection_ejects_the_bad_instance(topo: Topology) -> None:
    topo.apply(
        {
            "outlier_detection": {
                "consecutive_5xx": 3,
                "interval": "1s",
                "base_ejection_time": "30s",
                "max_ejection_percent": 50,
            }
        }
    )
    topo.apps["v2"].status = 500
    ejected = f"cluster.{topo.cluster()}.outlier_detection.ejections_active"

    def ejected_after_traffic() -> bool:
        burst(topo.url(), 10, concurrency=1)  # keep the failures coming until the detector acts
        return topo.client.stat(ejected) >= 1

    wait_for("v2 ejected", ejected_after_traffic, timeout=15, interval=0.2)
    after = burst(topo.url(), 50, concurrency=4)
    assert after.by_server == {"v1": 50}, "traffic must avoid the ejected instance"


def test_fault_abort_20_percent(topo: Topology) -> None:
    topo.apply({"fault": {"abort": {"status": 503, "percent": 20}}})
    result = burst(topo.url(), 1000, concurrency=16)
    share = result.by_status.get(503, 0) / 1000
    assert 0.15 <= share <= 0.25, result.by_status
    assert result.by_status.get(503, 0) + result.ok == 1000


def test_fault_fixed_delay(topo: Topology) -> None:
    topo.apply({"fault": {"delay": {"fixed": "250ms", "percent": 100}}})
    result = burst(topo.url(), 8, concurrency=4)
    assert result.ok == 8
    assert min(result.latencies) >= 0.25


def test_local_rate_limit_gives_429(topo: Topology) -> None:
    topo.apply({"rate_limit": {"requests_per_second": 5, "burst": 5}})
    result = burst(topo.url(), 60, concurrency=10)
    assert result.by_status.get(429, 0) >= 30, result.by_status
    assert result.ok >= 5
    status, headers, _ = http_get(topo.url())
    if status == 429:
        assert headers.get("x-meshvm-ratelimited") == "true"


def test_grpc_health_check_through_the_mesh(topo: Topology) -> None:
    topo.apply()
    port = topo.client.upstream_port(topo.names["web"], topo.names["rpc"])
    assert grpc_health_check("127.0.0.1", port) == "SERVING"
    topo.apps["rpc"].set_serving(False)
    try:
        assert grpc_health_check("127.0.0.1", port) == "NOT_SERVING"
    finally:
        topo.apps["rpc"].set_serving(True)


def test_http2_end_to_end(topo: Topology) -> None:
    port = topo.client.upstream_port(topo.names["web"], topo.names["h2"])
    status, version = h2_get("127.0.0.1", port)
    assert (status, version) == (200, "HTTP/2")
    assert topo.apps["h2"].requests >= 1


def test_raw_tcp_echo_through_the_mesh(topo: Topology) -> None:
    port = topo.client.upstream_port(topo.names["web"], topo.names["echo"])
    payload = bytes(range(256)) * 512
    assert tcp_echo("127.0.0.1", port, payload) == payload


def test_websocket_lives_through_the_mesh_for_a_minute_and_a_denied_caller_cannot_upgrade(topo: Topology) -> None:
    """A real WebSocket client and server, through both sidecars (an HTTP/2 extended CONNECT between them): one
    connection carries messages for 60 s, with a 20 s silence longer than the 15 s request timeout in the middle.
    Every policy of this module lets web call everything and nobody else call anything."""
    ws, web = topo.names["ws"], topo.names["web"]
    upgrades = topo.apps["ws"].upgrades
    url = f"ws://127.0.0.1:{topo.client.upstream_port(web, ws)}/chat"
    sent = 0
    with websockets.sync.client.connect(url, open_timeout=5, ping_interval=None) as connection:
        started = time.monotonic()
        while time.monotonic() - started < 60:
            message = f"message {sent} " + "x" * (sent * 97 % 4096)
            connection.send(message)
            assert connection.recv(timeout=5) == message
            sent += 1
            time.sleep(20 if sent == 10 else 0.5)
        assert time.monotonic() - started >= 60
    assert sent > 60
    assert topo.apps["ws"].upgrades == upgrades + 1, "one connection, upgraded once, never re-established"
    outsider = f"ws://127.0.0.1:{topo.client.upstream_port(topo.names['outsider'], ws)}/chat"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(outsider, open_timeout=5)
    assert refused.value.response.status_code == 403
    assert topo.apps["ws"].upgrades == upgrades + 1
