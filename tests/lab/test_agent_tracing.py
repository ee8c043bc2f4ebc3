"""Distributed traces from the sidecars, read back from the lab's Jaeger: one trace per request across both hops,
parent and child right, an incoming W3C trace continued, sampling as the policy says."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from meshvm.lab.state import LabState
from tests.support.mesh import MeshNode, wait_for
from tests.support.tracing import jaeger_trace, spans_by_service, tag, wait_trace
from tests.support.traffic import HttpServer, http_get

pytestmark = pytest.mark.lab


class Traced:
    def __init__(self, lab: LabState, names: dict[str, str], client: MeshNode, app: HttpServer) -> None:
        self.lab, self.names, self.client, self.app = lab, names, client, app

    def call(self, headers: dict[str, str] | None = None) -> dict[str, str]:
        """One request from web's app through both sidecars; returns the headers api's app received."""
        url = self.client.upstream_url(self.names["web"], self.names["api"], "/traced")
        status, _headers, body = http_get(url, headers=headers or {})
        assert status == 200, body
        return dict(json.loads(body)["headers"])

    def wait_trace(self, trace_id: str) -> dict[str, Any]:
        return wait_trace(self.lab, trace_id, spans=2)


@pytest.fixture(scope="module")
def traced(
    lab: LabState, node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]
) -> Any:
    if lab.jaeger is None:
        pytest.fail("this lab has no Jaeger: take it down and bring it up again (`meshvm lab down && meshvm lab up`)")
    names = {k: f"{mesh_tag}-{k}" for k in ("web", "api")}
    policy({"authorization": {"rules": [{"source": names["web"], "destination": names["api"], "action": "allow"}]}})
    app = HttpServer("api").start()
    server = node_factory("server")
    server.add_service(names["api"], app.port, check={"type": "http", "path": "/health"})
    client = node_factory("client")
    client.add_service(names["web"], 1, check={"type": "none"}, upstreams=[{"service": names["api"]}])
    for node in (server, client):
        node.sections["tracing"] = {"zipkin_address": lab.jaeger.zipkin_addr, "sampling": 100}
        node.start()
    wait_for("api's sidecar", lambda: len(client.endpoints(f"out.{names['web']}.{names['api']}")) == 1, timeout=20)
    yield Traced(lab, names, client, app)
    app.stop()


def test_one_request_is_one_trace_with_the_client_span_parent_of_the_server_span(traced: Traced) -> None:
    received = traced.call()
    trace_id = received["x-b3-traceid"]
    assert len(trace_id) == 32, "128-bit trace ids, as W3C trace context carries them"
    assert received["traceparent"].split("-")[1] == trace_id, "B3 and W3C headers name the same trace"
    trace = traced.wait_trace(trace_id)
    assert len(trace["spans"]) == 2, trace["spans"]
    spans = spans_by_service(trace)
    client, server = spans[traced.names["web"]], spans[traced.names["api"]]
    assert tag(client, "span.kind") == "client"
    assert tag(server, "span.kind") == "server"
    assert client["references"] == [], "the first sidecar starts the trace"
    assert [(r["refType"], r["spanID"]) for r in server["references"]] == [("CHILD_OF", client["spanID"])]
    assert received["x-b3-spanid"] == server["spanID"], "the app sees the server span as its parent"
    assert tag(server, "http.status_code") == "200"
    logged = [json.loads(line) for line in (traced.client.dir / "access.log").read_text().splitlines()]
    assert trace_id in {entry["trace_id"] for entry in logged}, "the access log names the trace"


def test_an_incoming_w3c_trace_is_continued(traced: Traced) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    received = traced.call({"traceparent": f"00-{trace_id}-{parent}-01"})
    assert received["x-b3-traceid"] == trace_id
    trace = traced.wait_trace(trace_id)
    client = spans_by_service(trace)[traced.names["web"]]
    assert [(r["refType"], r["spanID"]) for r in client["references"]] == [("CHILD_OF", parent)]


def test_sampling_follows_the_policy(traced: Traced, policy: Callable[[dict[str, Any]], None]) -> None:
    names = traced.names
    rules = {"rules": [{"source": names["web"], "destination": names["api"], "action": "allow"}]}
    policy({"authorization": rules, "services": {names["api"]: {"trace_sampling": 0}}})
    wait_for("sampling 0 rendered", lambda: traced.call().get("x-b3-sampled") == "0", timeout=15)
    unsampled = [traced.call()["x-b3-traceid"] for _ in range(20)]
    policy({"authorization": rules, "services": {names["api"]: {"trace_sampling": 100}}})
    wait_for("sampling 100 rendered", lambda: traced.call().get("x-b3-sampled") == "1", timeout=15)
    sampled = [traced.call()["x-b3-traceid"] for _ in range(20)]
    for trace_id in sampled:
        traced.wait_trace(trace_id)
    # Every sampled trace has arrived, so spans of the unsampled requests would have too.
    assert [t for t in unsampled if jaeger_trace(traced.lab, t) is not None] == []
