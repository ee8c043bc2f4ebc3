"""After upgrade.yml rolled Envoy 1.39.0 -> 1.40.0 through the mesh while vm1 sent requests to api: not one
request failed, every VM runs 1.40.0 only, and every check passes again."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import VMS, wait_for

VERSION = "1.40.0"
OLD_VERSION = "1.39.0"


@pytest.mark.units("envoy.service", "meshvm-agent.service")
def test_no_request_failed_during_the_rolling_upgrade(vm: Any) -> None:
    load: dict[str, Any] = json.loads(vm("vm1").file("/run/meshvm-loadgen.json").content_string)
    assert load["running"] is False, "the load loop was not stopped by the side effect"
    assert load["failed"] == 0, f"{load['failed']} of {load['requests']} requests failed: {load['first_failures']}"
    assert load["requests"] >= 300, f"too few requests to mean anything: {load}"
    assert set(load["answered_by"]) == {"vm2", "vm3"}, load["answered_by"]


@pytest.mark.units("envoy.service")
@pytest.mark.parametrize("name", VMS)
def test_every_vm_runs_the_new_envoy_only(vm: Any, name: str) -> None:
    host = vm(name)
    assert host.file("/usr/local/bin/envoy").linked_to == f"/usr/local/bin/envoy-{VERSION}"
    assert not host.file(f"/usr/local/bin/envoy-{OLD_VERSION}").exists, "the old binary was left behind"
    info = json.loads(host.run("curl -s -m 2 http://127.0.0.1:19000/server_info").stdout)
    assert f"/{VERSION}/" in info["version"]
    assert info["state"] == "LIVE"
    # The upgrade was a hot restart (the listeners were handed over), not a stop and start.
    assert info["command_line_options"]["restart_epoch"] >= 1
    running = host.run("pgrep -x envoy").stdout.split()
    assert len(running) == 1, f"{len(running)} Envoy processes on {name} (the old epoch did not exit)"


@pytest.mark.units("consul.service", "meshvm-agent.service", "envoy.service")
def test_every_check_passes_and_no_maintenance_is_left(consul: Any) -> None:
    def failing() -> list[str]:
        bad = []
        for name in VMS:
            for check in consul(f"/v1/health/node/{name}"):
                if check["Status"] != "passing" or "maintenance" in check["CheckID"]:
                    bad.append(f"{name}: {check['CheckID']}={check['Status']}")
        return bad

    wait_for("every check passing without maintenance", lambda: not failing(), timeout=120, describe=failing)
    assert {e["Node"]["Node"] for e in consul("/v1/health/connect/api?passing=1")} == {"vm2", "vm3"}
