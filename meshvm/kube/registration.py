"""VM workloads as Kubernetes objects: Service + EndpointSlice for any mesh, WorkloadEntry + ServiceEntry for Istio.

One Service (and, for Istio, one ServiceEntry) per mesh service, shared by the VMs that run it; one EndpointSlice
(and WorkloadEntry) per VM and service. Everything carries ``app.kubernetes.io/managed-by=meshvm`` and
``meshvm.io/vm=<host>``, so a VM's objects can be found, updated and removed by label.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from meshvm.config import ServiceSpec
from meshvm.errors import OperationFailedError, PeerUnreachableError
from meshvm.kube.rbac import MANAGED_BY

log = logging.getLogger(__name__)

Mesh = Literal["kubernetes", "istio", "consul"]
VM_LABEL = "meshvm.io/vm"
SERVICE_LABEL = "meshvm.io/service"
ISTIO = ("networking.istio.io", "v1")
CONFLICT_RETRIES = 5
PORT_NAMES = {"http": "http", "http2": "http2", "grpc": "grpc", "tcp": "tcp"}
APP_PROTOCOLS = {"http": "http", "http2": "kubernetes.io/h2c", "grpc": "grpc"}


@dataclass(frozen=True)
class VmWorkload:
    """One enrolled VM and the mesh services it runs."""

    host: str
    address: str
    services: tuple[ServiceSpec, ...]
    service_account: str = "default"
    network: str = ""
    locality: str = ""


def _labels(host: str | None, service: str) -> dict[str, str]:
    labels = {**MANAGED_BY, SERVICE_LABEL: service}
    if host is not None:
        labels[VM_LABEL] = host
    return labels


def _port(service: ServiceSpec) -> dict[str, Any]:
    port: dict[str, Any] = {"name": PORT_NAMES[service.protocol], "port": service.port, "protocol": "TCP"}
    if service.protocol in APP_PROTOCOLS:
        port["appProtocol"] = APP_PROTOCOLS[service.protocol]
    return port


def desired(workloads: Iterable[VmWorkload], namespace: str, mesh: Mesh) -> list[dict[str, Any]]:
    """Every object the workloads need, in apply order (Services before what refers to them)."""
    if mesh == "consul":
        return []  # Consul's catalog sync makes the cluster side; meshvm only registers in Consul
    shared: dict[str, dict[str, Any]] = {}
    per_vm: list[dict[str, Any]] = []
    for vm in sorted(workloads, key=lambda w: w.host):
        for svc in vm.services:
            port = _port(svc)
            shared.setdefault(
                f"Service/{svc.name}",
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": svc.name, "namespace": namespace, "labels": _labels(None, svc.name)},
                    # No selector: the endpoints are ours (EndpointSlices), not pods'.
                    "spec": {
                        "ports": [
                            {k: v for k, v in port.items() if k != "name"}
                            | {"name": port["name"], "targetPort": svc.port}
                        ],
                        "type": "ClusterIP",
                    },
                },
            )
            per_vm.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{svc.name}-{vm.host}",
                        "namespace": namespace,
                        "labels": {
                            **_labels(vm.host, svc.name),
                            "kubernetes.io/service-name": svc.name,
                            "endpointslice.kubernetes.io/managed-by": "meshvm.io",
                        },
                    },
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [vm.address], "conditions": {"ready": True}, "hostname": vm.host}],
                    "ports": [port],
                }
            )
            if mesh == "istio":
                labels = {"app": svc.name, **({"version": svc.version} if svc.version else {})}
                entry: dict[str, Any] = {
                    "address": vm.address,
                    "ports": {port["name"]: svc.port},
                    "labels": labels,
                    "serviceAccount": vm.service_account,
                }
                if vm.network:
                    entry["network"] = vm.network
                if vm.locality:
                    entry["locality"] = vm.locality
                per_vm.append(
                    {
                        "apiVersion": "networking.istio.io/v1",
                        "kind": "WorkloadEntry",
                        "metadata": {
                            "name": f"{svc.name}-{vm.host}",
                            "namespace": namespace,
                            "labels": _labels(vm.host, svc.name),
                        },
                        "spec": entry,
                    }
                )
                shared.setdefault(
                    f"ServiceEntry/{svc.name}",
                    {
                        "apiVersion": "networking.istio.io/v1",
                        "kind": "ServiceEntry",
                        "metadata": {"name": svc.name, "namespace": namespace, "labels": _labels(None, svc.name)},
                        "spec": {
                            "hosts": [f"{svc.name}.{namespace}.svc.cluster.local"],
                            "ports": [
                                {
                                    "number": svc.port,
                                    "name": port["name"],
                                    "protocol": port["name"].upper() if svc.protocol != "http2" else "HTTP2",
                                }
                            ],
                            "location": "MESH_INTERNAL",
                            "resolution": "STATIC",
                            "workloadSelector": {"labels": {"app": svc.name}},
                        },
                    },
                )
    return [*shared.values(), *per_vm]


# --- talking to the API server -------------------------------------------------------------------------------


@dataclass
class Kinds:
    """Typed clients for the kinds meshvm writes, keyed by kind."""

    api: Any
    core: Any = field(init=False)
    discovery: Any = field(init=False)
    custom: Any = field(init=False)

    def __post_init__(self) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(self.api)
        self.discovery = client.DiscoveryV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def read(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        if kind == "Service":
            return self.api.sanitize_for_serialization(self.core.read_namespaced_service(name, ns))  # type: ignore[no-any-return]
        if kind == "EndpointSlice":
            return self.api.sanitize_for_serialization(  # type: ignore[no-any-return]
                self.discovery.read_namespaced_endpoint_slice(name, ns)
            )
        return self.custom.get_namespaced_custom_object(*ISTIO, ns, _plural(kind), name)  # type: ignore[no-any-return]

    def create(self, obj: dict[str, Any]) -> None:
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        if kind == "Service":
            self.core.create_namespaced_service(ns, obj)
        elif kind == "EndpointSlice":
            self.discovery.create_namespaced_endpoint_slice(ns, obj)
        else:
            self.custom.create_namespaced_custom_object(*ISTIO, ns, _plural(kind), obj)

    def replace(self, obj: dict[str, Any]) -> None:
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind == "Service":
            self.core.replace_namespaced_service(name, ns, obj)
        elif kind == "EndpointSlice":
            self.discovery.replace_namespaced_endpoint_slice(name, ns, obj)
        else:
            self.custom.replace_namespaced_custom_object(*ISTIO, ns, _plural(kind), name, obj)

    def delete(self, kind: str, ns: str, name: str) -> None:
        if kind == "Service":
            self.core.delete_namespaced_service(name, ns)
        elif kind == "EndpointSlice":
            self.discovery.delete_namespaced_endpoint_slice(name, ns)
        else:
            self.custom.delete_namespaced_custom_object(*ISTIO, ns, _plural(kind), name)

    def list(self, kind: str, ns: str, selector: str) -> list[dict[str, Any]]:
        if kind == "Service":
            items = self.core.list_namespaced_service(ns, label_selector=selector).items
            return [self.api.sanitize_for_serialization(i) for i in items]
        if kind == "EndpointSlice":
            items = self.discovery.list_namespaced_endpoint_slice(ns, label_selector=selector).items
            return [self.api.sanitize_for_serialization(i) for i in items]
        try:
            return list(
                self.custom.list_namespaced_custom_object(*ISTIO, ns, _plural(kind), label_selector=selector)["items"]
            )
        except _api_exception() as exc:
            if getattr(exc, "status", None) == 404:
                return []  # no Istio CRDs in this cluster
            raise


KINDS = ("Service", "EndpointSlice", "WorkloadEntry", "ServiceEntry")


def _plural(kind: str) -> str:
    return {"WorkloadEntry": "workloadentries", "ServiceEntry": "serviceentries"}[kind]


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _call(what: str, fn: Callable[[], Any]) -> Any:
    from urllib3.exceptions import HTTPError

    try:
        return fn()
    except _api_exception() as exc:
        if getattr(exc, "status", None) == 403:
            raise OperationFailedError(
                f"Kubernetes refused {what}: 403 forbidden",
                hint="grant the identity `meshvm rbac` (or use a kubeconfig that has it)",
            ) from exc
        raise
    except HTTPError as exc:
        raise PeerUnreachableError(f"kube-apiserver unreachable ({what}): {exc}") from exc


def _same(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether ``current`` already has everything ``wanted`` says (the server adds defaults we do not compare)."""

    def covers(have: Any, want: Any) -> bool:
        if isinstance(want, dict):
            return isinstance(have, dict) and all(covers(have.get(k), v) for k, v in want.items())
        if isinstance(want, list):
            return (
                isinstance(have, list)
                and len(have) == len(want)
                and all(covers(h, w) for h, w in zip(have, want, strict=True))
            )
        return bool(have == want)

    body = {k: v for k, v in wanted.items() if k not in {"apiVersion", "kind", "metadata"}}
    return covers(current, body) and covers(current.get("metadata", {}).get("labels", {}), wanted["metadata"]["labels"])


def upsert(kinds: Kinds, obj: dict[str, Any]) -> str:
    """Create, or update (with the resourceVersion just read) only if it differs. Retries on 409 conflicts."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    api_exception = _api_exception()
    for _attempt in range(CONFLICT_RETRIES):
        try:
            current = _call(f"reading {kind}/{name}", lambda: kinds.read(kind, ns, name))
        except api_exception as exc:
            if getattr(exc, "status", None) != 404:
                raise
            try:
                _call(f"creating {kind}/{name}", lambda: kinds.create(obj))
            except api_exception as created:
                if getattr(created, "status", None) == 409:
                    continue  # created by someone else meanwhile: read and compare again
                raise
            return "created"
        if _same(current, obj):
            return "unchanged"
        update = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        if kind == "Service":
            # clusterIP is immutable and allocated by the server: keep it.
            update["spec"] = {**obj["spec"], "clusterIP": current["spec"].get("clusterIP")}
        try:
            _call(f"updating {kind}/{name}", functools.partial(kinds.replace, update))
        except api_exception as exc:
            if getattr(exc, "status", None) == 409:
                time.sleep(0.1)
                continue  # somebody else updated it: re-read and try again
            raise
        return "updated"
    raise OperationFailedError(f"{kind}/{name} kept changing under us ({CONFLICT_RETRIES} conflicts)")


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: str


def register(api: Any, workloads: Iterable[VmWorkload], namespace: str, mesh: Mesh) -> list[Change]:
    kinds = Kinds(api)
    return [Change(o["kind"], o["metadata"]["name"], upsert(kinds, o)) for o in desired(workloads, namespace, mesh)]


def managed(api: Any, namespace: str) -> list[dict[str, Any]]:
    """Every object meshvm manages in ``namespace``."""
    kinds = Kinds(api)
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    found: list[dict[str, Any]] = []
    for kind in KINDS:
        for item in _call(f"listing {kind}", functools.partial(kinds.list, kind, namespace, selector)):
            found.append({**item, "kind": kind})
    return found


def remove_hosts(api: Any, namespace: str, hosts: set[str]) -> list[Change]:
    """Delete the per-VM objects of ``hosts``, then shared objects no VM uses any more. Idempotent."""
    kinds = Kinds(api)
    changes = []
    objects = managed(api, namespace)
    still_used = set()
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        host = labels.get(VM_LABEL)
        if host is None:
            continue
        if host in hosts:
            _call(
                f"deleting {obj['kind']}",
                functools.partial(kinds.delete, obj["kind"], namespace, obj["metadata"]["name"]),
            )
            changes.append(Change(obj["kind"], obj["metadata"]["name"], "deleted"))
        else:
            still_used.add(labels.get(SERVICE_LABEL))
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        if VM_LABEL not in labels and labels.get(SERVICE_LABEL) not in still_used:
            _call(
                f"deleting {obj['kind']}",
                functools.partial(kinds.delete, obj["kind"], namespace, obj["metadata"]["name"]),
            )
            changes.append(Change(obj["kind"], obj["metadata"]["name"], "deleted"))
    return changes


def hosts_with_objects(api: Any, namespace: str) -> dict[str, list[str]]:
    """host -> ["Kind/name", …] of its per-VM objects."""
    found: dict[str, list[str]] = {}
    for obj in managed(api, namespace):
        host = (obj["metadata"].get("labels") or {}).get(VM_LABEL)
        if host:
            found.setdefault(host, []).append(f"{obj['kind']}/{obj['metadata']['name']}")
    return found
