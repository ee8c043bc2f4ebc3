"""What a running lab is made of, saved as JSON so `down` removes exactly that and `status` can report it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from meshvm.errors import ConfigError
from meshvm.fsutil import atomic_write

DEFAULT_STATE_DIR = Path("/var/lib/meshvm-lab")
STATE_FILE = "lab.json"


class Process(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pid: int
    log: str


class ConsulInfo(Process):
    version: str
    binary: str
    http_addr: str
    local_http_addr: str
    serf_lan_addr: str
    grpc_port: int
    datacenter: str
    gossip_key: str
    management_token: str
    vm_token: str


class EtcdInfo(Process):
    version: str
    url: str


class KubeInfo(Process):
    version: str
    server: str
    kubeconfig: str
    ca: str


class EnvoyInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    binary: str
    sha256: str


class Host(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    index: int
    address: str


class LabState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_dir: str
    consul: ConsulInfo | None = None
    etcd: EtcdInfo | None = None
    kube: KubeInfo | None = None
    envoy: EnvoyInfo | None = None
    hosts: list[Host] = []
    host_os: str = ""
    ssh_key: str = ""
    ssh_config: str = ""
    known_hosts: str = ""
    inventory: str = ""
    consul_env: str = ""
    cache_dir: str = ""

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / STATE_FILE

    def save(self) -> None:
        atomic_write(self.path, self.model_dump_json(indent=2), mode=0o600)

    def ssh_argv(self, host: Host) -> list[str]:
        """ssh to ``host`` as root with the lab key and the lab's pinned host keys."""
        return ["ssh", "-F", self.ssh_config, host.name]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ConfigError(f"no lab host named {name!r}", hint=f"lab hosts: {', '.join(h.name for h in self.hosts)}")


def load(state_dir: Path = DEFAULT_STATE_DIR) -> LabState | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return LabState.model_validate(data)
