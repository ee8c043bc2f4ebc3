"""The cluster's DNS: CoreDNS with its kubernetes plugin, on the bridge address, port 53 (the pods' nameserver, as a
kubelet's ``--cluster-dns`` would set it).

Pods' own DNS goes to Istio's DNS proxy first (their DNS capture); it answers the names it knows from istiod and
asks here for the rest, as in a real cluster: a name under ``cluster.local`` that does not exist gets NXDOMAIN at
once. Names outside ``cluster.local`` are refused: the lab has no way out, and no resolver to forward to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from meshvm.fsutil import atomic_write
from meshvm.lab import network
from meshvm.lab.procs import free_port, http_ok, spawn, wait_until

log = logging.getLogger(__name__)

PORT = 53
CLUSTER_DOMAIN = "cluster.local"


def corefile(kubeconfig: Path, ready_addr: str) -> str:
    return (
        f"{CLUSTER_DOMAIN}:{PORT} in-addr.arpa:{PORT} {{\n"
        f"    bind {network.BRIDGE_ADDRESS}\n"
        "    errors\n"
        f"    ready {ready_addr}\n"
        f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{\n"
        f"        kubeconfig {kubeconfig} lab-admin\n"
        "        pods disabled\n"
        "        fallthrough in-addr.arpa\n"
        "    }\n"
        "}\n"
    )


def start(binary: Path, state: Path, kubeconfig: Path) -> dict[str, Any]:
    home = state / "coredns"
    home.mkdir(parents=True, exist_ok=True)
    ready_addr = f"127.0.0.1:{free_port()}"
    config = home / "Corefile"
    atomic_write(config, corefile(kubeconfig, ready_addr), mode=0o644)
    log_path = home / "coredns.log"
    pid = spawn([str(binary), "-conf", str(config)], log_path=log_path, cwd=home)
    wait_until("CoreDNS", http_ok(f"http://{ready_addr}/ready"), timeout=30, log_path=log_path, pid=pid)
    return {"pid": pid, "log": str(log_path), "address": f"{network.BRIDGE_ADDRESS}:{PORT}", "ready_addr": ready_addr}
