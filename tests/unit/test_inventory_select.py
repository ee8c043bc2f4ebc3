"""Host selection for join/leave: names and Ansible-style globs; anything that matches nothing is named."""

from __future__ import annotations

import pytest

from meshvm.errors import ConfigError
from meshvm.inventory import InventoryHost, select

HOSTS = {n: InventoryHost(name=n, address=f"198.51.100.{i}") for i, n in enumerate(["web-1", "api-1", "api-2"], 11)}


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ([], ["web-1", "api-1", "api-2"]),
        (["api-2", "web-1"], ["web-1", "api-2"]),
        (["api-*"], ["api-1", "api-2"]),
        (["api-?", "web-1"], ["web-1", "api-1", "api-2"]),
    ],
)
def test_names_and_globs_select_in_inventory_order(wanted: list[str], expected: list[str]) -> None:
    assert list(select(HOSTS, wanted)) == expected


def test_what_matches_nothing_is_named_with_the_known_hosts() -> None:
    with pytest.raises(ConfigError) as caught:
        select(HOSTS, ["api-1", "db-*", "vm9"])
    assert "unknown hosts db-*, vm9: not in the inventory" in str(caught.value)
    assert "api-1, api-2, web-1" in str(caught.value.hint)


def test_envoy_admin_port_comes_from_the_host_variables_or_the_model_default() -> None:
    assert InventoryHost(name="vm1", address="198.51.100.11").envoy_admin_port == 19000
    custom = InventoryHost(name="vm1", address="198.51.100.11", variables={"meshvm_agent_envoy": {"admin_port": 19005}})
    assert custom.envoy_admin_port == 19005
