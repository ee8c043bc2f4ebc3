"""Reading traces back from the lab's Jaeger (its query API), for tests that check what the sidecars sent."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from meshvm.lab.procs import wait_until
from meshvm.lab.state import LabState


def jaeger_trace(lab: LabState, trace_id: str) -> dict[str, Any] | None:
    """The trace as Jaeger's query API gives it, or None while Jaeger has no span of it."""
    assert lab.jaeger is not None
    try:
        with urllib.request.urlopen(f"{lab.jaeger.query_url}/api/traces/{trace_id}", timeout=3) as response:
            data = json.loads(response.read())["data"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return dict(data[0]) if data else None


def spans_by_service(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = {key: p["serviceName"] for key, p in trace["processes"].items()}
    return {services[s["processID"]]: s for s in trace["spans"]}


def tag(span: dict[str, Any], key: str) -> Any:
    return next((t["value"] for t in span.get("tags", []) if t["key"] == key), None)


def wait_trace(lab: LabState, trace_id: str, *, spans: int) -> dict[str, Any]:
    """The trace once Jaeger holds at least ``spans`` of its spans (sidecars send them in batches)."""
    found: dict[str, Any] = {}

    def complete() -> bool:
        found["trace"] = jaeger_trace(lab, trace_id)
        return found["trace"] is not None and len(found["trace"]["spans"]) >= spans

    wait_until(f"{spans} spans of trace {trace_id} in Jaeger", complete, timeout=20)
    return dict(found["trace"])
