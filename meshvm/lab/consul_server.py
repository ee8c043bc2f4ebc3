"""A real Consul server for the lab, on the bridge address and loopback, with gossip encryption, Connect and ACLs."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshvm.config import ConsulSpec
from meshvm.consul import tokens
from meshvm.consul.client import ConsulClient
from meshvm.errors import MeshvmError, OperationFailedError
from meshvm.fsutil import atomic_write
from meshvm.lab import network
from meshvm.lab.procs import free_port, spawn, wait_until

log = logging.getLogger(__name__)

DATACENTER = "lab"
# The lab's shared token (one for every VM's two agents: the bootstrap material's `acl_token` way), which the lab's
# mesh nodes use; the nspawn VMs get their own two tokens from the issuer token (meshvm.consul.tokens).
VM_POLICY_NAME = "meshvm-vm"
VM_POLICY_RULES = {
    "node_prefix": {"": {"policy": "write"}},
    "service_prefix": {"": {"policy": "write"}},
    "agent_prefix": {"": {"policy": "read"}},
    "key_prefix": {"meshvm/": {"policy": "read"}},
}
ISSUER_POLICY_NAME = "meshvm-issuer"


@dataclass(frozen=True)
class ConsulPorts:
    http: int
    serf_lan: int
    serf_wan: int
    server: int
    grpc: int

    @classmethod
    def pick(cls) -> ConsulPorts:
        host = network.BRIDGE_ADDRESS
        return cls(
            http=free_port(host),
            serf_lan=free_port(host),
            serf_wan=free_port(host),
            server=free_port(host),
            grpc=free_port(host),
        )


def server_config(*, data_dir: Path, ports: ConsulPorts, gossip_key: str, master_token: str) -> dict[str, Any]:
    return {
        "datacenter": DATACENTER,
        "node_name": "lab-server",
        "server": True,
        "bootstrap_expect": 1,
        "data_dir": str(data_dir),
        "bind_addr": network.BRIDGE_ADDRESS,
        "advertise_addr": network.BRIDGE_ADDRESS,
        "client_addr": f"127.0.0.1 {network.BRIDGE_ADDRESS}",
        "ports": {
            "http": ports.http,
            "dns": -1,
            "serf_lan": ports.serf_lan,
            "serf_wan": ports.serf_wan,
            "server": ports.server,
            "grpc": ports.grpc,
        },
        "encrypt": gossip_key,
        "connect": {"enabled": True},
        "acl": {
            "enabled": True,
            "default_policy": "deny",
            "down_policy": "extend-cache",
            "tokens": {"master": master_token, "agent": master_token},
        },
        "performance": {"raft_multiplier": 1},
        "ui": False,
        "log_level": "INFO",
        "disable_update_check": True,
    }


def start(binary: Path, state: Path) -> dict[str, Any]:
    """Start the server; return what clients need (address, ports, datacenter, gossip key, tokens)."""
    ports = ConsulPorts.pick()
    gossip_key = base64.b64encode(secrets.token_bytes(32)).decode()
    master_token = _uuid()
    config_path = config_file(state)
    config = server_config(
        data_dir=state / "consul" / "data", ports=ports, gossip_key=gossip_key, master_token=master_token
    )
    atomic_write(config_path, json.dumps(config, indent=2), mode=0o600)
    pid = launch(binary, state)
    local = f"127.0.0.1:{ports.http}"
    vm_token = _create_token(local, master_token, VM_POLICY_NAME, VM_POLICY_RULES, "meshvm lab VMs (shared)")
    issuer_token = _create_token(local, master_token, ISSUER_POLICY_NAME, tokens.ISSUER_RULES, "meshvm issuer")
    return {
        "pid": pid,
        "http_addr": f"{network.BRIDGE_ADDRESS}:{ports.http}",
        "local_http_addr": f"127.0.0.1:{ports.http}",
        "serf_lan_addr": f"{network.BRIDGE_ADDRESS}:{ports.serf_lan}",
        "grpc_port": ports.grpc,
        "datacenter": DATACENTER,
        "gossip_key": gossip_key,
        "management_token": master_token,
        "vm_token": vm_token,
        "issuer_token": issuer_token,
        "log": str(state / "consul" / "consul.log"),
    }


def config_file(state: Path) -> Path:
    return state / "consul" / "server.json"


def launch(binary: Path, state: Path) -> int:
    """Start the server from its saved configuration (and data) and wait for a leader; returns its PID."""
    config = json.loads(config_file(state).read_text())
    log_path = state / "consul" / "consul.log"
    pid = spawn([str(binary), "agent", f"-config-file={config_file(state)}"], log_path=log_path)
    leader = _has_leader(f"127.0.0.1:{config['ports']['http']}")
    wait_until("Consul leader", leader, timeout=30, log_path=log_path, pid=pid)
    return pid


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def _client(http_addr: str, token: str | None = None) -> ConsulClient:
    return ConsulClient(ConsulSpec(http_addr=http_addr), token)


def _has_leader(http_addr: str) -> Any:
    client = _client(http_addr)

    def probe() -> bool:
        try:
            return bool(client.leader())
        except MeshvmError:
            return False

    return probe


def _create_token(http_addr: str, master_token: str, policy: str, rules: dict[str, Any], description: str) -> str:
    client = _client(http_addr, master_token)
    # ACL bootstrapping finishes a moment after the leader is elected: until then Consul refuses or fails.
    for _ in range(50):
        try:
            return client.create_acl_token(policy, rules, description)
        except MeshvmError as exc:
            last = exc
            time.sleep(0.2)
    raise OperationFailedError(f"Consul would not create the lab's ACL token {description!r}: {last}")
