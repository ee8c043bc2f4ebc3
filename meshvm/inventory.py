"""The Ansible inventory as meshvm sees it: hosts, how to reach them, and the services they run.

Read with ``ansible-inventory --list``, so every inventory format and plugin Ansible supports works here too.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from meshvm.config import EnvoySpec, ServiceSpec, format_validation_error
from meshvm.errors import ConfigError, PrerequisiteError

GROUP = "meshvm"


@dataclass(frozen=True)
class InventoryHost:
    name: str
    address: str
    user: str = "root"
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    strict_host_keys: bool = True
    services: tuple[ServiceSpec, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def envoy_admin_port(self) -> int:
        """Envoy's admin port on the host (meshvm_agent_envoy.admin_port; the agent model's default otherwise)."""
        return int((self.variables.get("meshvm_agent_envoy") or {}).get("admin_port", EnvoySpec().admin_port))


def _ssh_options(args: str) -> dict[str, str]:
    options: dict[str, str] = {}
    words = shlex.split(args or "")
    for index, word in enumerate(words):
        if word == "-o" and index + 1 < len(words) and "=" in words[index + 1]:
            key, value = words[index + 1].split("=", 1)
            options[key.lower()] = value
    return options


def _services(name: str, variables: dict[str, Any]) -> tuple[ServiceSpec, ...]:
    raw = variables.get("meshvm_agent_services") or []
    try:
        return tuple(ServiceSpec.model_validate(item) for item in raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(f"inventory host {name}: meshvm_agent_services", exc)) from exc


def load(inventory: Path | Sequence[Path], *, group: str = GROUP) -> dict[str, InventoryHost]:
    """Hosts of ``group`` (default ``meshvm``) by name, from one inventory or several layered as Ansible layers them
    (later sources override earlier ones). Bad inventory -> ConfigError naming the file."""
    sources = [inventory] if isinstance(inventory, Path) else list(inventory)
    for source in sources:
        if not source.exists():
            raise ConfigError(f"inventory {source} does not exist", hint="pass -i with an Ansible inventory")
    binary = shutil.which("ansible-inventory") or str(Path(sys.executable).parent / "ansible-inventory")
    if not Path(binary).exists():
        raise PrerequisiteError("ansible-inventory is not installed", hint="pip install 'meshvm[controller]'")
    inventory = sources[0]
    done = subprocess.run(
        [binary, *(a for source in sources for a in ("-i", str(source))), "--list"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"inventory {', '.join(map(str, sources))}: ansible-inventory failed: {last}")
    data = json.loads(done.stdout)
    names = data.get(group, {}).get("hosts", [])
    if not names:
        raise ConfigError(
            f"inventory {inventory} has no hosts in group {group!r}",
            hint=f"put the VMs to enrol under a `{group}` group",
        )
    hostvars = data.get("_meta", {}).get("hostvars", {})
    hosts = {}
    for name in names:
        variables = hostvars.get(name, {})
        options = _ssh_options(str(variables.get("ansible_ssh_common_args", "")))
        hosts[name] = InventoryHost(
            name=name,
            address=str(variables.get("ansible_host", name)),
            user=str(variables.get("ansible_user", "root")),
            port=int(variables.get("ansible_port", 22)),
            key_file=variables.get("ansible_ssh_private_key_file"),
            known_hosts=options.get("userknownhostsfile"),
            strict_host_keys=options.get("stricthostkeychecking", "yes").lower() != "no",
            services=_services(name, variables),
            variables=variables,
        )
    return hosts


def select(hosts: dict[str, InventoryHost], wanted: list[str]) -> dict[str, InventoryHost]:
    """The hosts named in ``wanted`` (all when empty), in inventory order; a name may be a glob (``web-*``) as in
    Ansible's --limit. A name or glob that matches nothing is a usage error naming it."""
    if not wanted:
        return hosts
    unknown = [w for w in wanted if not fnmatch.filter(hosts, w)]
    if unknown:
        raise ConfigError(
            f"unknown host{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in the inventory",
            hint=f"known: {', '.join(sorted(hosts))}",
        )
    return {name: host for name, host in hosts.items() if any(fnmatch.fnmatchcase(name, w) for w in wanted)}
