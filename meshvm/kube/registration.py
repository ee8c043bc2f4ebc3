"""VM workloads as Kubernetes objects.

``--mesh istio`` (the default): the VM is a workload of the cluster's Istio mesh. Per mesh service a Service whose
selector picks the service's WorkloadEntries (Istio selects WorkloadEntries with a Service's selector, the way it
selects pods; no pod matches, so nothing outside the mesh gets an endpoint); per VM and service a WorkloadEntry at
the VM's *mesh* port (its Envoy's mTLS listener, never the application's port), labelled
``security.istio.io/tlsMode: istio``, with the VM's ServiceAccount and network. For the VM's identity: its
ServiceAccount, a Role and RoleBinding that let that ServiceAccount mint tokens for itself and nothing else, and a
Secret per VM that its tokens are bound to (delete it and every token of that VM stops working).

``--mesh kubernetes`` (clusters without a mesh): a selectorless Service and an EndpointSlice per VM at the
application's own port, in plaintext. That bypasses mTLS and authorization, so it needs an explicit opt-in per host
(``meshvm_kubernetes_plaintext: true``). ``--mesh consul``: nothing (Consul's catalog sync does the cluster side).

Everything carries ``app.kubernetes.io/managed-by=meshvm``; per-VM objects carry ``meshvm.io/vm=<host>``, shared
ones the service (``meshvm.io/service``) or ServiceAccount (``meshvm.io/service-account``) they exist for, so a VM's
objects can be found, updated and removed by label, and shared ones when no VM needs them any more.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from meshvm.config import ServiceSpec
from meshvm.errors import ConfigError, OperationFailedError
from meshvm.kube.client import call
from meshvm.kube.rbac import MANAGED_BY

log = logging.getLogger(__name__)

Mesh = Literal["kubernetes", "istio", "consul"]
VM_LABEL = "meshvm.io/vm"
SERVICE_LABEL = "meshvm.io/service"
ACCOUNT_LABEL = "meshvm.io/service-account"
SHARED_LABELS = (SERVICE_LABEL, ACCOUNT_LABEL)
SLICE_MANAGER = "endpointslice.kubernetes.io/managed-by"
MESHVM_SLICES = "meshvm.io"
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
    plaintext: bool = False  # --mesh kubernetes: the operator accepted plaintext endpoints at the app's port


def token_secret(host: str) -> str:
    """The Secret a VM's Istio tokens are bound to."""
    return f"meshvm-vm-{host}"


def token_role(service_account: str) -> str:
    return f"meshvm-token-{service_account}"


def _labels(host: str | None, service: str | None = None, account: str | None = None) -> dict[str, str]:
    labels = dict(MANAGED_BY)
    if service is not None:
        labels[SERVICE_LABEL] = service
    if account is not None:
        labels[ACCOUNT_LABEL] = account
    if host is not None:
        labels[VM_LABEL] = host
    return labels


def _port(service: ServiceSpec, target: int) -> dict[str, Any]:
    port: dict[str, Any] = {"name": PORT_NAMES[service.protocol], "port": service.port, "protocol": "TCP"}
    if service.protocol in APP_PROTOCOLS:
        port["appProtocol"] = APP_PROTOCOLS[service.protocol]
    port["targetPort"] = target
    return port


def _meta(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def check_plaintext(workloads: Iterable[VmWorkload], mesh: Mesh) -> None:
    """--mesh kubernetes without the opt-in: refuse before anything is applied."""
    if mesh != "kubernetes":
        return
    refused = sorted(w.host for w in workloads if not w.plaintext)
    if refused:
        raise ConfigError(
            f"--mesh kubernetes registers the application's plaintext port, bypassing mTLS and authorization, "
            f"for {', '.join(refused)}",
            hint="use --mesh istio, or set meshvm_kubernetes_plaintext: true for these hosts to accept it",
        )


def _identity(vm: VmWorkload, namespace: str, accounts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The VM's ServiceAccount and its token rights (shared by the VMs of one account), and its own Secret."""
    account = vm.service_account
    shared = _labels(None, account=account)
    role = token_role(account)
    accounts.setdefault(
        f"ServiceAccount/{account}",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(account, namespace, shared)},
    )
    accounts.setdefault(
        f"Role/{role}",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(role, namespace, shared),
            # Its own tokens, nothing else: one for istiod's CA now and then, one to replace itself before it ends.
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["serviceaccounts/token"],
                    "resourceNames": [account],
                    "verbs": ["create"],
                }
            ],
        },
    )
    accounts.setdefault(
        f"RoleBinding/{role}",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(role, namespace, shared),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(token_secret(vm.host), namespace, _labels(vm.host, account=account)),
        "type": "Opaque",
    }
    return [secret]


Part = Literal["identity", "services", "all"]


def desired(workloads: Iterable[VmWorkload], namespace: str, mesh: Mesh, part: Part = "all") -> list[dict[str, Any]]:
    """Every object the workloads need, in apply order (what others refer to first). ``part``: the VMs' identity
    objects (before they are enrolled: their first token needs them), or their services (once they are)."""
    if mesh == "consul":
        return []  # Consul's catalog sync makes the cluster side; meshvm only registers in Consul
    workloads = sorted(workloads, key=lambda w: w.host)
    check_plaintext(workloads, mesh)
    accounts: dict[str, dict[str, Any]] = {}
    secrets: list[dict[str, Any]] = []
    if mesh == "istio" and part in {"identity", "all"}:
        for vm in workloads:
            secrets += _identity(vm, namespace, accounts)
    shared: dict[str, dict[str, Any]] = {}
    per_vm: list[dict[str, Any]] = []
    if part in {"services", "all"}:
        for vm in workloads:
            for svc in vm.services:
                if mesh == "istio":
                    shared.setdefault(f"Service/{svc.name}", _istio_service(svc, namespace))
                    per_vm.append(_workload_entry(vm, svc, namespace))
                else:
                    shared.setdefault(f"Service/{svc.name}", _plain_service(svc, namespace))
                    per_vm.append(_endpoint_slice(vm, svc, namespace))
    return [*accounts.values(), *secrets, *shared.values(), *per_vm]


def _istio_service(svc: ServiceSpec, namespace: str) -> dict[str, Any]:
    """Selects the service's WorkloadEntries (as it would pods): Istio routes to their mesh ports."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc.name, namespace, _labels(None, svc.name)),
        "spec": {"selector": {"app": svc.name}, "ports": [_port(svc, svc.mesh_port)], "type": "ClusterIP"},
    }


def _workload_entry(vm: VmWorkload, svc: ServiceSpec, namespace: str) -> dict[str, Any]:
    labels = {"app": svc.name, "security.istio.io/tlsMode": "istio"}
    if svc.version:
        labels["version"] = svc.version
    entry: dict[str, Any] = {
        "address": vm.address,
        "ports": {PORT_NAMES[svc.protocol]: svc.mesh_port},
        "labels": labels,
        "serviceAccount": vm.service_account,
    }
    if vm.network:
        entry["network"] = vm.network
    if vm.locality:
        entry["locality"] = vm.locality
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        # The account label too: a WorkloadEntry is what keeps its VM's ServiceAccount in use (Secrets are not listed).
        "metadata": _meta(f"{svc.name}-{vm.host}", namespace, _labels(vm.host, svc.name, vm.service_account)),
        "spec": entry,
    }


def _plain_service(svc: ServiceSpec, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc.name, namespace, _labels(None, svc.name)),
        # No selector: the endpoints are ours (EndpointSlices), not pods'.
        "spec": {"ports": [_port(svc, svc.port)], "type": "ClusterIP"},
    }


def _endpoint_slice(vm: VmWorkload, svc: ServiceSpec, namespace: str) -> dict[str, Any]:
    labels = {**_labels(vm.host, svc.name), "kubernetes.io/service-name": svc.name, SLICE_MANAGER: MESHVM_SLICES}
    port = {k: v for k, v in _port(svc, svc.port).items() if k != "targetPort"}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(f"{svc.name}-{vm.host}", namespace, labels),
        "addressType": "IPv4",
        "endpoints": [{"addresses": [vm.address], "conditions": {"ready": True}, "hostname": vm.host}],
        "ports": [port],
    }


# --- talking to the API server -------------------------------------------------------------------------------


API_VERSIONS = {
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "WorkloadEntry": "networking.istio.io/v1",
    "ServiceEntry": "networking.istio.io/v1",
    "Secret": "v1",
}
# What `managed()` lists by label. Secrets are not listed (the registrar may not list Secrets): a VM's token
# Secret is found by its name.
KINDS = ("ServiceAccount", "Role", "RoleBinding", "Service", "EndpointSlice", "WorkloadEntry", "ServiceEntry")


@dataclass
class Kinds:
    """Read, create, replace, delete and list the kinds meshvm writes, as plain dicts."""

    api: Any
    _dynamic: Any = field(init=False, default=None)

    def _resource(self, kind: str) -> Any:
        from kubernetes import dynamic

        if self._dynamic is None:
            self._dynamic = call("reading the API's discovery", lambda: dynamic.DynamicClient(self.api))
        return self._dynamic.resources.get(api_version=API_VERSIONS[kind], kind=kind)

    def read(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        return self._resource(kind).get(name=name, namespace=ns).to_dict()  # type: ignore[no-any-return]

    def create(self, obj: dict[str, Any]) -> None:
        self._resource(obj["kind"]).create(body=obj, namespace=obj["metadata"]["namespace"])

    def replace(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self._resource(obj["kind"]).replace(body=obj, namespace=meta["namespace"], name=meta["name"])

    def delete(self, kind: str, ns: str, name: str) -> None:
        self._resource(kind).delete(name=name, namespace=ns)

    def list(self, kind: str, ns: str, selector: str) -> list[dict[str, Any]]:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            resource = self._resource(kind)
        except ResourceNotFoundError:
            return []  # no Istio CRDs in this cluster
        return list(resource.get(namespace=ns, label_selector=selector).to_dict()["items"])


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


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
    if kind == "Secret":
        # A token Secret holds nothing and never changes; the registrar may create it but not read it.
        try:
            call(f"creating {kind}/{name}", lambda: kinds.create(obj))
        except api_exception as exc:
            if getattr(exc, "status", None) == 409:
                return "unchanged"
            raise
        return "created"
    for _attempt in range(CONFLICT_RETRIES):
        try:
            current = call(f"reading {kind}/{name}", lambda: kinds.read(kind, ns, name))
        except api_exception as exc:
            if getattr(exc, "status", None) != 404:
                raise
            try:
                call(f"creating {kind}/{name}", lambda: kinds.create(obj))
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
            call(f"updating {kind}/{name}", functools.partial(kinds.replace, update))
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


def register(api: Any, workloads: Iterable[VmWorkload], namespace: str, mesh: Mesh, part: Part = "all") -> list[Change]:
    kinds = Kinds(api)
    return [
        Change(o["kind"], o["metadata"]["name"], upsert(kinds, o)) for o in desired(workloads, namespace, mesh, part)
    ]


def managed(api: Any, namespace: str) -> list[dict[str, Any]]:
    """Every object meshvm manages in ``namespace``."""
    kinds = Kinds(api)
    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    found: list[dict[str, Any]] = []
    for kind in KINDS:
        for item in call(f"listing {kind}", functools.partial(kinds.list, kind, namespace, selector)):
            labels = item["metadata"].get("labels") or {}
            # The EndpointSlice controller copies a Service's labels onto the (empty) slices it makes for it.
            if kind == "EndpointSlice" and labels.get(SLICE_MANAGER) != MESHVM_SLICES:
                continue
            found.append({**item, "kind": kind})
    return found


def remove_hosts(api: Any, namespace: str, hosts: set[str]) -> list[Change]:
    """Delete the per-VM objects of ``hosts`` (and their token Secrets), then shared objects that no remaining VM
    needs (a Service no VM runs, a ServiceAccount no VM uses). Idempotent."""
    kinds = Kinds(api)
    changes = []
    objects = managed(api, namespace)
    still_used: set[tuple[str, str]] = set()

    def delete(kind: str, name: str) -> bool:
        try:
            call(f"deleting {kind}/{name}", functools.partial(kinds.delete, kind, namespace, name))
        except _api_exception() as exc:
            if getattr(exc, "status", None) == 404:
                return False
            raise
        return True

    for host in sorted(hosts):
        if delete("Secret", token_secret(host)):
            changes.append(Change("Secret", token_secret(host), "deleted"))
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        if VM_LABEL not in labels:
            continue
        if labels[VM_LABEL] in hosts:
            if delete(obj["kind"], obj["metadata"]["name"]):
                changes.append(Change(obj["kind"], obj["metadata"]["name"], "deleted"))
        else:
            still_used |= {(key, labels[key]) for key in SHARED_LABELS if key in labels}
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        needed_by = {(key, labels[key]) for key in SHARED_LABELS if key in labels}
        # Only what VMs need is shared: meshvm's own objects (the registrar's RBAC, the bootstrap material) carry
        # neither label and are never removed here.
        shared = VM_LABEL not in labels and needed_by
        if shared and not needed_by & still_used and delete(obj["kind"], obj["metadata"]["name"]):
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
