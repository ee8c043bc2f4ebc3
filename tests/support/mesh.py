"""Mesh nodes on the lab host: a real Consul client agent, the real `meshvm agent` and a real Envoy per node.

Each node has its own loopback address (127.0.0.N) and joins the lab's Consul server like a VM would. This is the
agent's proving ground: many topologies, fast; the roles prove the same on the nspawn VMs.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import consul
import yaml

from meshvm.lab.procs import alive, spawn, stop, wait_until
from meshvm.lab.procs import free_port as _free_port
from meshvm.lab.state import LabState

REPO = Path(__file__).resolve().parents[2]
_taken: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port never handed out before in this process (free_port alone may return one twice)."""
    while (port := _free_port(host)) in _taken:
        pass
    _taken.add(port)
    return port


_addresses = itertools.count(20)


def meshvm_exe() -> str:
    return shutil.which("meshvm") or str(REPO / ".venv" / "bin" / "meshvm")


def next_address() -> str:
    return f"127.0.0.{next(_addresses)}"


def ssh(lab: LabState, host: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``command`` on a lab VM as root over the lab's SSH config; never raises on a non-zero exit."""
    return subprocess.run(
        [*lab.ssh_argv(lab.host(host)), shlex.join(command)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def management(lab: LabState) -> consul.Consul:
    assert lab.consul is not None
    host, port = lab.consul.local_http_addr.split(":")
    return consul.Consul(host=host, port=int(port), token=lab.consul.management_token)


def http_json(url: str, timeout: float = 2.0, token: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"X-Consul-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class MeshNode:
    """One pretend VM: Consul client + meshvm agent + Envoy, all real processes, on ``address``."""

    def __init__(
        self,
        lab: LabState,
        name: str,
        workdir: Path,
        envoy: Path,
        *,
        policy_prefix: str = "meshvm/policy",
        address: str | None = None,
    ) -> None:
        assert lab.consul is not None
        self.lab = lab
        self.policy_prefix = policy_prefix
        self.name = name
        self.address = address or next_address()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.envoy_bin = envoy
        self.consul_http = free_port(self.address)
        self.consul_serf = free_port(self.address)
        self.admin_port = free_port()
        self.agent_port = free_port()
        self.pids: dict[str, int] = {}
        self.services: list[dict[str, Any]] = []
        self.sections: dict[str, Any] = {}  # more of agent.yaml: tracing:, locality:
        self.token_file = self.dir / "consul-token"
        self.token_file.write_text(lab.consul.vm_token)
        self.token_file.chmod(0o600)

    # --- consul client ---------------------------------------------------------------------------------------

    def consul_config(self) -> dict[str, Any]:
        assert self.lab.consul is not None
        return {
            "datacenter": self.lab.consul.datacenter,
            "node_name": self.name,
            "data_dir": str(self.dir / "consul-data"),
            "bind_addr": self.address,
            "advertise_addr": self.address,
            "client_addr": self.address,
            "ports": {
                "http": self.consul_http,
                "dns": -1,
                "serf_lan": self.consul_serf,
                "serf_wan": -1,
                "grpc": -1,
                "server": free_port(self.address),
            },
            "retry_join": [self.lab.consul.serf_lan_addr],
            "encrypt": self.lab.consul.gossip_key,
            "acl": {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "tokens": {"agent": self.lab.consul.vm_token},
            },
            "leave_on_terminate": True,
            "limits": {"http_max_conns_per_client": 4096},
            "disable_update_check": True,
            "log_level": "WARN",
        }

    def start_consul(self) -> None:
        assert self.lab.consul is not None
        path = self.dir / "consul.json"
        path.write_text(json.dumps(self.consul_config()))
        log = self.dir / "consul.log"
        self.pids["consul"] = spawn([self.lab.consul.binary, "agent", f"-config-file={path}"], log_path=log)
        wait_until(f"{self.name} consul joined", self._joined, timeout=30, log_path=log, pid=self.pids["consul"])

    def _joined(self) -> bool:
        try:
            base = f"http://{self.address}:{self.consul_http}"
            members = http_json(f"{base}/v1/agent/members", token=self.lab.consul.vm_token)  # type: ignore[union-attr]
            leader = http_json(f"{base}/v1/status/leader")
        except (OSError, ValueError):
            return False
        return bool(leader) and any(m["Name"] == "lab-server" and m["Status"] == 1 for m in members)

    def stop_consul(self) -> None:
        stop(self.pids.pop("consul"))

    # --- meshvm agent ----------------------------------------------------------------------------------------

    def add_service(
        self,
        name: str,
        port: int,
        *,
        protocol: str = "http",
        upstreams: list[dict[str, Any]] = (),  # type: ignore[assignment]
        check: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        service = {
            "name": name,
            "port": port,
            "protocol": protocol,
            "mesh_port": free_port(self.address),
            "upstreams": [{"local_port": free_port(), **u} for u in upstreams],
            "check": check or {"type": "tcp"},
            **extra,
        }
        self.services.append(service)
        return service

    def agent_config(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "address": self.address,
            "consul": {
                "http_addr": f"{self.address}:{self.consul_http}",
                "token_file": str(self.token_file),
                "blocking_wait": "10s",
                "policy_prefix": self.policy_prefix,
            },
            "envoy": {
                "admin_port": self.admin_port,
                "bind_address": self.address,
                "config_dir": str(self.dir / "envoy"),
                "bootstrap_path": str(self.dir / "envoy.json"),
                "prometheus_port": None,
                "access_log_path": str(self.dir / "access.log"),
                "connect_timeout": "1s",
            },
            "agent": {"listen_port": self.agent_port, "debounce": "20ms"},
            "services": self.services,
            **self.sections,
        }

    @property
    def config_path(self) -> Path:
        return self.dir / "agent.yaml"

    def start_agent(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.agent_config()))
        log = self.dir / "agent.log"
        self.pids["agent"] = spawn([meshvm_exe(), "-v", "agent", "-c", str(self.config_path)], log_path=log)
        wait_until(f"{self.name} agent healthy", self.agent_healthy, timeout=90, log_path=log, pid=self.pids["agent"])

    def agent_healthy(self) -> bool:
        try:
            return bool(http_json(f"http://127.0.0.1:{self.agent_port}/health")["rendered"])
        except (OSError, ValueError):
            return False

    def agent_health(self) -> dict[str, Any]:
        try:
            return dict(http_json(f"http://127.0.0.1:{self.agent_port}/health"))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    def agent_metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}/metrics", timeout=2) as response:
            return str(response.read().decode())

    def stop_agent(self) -> None:
        stop(self.pids.pop("agent"))

    # --- envoy -----------------------------------------------------------------------------------------------

    def start_envoy(self) -> None:
        subprocess.run(
            [meshvm_exe(), "render", "bootstrap", "-c", str(self.config_path), "-o", str(self.dir / "envoy.json")],
            check=True,
            capture_output=True,
        )
        log = self.dir / "envoy.log"
        self.pids["envoy"] = spawn(
            [
                str(self.envoy_bin),
                "-c",
                str(self.dir / "envoy.json"),
                "--disable-hot-restart",
                "-l",
                "warning",
                "--concurrency",
                "2",
            ],
            log_path=log,
        )
        wait_until(f"{self.name} envoy ready", self._envoy_ready, timeout=30, log_path=log, pid=self.pids["envoy"])

    def _envoy_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                return response.read().strip() == b"LIVE"
        except OSError:
            return False

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=3) as response:
            return str(response.read().decode())

    def stat(self, name: str) -> int:
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def endpoints(self, cluster: str, *, healthy_only: bool = True) -> list[str]:
        """Addresses Envoy currently has (and, by default, considers healthy) for ``cluster``, from the admin API."""
        data = json.loads(self.admin("/clusters?format=json"))
        for status in data.get("cluster_statuses", []):
            if status["name"] == cluster:
                hosts = [
                    h
                    for h in status.get("host_statuses", [])
                    if not healthy_only or h.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                ]
                return sorted(
                    f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}"
                    for h in hosts
                )
        return []

    def listener_up(self, name: str) -> bool:
        return name in self.admin("/listeners")

    def upstream_url(self, service: str, upstream: str, path: str = "/") -> str:
        spec = next(s for s in self.services if s["name"] == service)
        port = next(u["local_port"] for u in spec["upstreams"] if u["service"] == upstream)
        return f"http://127.0.0.1:{port}{path}"

    def upstream_port(self, service: str, upstream: str) -> int:
        spec = next(s for s in self.services if s["name"] == service)
        return int(next(u["local_port"] for u in spec["upstreams"] if u["service"] == upstream))

    def mesh_port(self, service: str) -> int:
        return int(next(s["mesh_port"] for s in self.services if s["name"] == service))

    # --- whole node ------------------------------------------------------------------------------------------

    def start(self) -> MeshNode:
        self.start_consul()
        self.start_agent()
        self.start_envoy()
        return self

    def stop(self) -> None:
        for name in ("envoy", "agent", "consul"):
            pid = self.pids.pop(name, None)
            if pid is not None and alive(pid):
                stop(pid)

    def logs(self) -> str:
        parts = []
        for name in ("agent.log", "envoy.log", "consul.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {self.name} {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def wait_for(what: str, probe: Any, timeout: float = 15.0, interval: float = 0.05) -> float:
    """Poll until ``probe()`` is truthy; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if probe():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def apply_policy(lab: LabState, policy: dict[str, Any], prefix: str = "meshvm/policy") -> None:
    """Write a policy with the same code `meshvm policy apply` uses."""
    from meshvm import policyops
    from meshvm.config import ConsulSpec
    from meshvm.consul.client import ConsulClient
    from meshvm.policy import parse_policy

    assert lab.consul is not None
    client = ConsulClient(ConsulSpec(http_addr=lab.consul.local_http_addr), lab.consul.management_token)
    policyops.apply(client, parse_policy(policy, "test policy"), prefix)


def env_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def purge_nodes(lab: LabState, prefix: str) -> list[str]:
    """Remove catalog nodes named ``prefix…`` (left behind by an interrupted run) so tests start from a clean
    catalog: force-leave them from gossip and deregister them."""
    c = management(lab)
    _, nodes = c.catalog.nodes()
    gone = [n["Node"] for n in nodes if n["Node"].startswith(prefix)]
    for name in gone:
        c.http.put(lambda r: r.code, f"/v1/agent/force-leave/{name}", headers=c.prepare_headers())
        c.http.put(
            lambda r: r.code, "/v1/catalog/deregister", data=json.dumps({"Node": name}), headers=c.prepare_headers()
        )
    return gone
