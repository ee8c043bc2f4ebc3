"""What meshvm reads from Consul's agent API, parsed (pure)."""

from __future__ import annotations

from meshvm.consul.parse import maintenance_reasons


def test_maintenance_reasons_are_the_services_an_operator_paused() -> None:
    checks = {
        "_service_maintenance:api": {"CheckID": "_service_maintenance:api", "ServiceID": "api", "Notes": "disk swap"},
        "_service_maintenance:api-sidecar-proxy": {"ServiceID": "api-sidecar-proxy", "Notes": ""},
        "_node_maintenance": {"Notes": "the whole node"},
        "service:api": {"ServiceID": "api", "Notes": "not maintenance"},
    }
    assert maintenance_reasons(checks) == {"api": "disk swap", "api-sidecar-proxy": ""}
    assert maintenance_reasons(None) == {}
