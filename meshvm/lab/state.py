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
    issuer_token: str


class EtcdInfo(Process):
    version: str
    url: str


class KubeInfo(Process):
    version: str
    server: str
    kubeconfig: str
    ca: str


class ControllerManagerInfo(Process):
    version: str
    controllers: list[str]


class ClusterDnsInfo(Process):
    version: str
    address: str  # <bridge>:53, the pods' nameserver
    ready_addr: str  # 127.0.0.1:<port>/ready


class IstiodInfo(Process):
    version: str
    http_addr: str  # 127.0.0.1:<port>: /ready and the debug endpoints
    xds_addr: str  # <bridge>:15012: xDS and the CA, over TLS
    pilot_agent: str  # the sidecar agent of the same build, linked where pod processes can run it
    envoy: str  # likewise, the Envoy binary pods run


class JaegerInfo(Process):
    version: str
    zipkin_addr: str  # <bridge>:9411, where sidecars send spans (Zipkin v2 JSON)
    otlp_addr: str  # <bridge>:4317, OTLP over gRPC
    query_url: str  # http://<bridge>:16686: /api/traces/<id>
    health_addr: str  # 127.0.0.1:<port>/status


class Pod(BaseModel):
    """A lab pod: a network namespace on the bridge whose Pod object, ServiceAccount and Service are in the API
    server, with pilot-agent (and its Envoy) as the sidecar and a small test app."""

    model_config = ConfigDict(extra="forbid")
    name: str
    index: int
    namespace: str
    service_account: str
    address: str
    root: str  # pilot-agent's working directory: its token, root certificate and Envoy files, relative to it
    sidecar_pid: int | None = None
    app_pid: int | None = None


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
    controller_manager: ControllerManagerInfo | None = None
    dns: ClusterDnsInfo | None = None
    istiod: IstiodInfo | None = None
    jaeger: JaegerInfo | None = None
    envoy: EnvoyInfo | None = None
    hosts: list[Host] = []
    pods: list[Pod] = []
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

    def pod(self, name: str) -> Pod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        names = ", ".join(p.name for p in self.pods) or "none (start them with `meshvm lab up --pods N`)"
        raise ConfigError(f"no lab pod named {name!r}", hint=f"lab pods: {names}")


def load(state_dir: Path = DEFAULT_STATE_DIR) -> LabState | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return LabState.model_validate(data)
