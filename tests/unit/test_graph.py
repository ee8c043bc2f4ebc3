"""meshvm graph: Envoy counters of outbound clusters become caller -> callee edges, drawn as valid SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from meshvm.graph import Graph, svg


def _stats(**counters: int) -> dict[str, object]:
    return {"stats": [{"name": name, "value": value} for name, value in counters.items()]}


def _graph() -> Graph:
    graph = Graph(services={"web": ["vm1"], "api": ["vm2", "vm3"], "db": ["vm4"]})
    graph.add_stats(
        {
            "stats": [
                {"name": "cluster.out.web.api.upstream_rq_total", "value": 90},
                {"name": "cluster.out.web.api.v2.upstream_rq_total", "value": 10},
                {"name": "cluster.out.web.api.upstream_rq_5xx", "value": 3},
                {"name": "cluster.local.web.upstream_rq_total", "value": 500},
                {"name": "cluster.out.web.api.upstream_cx_total", "value": 4},
                {"name": "cluster_manager.cds.update_success", "value": 7},
                {"name": "cluster.out.web.api.some_histogram", "histograms": {}},
            ]
        }
    )
    graph.add_stats(_stats(**{"cluster.out.api.db.upstream_cx_total": 12, "cluster.out.api.db.upstream_rq_total": 0}))
    return graph


def test_counters_of_every_subset_add_up_per_caller_and_callee() -> None:
    graph = _graph()
    assert set(graph.edges) == {("web", "api"), ("api", "db")}
    web_api = graph.edges["web", "api"]
    assert (web_api.requests, web_api.errors, web_api.weight) == (100, 3, 100)
    api_db = graph.edges["api", "db"]
    assert (api_db.requests, api_db.connections, api_db.weight) == (0, 12, 12)


def test_svg_is_well_formed_and_draws_each_service_and_edge() -> None:
    picture = ET.fromstring(svg(_graph(), title="lab & co"))  # noqa: S314 - our own output
    ns = {"s": "http://www.w3.org/2000/svg"}
    services = {g.get("data-name") for g in picture.iterfind("s:g[@class='service']", ns)}
    assert services == {"web", "api", "db"}
    edges = {(e.get("data-source"), e.get("data-destination")) for e in picture.iterfind("s:line", ns)}
    assert edges == {("web", "api"), ("api", "db")}
    texts = [t.text for t in picture.iter("{http://www.w3.org/2000/svg}text")]
    assert "100 req, 3 5xx" in texts
    assert "12 conn" in texts
    assert "lab & co" in texts
    # Callers sit left of what they call.
    x = {g.get("data-name"): float(g.find("s:rect", ns).get("x")) for g in picture.iterfind("s:g", ns)}
    assert x["web"] < x["api"] < x["db"]


def test_a_call_cycle_still_draws() -> None:
    graph = Graph(services={"a": ["vm1"], "b": ["vm2"]})
    graph.add_stats(_stats(**{"cluster.out.a.b.upstream_rq_total": 1, "cluster.out.b.a.upstream_rq_total": 1}))
    picture = ET.fromstring(svg(graph))  # noqa: S314 - our own output
    assert len(picture.findall("{http://www.w3.org/2000/svg}line")) == 2


def test_calls_into_the_cluster_are_drawn_with_their_kubernetes_name() -> None:
    graph = Graph(services={"web": ["vm1"]})
    graph.add_stats(_stats(**{"cluster.out.web.k8s.shop.pod2.upstream_rq_total": 7}))
    assert set(graph.edges) == {("web", "k8s:shop/pod2")}
    assert graph.edges["web", "k8s:shop/pod2"].requests == 7
    ET.fromstring(svg(graph))  # noqa: S314 - our own output
