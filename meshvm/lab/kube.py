"""A real kube-apiserver with etcd for the lab (RBAC on, secure port only, static tokens, Istio's CRDs), and the
controllers of kube-controller-manager the lab's pods need (EndpointSlices, ServiceAccounts)."""

from __future__ import annotations

import logging
import secrets
import ssl
import time
from pathlib import Path
from typing import Any

import yaml

from meshvm import pki
from meshvm.bootstrap import Bootstrap
from meshvm.errors import OperationFailedError
from meshvm.fsutil import atomic_write
from meshvm.kube import client, rbac
from meshvm.lab import network
from meshvm.lab.procs import free_port, http_ok, spawn, wait_until

log = logging.getLogger(__name__)

NAMESPACE = "meshvm"
ADMIN_USER = "lab-admin"
RESTRICTED_USER = "meshvm-registrar"
# kube-controller-manager's own identity (bootstrap RBAC knows it); each controller then runs as its own
# ServiceAccount in kube-system (--use-service-account-credentials), with only that controller's rights.
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
CONTROLLERS = ("endpointslice", "serviceaccount")
NODE = "lab-node"


def start_etcd(binary: Path, state: Path) -> dict[str, Any]:
    client_port, peer_port = free_port(), free_port()
    data = state / "etcd" / "data"
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    log_path = state / "etcd" / "etcd.log"
    url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    pid = spawn(
        [
            str(binary),
            "--name=lab",
            f"--data-dir={data}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=lab={peer}",
            "--listen-metrics-urls=",
            "--log-level=warn",
        ],
        log_path=log_path,
    )
    wait_until("etcd", http_ok(f"{url}/health"), timeout=30, log_path=log_path, pid=pid)
    return {"pid": pid, "url": url, "log": str(log_path)}


def start_apiserver(binary: Path, state: Path, etcd_url: str) -> dict[str, Any]:
    pki_dir = state / "kube" / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca = pki.new_ca("meshvm-lab-kubernetes-ca")
    serving = pki.issue(
        ca,
        "kube-apiserver",
        ips=(network.BRIDGE_ADDRESS, "127.0.0.1"),
        server=True,
        dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"),
    )
    signing = pki.new_ca("service-account-signer")
    for name, content, mode in (
        ("ca.crt", ca.cert_pem, 0o644),
        ("apiserver.crt", serving.cert_pem, 0o644),
        ("apiserver.key", serving.key_pem, 0o600),
        ("sa.key", signing.key_pem, 0o600),
        ("sa.pub", _public_pem(signing), 0o644),
    ):
        atomic_write(pki_dir / name, content, mode=mode)
    admin_token, restricted_token, kcm_token = (secrets.token_urlsafe(32) for _ in range(3))
    tokens = state / "kube" / "tokens.csv"
    atomic_write(
        tokens,
        f'{admin_token},{ADMIN_USER},uid-admin,"system:masters"\n{restricted_token},{RESTRICTED_USER},uid-registrar\n'
        f"{kcm_token},{CONTROLLER_MANAGER_USER},uid-kcm\n",
        mode=0o600,
    )
    port = free_port(network.BRIDGE_ADDRESS)
    log_path = state / "kube" / "kube-apiserver.log"
    argv = [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={network.BRIDGE_ADDRESS}",
        f"--advertise-address={network.BRIDGE_ADDRESS}",
        f"--secure-port={port}",
        f"--cert-dir={pki_dir}",
        f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
        f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
        f"--token-auth-file={tokens}",
        "--anonymous-auth=false",
        "--authorization-mode=RBAC",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={pki_dir / 'sa.pub'}",
        f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
        "--service-cluster-ip-range=10.96.0.0/24",
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]
    pid = spawn(argv, log_path=log_path)
    server = f"https://{network.BRIDGE_ADDRESS}:{port}"
    context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    wait_until(
        "kube-apiserver",
        http_ok(f"{server}/readyz", context=context, headers={"Authorization": f"Bearer {admin_token}"}),
        timeout=120,
        log_path=log_path,
        pid=pid,
    )
    kubeconfig = state / "kubeconfig"
    ca_file = pki_dir / "ca.crt"
    contexts = {"lab-admin": (ADMIN_USER, admin_token), "lab-registrar": (RESTRICTED_USER, restricted_token)}
    atomic_write(kubeconfig, yaml.safe_dump(_kubeconfig(server, ca_file, contexts)), mode=0o600)
    atomic_write(
        controller_manager_kubeconfig(state),
        yaml.safe_dump(_kubeconfig(server, ca_file, {"lab-controller-manager": (CONTROLLER_MANAGER_USER, kcm_token)})),
        mode=0o600,
    )
    return {
        "pid": pid,
        "server": server,
        "kubeconfig": str(kubeconfig),
        "ca": str(pki_dir / "ca.crt"),
        "log": str(log_path),
    }


def _public_pem(pair: pki.KeyPair) -> str:
    from cryptography.hazmat.primitives import serialization

    return (
        pair.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def controller_manager_kubeconfig(state: Path) -> Path:
    return state / "kube" / "controller-manager.kubeconfig"


def _kubeconfig(server: str, ca: Path, contexts: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """``contexts``: context name -> (user, token); the first context is the current one."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": next(iter(contexts)),
        "clusters": [{"name": "meshvm-lab", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}} for user, token in contexts.values()],
        "contexts": [
            {"name": name, "context": {"cluster": "meshvm-lab", "user": user, "namespace": NAMESPACE}}
            for name, (user, _token) in contexts.items()
        ],
    }


def start_controller_manager(binary: Path, state: Path) -> dict[str, Any]:
    """Only the controllers the lab's pods need; no HTTPS port of its own, no leader election (one instance)."""
    log_path = state / "kube" / "kube-controller-manager.log"
    pid = spawn(
        [
            str(binary),
            f"--kubeconfig={controller_manager_kubeconfig(state)}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ],
        log_path=log_path,
    )
    return {"pid": pid, "log": str(log_path), "controllers": list(CONTROLLERS)}


def wait_controllers(kubeconfig: Path, *, pid: int, log_path: Path) -> None:
    """The serviceaccount controller has made ``default`` in a namespace: the controllers are running."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    core = k8s.CoreV1Api(client.api_client(kubeconfig, context="lab-admin"))

    def probe() -> bool:
        try:
            core.read_namespaced_service_account("default", NAMESPACE)
        except ApiException:
            return False
        return True

    wait_until("kube-controller-manager", probe, timeout=60, log_path=log_path, pid=pid)


def install_cluster_objects(kubeconfig: Path, bootstrap: Bootstrap, crds_file: Path) -> None:
    """Istio's CRDs (from its module), the node the lab's pods run on, the istio-system and meshvm namespaces, the
    registrar's namespaced RBAC (bound to the restricted user) and the bootstrap material `meshvm join` reads."""
    api = client.api_client(kubeconfig, context="lab-admin")
    crds = [doc for doc in yaml.safe_load_all(crds_file.read_text()) if doc]
    client.apply(api, crds)
    _wait_crds_established(api, [crd["metadata"]["name"] for crd in crds])
    client.apply(api, [_node(), _namespace("istio-system")])
    client.apply(api, rbac.manifests(NAMESPACE, user=RESTRICTED_USER))
    client.apply(api, bootstrap.manifests(NAMESPACE))


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _node() -> dict[str, Any]:
    """The one node the lab's pods are bound to (the EndpointSlice controller skips pods whose node it cannot
    find). No kubelet runs: the lab writes pod status itself, and no node controller is there to evict them."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "labels": {
                "kubernetes.io/hostname": NODE,
                "topology.kubernetes.io/region": "lab",
                "topology.kubernetes.io/zone": "lab-a",
            },
        },
    }


def _wait_crds_established(api: Any, names: list[str]) -> None:
    from kubernetes import client as k8s

    ext = k8s.ApiextensionsV1Api(api)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = 0
        for name in names:
            status = ext.read_custom_resource_definition(name).status
            conditions = (status.conditions if status else None) or []
            ready += any(c.type == "Established" and c.status == "True" for c in conditions)
        if ready == len(names):
            return
        time.sleep(0.2)
    raise OperationFailedError(f"CRDs {', '.join(names)} not established after 30s")
