"""The meshvm_agent role's filter plugin: role variables become agent.yaml through meshvm's own model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from meshvm.config import load_config
from tests.ansible.argspec import REPO

PLUGIN = REPO / "plugins" / "filter" / "meshvm_config.py"


@pytest.fixture(scope="module")
def plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshvm_config_filter", PLUGIN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variables(**services: Any) -> dict[str, Any]:
    return {
        "node": "vm1",
        "address": "198.51.100.11",
        "consul": {"token_file": "/etc/meshvm/consul-token", "policy_prefix": "meshvm/lab-vms/policy"},
        "envoy": {"drain_time": "10s"},
        "agent": {},
        "services": [
            {"name": "web", "port": 8080, "mesh_port": 21000, "upstreams": [{"service": "api", "local_port": 9191}]},
            *services.values(),
        ],
    }


def test_the_yaml_is_what_meshvm_loads_with_every_default_spelled_out(plugin: ModuleType, tmp_path: Path) -> None:
    text = plugin.FilterModule().filters()["meshvm_agent_config_yaml"](_variables())
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded.node == "vm1"
    assert loaded.envoy.drain_time == 10.0
    assert loaded.services[0].upstreams[0].local_port == 9191
    data = yaml.safe_load(text)
    assert data["envoy"]["admin_port"] == 19000, "defaults are written out"
    assert data["consul"]["token_file"] == "/etc/meshvm/consul-token"
    assert "token" not in {k for k in data["consul"] if k != "token_file"}


def test_a_bad_configuration_stops_with_meshvm_s_one_line_error(plugin: ModuleType) -> None:
    clash = {"name": "api", "port": 8081, "mesh_port": 19000}
    with pytest.raises(AnsibleFilterError) as caught:
        plugin.meshvm_agent_config(_variables(extra=clash), "meshvm_agent variables of vm1")
    message = str(caught.value)
    assert message.startswith("meshvm_agent variables of vm1: ")
    assert "port 19000 is used twice: envoy.admin_port and services[api].mesh_port" in message
    assert "\n" not in message


def test_a_public_admin_address_is_refused(plugin: ModuleType) -> None:
    variables = _variables()
    variables["envoy"] = {"admin_address": "0.0.0.0"}
    with pytest.raises(AnsibleFilterError, match=r"envoy\.admin_address: .*not a loopback address"):
        plugin.meshvm_agent_config(variables)
