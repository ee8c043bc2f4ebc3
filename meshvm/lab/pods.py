"""Lab pods: meshed workloads of the lab's cluster, real enough for istiod and Kubernetes to treat them as pods.

A lab pod is a network namespace on the lab bridge, plus what the kubelet and Istio's injector would have made:

* in the API server: its ServiceAccount, a Service selecting it, and the Pod (bound to the lab's node, labelled as
  an injected pod) whose status the lab writes through the status subresource, as a kubelet does: podIP, and Ready
  only once its sidecar and app probes pass. The EndpointSlice controller then lists it behind its Service;
* its sidecar: ``pilot-agent proxy sidecar`` running the lab's Envoy, as uid 1337, with the files a pod's volumes
  would hold, relative to its working directory (a TokenRequest token with audience ``istio-ca``, the
  ``istio-ca-root-cert`` root, Istio's bootstrap template, the downward-API labels);
* traffic capture as in a cluster: ``pilot-agent istio-iptables`` in the pod's namespace (outbound to 15001,
  inbound to 15006, DNS to Istio's DNS proxy), ``/etc/netns/<ns>/{hosts,resolv.conf}`` as the pod's resolver
  files, and a link-only route for Service addresses;
* a test app (``meshvm.lab.podapp``): HTTP that answers with the pod's name, and gRPC health.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from meshvm.errors import OperationFailedError
from meshvm.fsutil import atomic_write
from meshvm.kube import client
from meshvm.lab import istiod, jaeger, network
from meshvm.lab.kube import NODE
from meshvm.lab.procs import alive, http_ok, run, spawn, stop, wait_until
from meshvm.lab.state import IstiodInfo, LabState, Pod

log = logging.getLogger(__name__)

NAMESPACE = "shop"
HTTP_PORT = 8080  # the app's HTTP port (Service port 80)
GRPC_PORT = 9090  # the app's gRPC health port (Service port 9090)
SERVICE_HTTP_PORT = 80
PROXY_UID = 1337  # Istio's proxy user: iptables lets its own traffic out uncaptured
SIDECAR_STATUS_PORT = 15021  # Envoy's /healthz/ready
AGENT_STATUS_PORT = 15020  # pilot-agent: /app-health/... probes rewritten as Istio does
TOKEN_SECONDS = 43200  # what Istio's injector asks the kubelet for
READY_TIMEOUT = 60.0
APP_PROBE = "/app-health/app/readyz"
LINK_ROUTES = (str(network.SERVICE_CIDR),)


def netns(name: str) -> str:
    return f"meshvm-{name}"


def new_pod(index: int, state: Path) -> Pod:
    name = f"pod{index}"
    return Pod(
        name=name,
        index=index,
        namespace=NAMESPACE,
        service_account=name,
        address=network.pod_address(index),
        root=str(state / "pods" / name / "root"),
    )


def spiffe_id(pod: Pod) -> str:
    return f"spiffe://{istiod.TRUST_DOMAIN}/ns/{pod.namespace}/sa/{pod.service_account}"


def service_host(pod: Pod) -> str:
    """The name other workloads call this pod's app by."""
    return f"{pod.name}.{pod.namespace}.svc.cluster.local"


# --- what the API server holds (pure) -------------------------------------------------------------------------


def labels(pod: Pod) -> dict[str, str]:
    """What Istio's injector leaves on a pod: the app, its canonical service, and that it speaks Istio mTLS."""
    return {
        "app": pod.name,
        "version": "v1",
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": pod.name,
        "service.istio.io/canonical-revision": "v1",
    }


def manifests(pod: Pod) -> list[dict[str, Any]]:
    """Namespace, ServiceAccount and Service of one pod (the Pod itself is created, not applied: see pod_object)."""
    meta = {"namespace": pod.namespace}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": pod.namespace}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": pod.service_account, **meta}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": pod.name, **meta, "labels": {"app": pod.name}},
            "spec": {
                "selector": {"app": pod.name},
                "ports": [
                    {"name": "http", "port": SERVICE_HTTP_PORT, "targetPort": HTTP_PORT, "appProtocol": "http"},
                    {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "appProtocol": "grpc"},
                ],
            },
        },
    ]


def pod_object(pod: Pod) -> dict[str, Any]:
    """The Pod as an injected pod looks: app and istio-proxy containers, bound to the lab's node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "labels": labels(pod),
            "annotations": {"sidecar.istio.io/status": json.dumps({"containers": ["istio-proxy"]})},
        },
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": pod.service_account,
            "containers": [
                {
                    "name": "app",
                    "image": "meshvm.local/lab-podapp",
                    "ports": [
                        {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                        {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                    ],
                },
                {"name": "istio-proxy", "image": "meshvm.local/lab-pilot-agent"},
            ],
        },
    }


def pod_status(pod: Pod, *, ready: bool, started: str) -> dict[str, Any]:
    """What a kubelet reports: Running at the pod's address; Ready only when both probes pass."""
    flag = "True" if ready else "False"
    conditions = [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": flag},
        {"type": "Ready", "status": flag},
    ]
    return {
        "status": {
            "phase": "Running",
            "hostIP": network.BRIDGE_ADDRESS,
            "podIP": pod.address,
            "podIPs": [{"ip": pod.address}],
            "startTime": started,
            "conditions": [{**c, "lastTransitionTime": started} for c in conditions],
            "containerStatuses": [
                {
                    "name": name,
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "image": image,
                    "imageID": "",
                    "state": {"running": {"startedAt": started}},
                }
                for name, image in (("app", "meshvm.local/lab-podapp"), ("istio-proxy", "meshvm.local/lab-pilot-agent"))
            ],
        }
    }


# --- the pod's files and processes ----------------------------------------------------------------------------


def sidecar_environment(pod: Pod, lab_istiod: IstiodInfo) -> dict[str, str]:
    """The env Istio's injector gives istio-proxy, with this lab's values."""
    proxy_config = {
        "binaryPath": lab_istiod.envoy,
        "discoveryAddress": f"{istiod.HOST}:{istiod.XDS_PORT}",
        "concurrency": 2,
        "drainDuration": "2s",
        "terminationDrainDuration": "1s",
        # Spans to the lab's Jaeger (pilot-agent puts the collector in the bootstrap), at Istio's default sampling
        # of 1 %: a request that arrives sampled (B3 x-b3-sampled: 1) is traced whatever the rate.
        "tracing": {"zipkin": {"address": f"{network.BRIDGE_ADDRESS}:{jaeger.ZIPKIN_PORT}"}, "sampling": 1.0},
    }
    probers = {APP_PROBE: {"httpGet": {"path": "/healthz", "port": HTTP_PORT}, "timeoutSeconds": 2}}
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/",
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "INSTANCE_IP": pod.address,
        "HOST_IP": network.BRIDGE_ADDRESS,
        "SERVICE_ACCOUNT": pod.service_account,
        "CA_ADDR": f"{istiod.HOST}:{istiod.XDS_PORT}",
        "PILOT_CERT_PROVIDER": "istiod",
        "JWT_POLICY": "third-party-jwt",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "TRUST_DOMAIN": istiod.TRUST_DOMAIN,
        "ISTIO_META_MESH_ID": istiod.TRUST_DOMAIN,
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_NODE_NAME": NODE,
        "ISTIO_META_INTERCEPTION_MODE": "REDIRECT",
        "ISTIO_META_WORKLOAD_NAME": pod.name,
        "ISTIO_META_APP_CONTAINERS": "app",
        "ISTIO_META_POD_PORTS": json.dumps(
            [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT}]
        ),
        "ISTIO_META_DNS_CAPTURE": "true",
        "ISTIO_KUBE_APP_PROBERS": json.dumps(probers),
    }


def _downward(values: dict[str, str]) -> str:
    """The downward API's file format: key="value" per line."""
    return "".join(f"{key}={json.dumps(value)}\n" for key, value in sorted(values.items()))


def write_files(pod: Pod, *, token: str, root_cert: str, bootstrap_template: Path, hosts_file: str) -> None:
    """What the pod's volumes hold, under its root (pilot-agent's working directory), and its resolver files."""
    root = Path(pod.root)
    for writable in ("etc/istio/proxy", "var/lib/istio/data", "var/run/secrets/workload-spiffe-uds"):
        directory = root / writable
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, PROXY_UID, PROXY_UID)
    atomic_write(root / "var/run/secrets/tokens/istio-token", token, mode=0o600)
    os.chown(root / "var/run/secrets/tokens/istio-token", PROXY_UID, PROXY_UID)
    atomic_write(root / "var/run/secrets/istio/root-cert.pem", root_cert, mode=0o644)
    atomic_write(root / "var/lib/istio/envoy/envoy_bootstrap_tmpl.json", bootstrap_template.read_text(), mode=0o644)
    atomic_write(root / "etc/istio/pod/labels", _downward(labels(pod)), mode=0o644)
    atomic_write(root / "etc/istio/pod/annotations", "", mode=0o644)
    etc = resolver_dir(pod)
    atomic_write(etc / "hosts", hosts_file, mode=0o644)
    # The cluster DNS (CoreDNS on the bridge), as a kubelet's --cluster-dns. The pod's DNS capture sends port 53 to
    # Istio's DNS proxy first, which answers the names istiod told it and asks CoreDNS for the rest.
    search = f"{pod.namespace}.svc.cluster.local svc.cluster.local cluster.local"
    atomic_write(
        etc / "resolv.conf",
        f"nameserver {network.BRIDGE_ADDRESS}\nsearch {search}\noptions ndots:5\n",
        mode=0o644,
    )


def resolver_dir(pod: Pod) -> Path:
    """``ip netns exec`` mounts these files over /etc/hosts and /etc/resolv.conf for the pod's processes."""
    return Path("/etc/netns") / netns(pod.name)


def in_pod(pod: Pod, argv: Sequence[str], *, uid: int | None = None) -> list[str]:
    """``argv`` run in the pod's network namespace (and resolver files), as ``uid`` if given."""
    prefix = ["ip", "netns", "exec", netns(pod.name)]
    if uid is not None:
        prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return [*prefix, *argv]


def capture_traffic(pod: Pod, pilot_agent: str) -> None:
    """Istio's own iptables rules, as its init container sets them, in the pod's (fresh) network namespace."""
    common = ["-p", "15001", "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
    excluded = ["-d", f"15090,{SIDECAR_STATUS_PORT},{AGENT_STATUS_PORT}", "--redirect-dns"]
    run(in_pod(pod, [pilot_agent, "istio-iptables", *common, *excluded]), what=f"{pod.name}: istio-iptables")


def start_processes(pod: Pod, lab_istiod: IstiodInfo) -> Pod:
    root = Path(pod.root)
    logs = root.parent
    # Envoy reopens /dev/stdout for its access log (Istio's default): as uid 1337, so the file must be its own.
    sidecar_log = logs / "istio-proxy.log"
    sidecar_log.touch()
    os.chown(sidecar_log, PROXY_UID, PROXY_UID)
    sidecar = spawn(
        in_pod(
            pod,
            [
                lab_istiod.pilot_agent,
                "proxy",
                "sidecar",
                f"--domain={pod.namespace}.svc.cluster.local",
                "--proxyLogLevel=warning",
                "--log_output_level=default:info",
            ],
            uid=PROXY_UID,
        ),
        log_path=sidecar_log,
        env=sidecar_environment(pod, lab_istiod),
        cwd=root,
    )
    app = spawn(in_pod(pod, app_argv(pod)), log_path=logs / "app.log")
    return pod.model_copy(update={"sidecar_pid": sidecar, "app_pid": app})


def app_argv(pod: Pod) -> list[str]:
    return [
        sys.executable,
        "-m",
        "meshvm.lab.podapp",
        f"--name={pod.name}",
        f"--namespace={pod.namespace}",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
    ]


@contextlib.contextmanager
def app_replaced(lab: LabState, name: str, argv: Sequence[str]) -> Iterator[Pod]:
    """Run ``argv`` in the pod in place of its app (a benchmark's server on the app's port), then put the app back:
    started again, ready, and its new pid saved in the lab's state so `lab down` stops it."""
    pod = lab.pod(name)
    logs = Path(pod.root).parent
    if pod.app_pid is not None and alive(pod.app_pid):
        stop(pod.app_pid, timeout=10)
    stand_in = spawn(in_pod(pod, argv), log_path=logs / "app-replaced.log")
    try:
        yield pod
    finally:
        stop(stand_in, timeout=10)
        pod = pod.model_copy(update={"app_pid": spawn(in_pod(pod, app_argv(pod)), log_path=logs / "app.log")})
        lab.pods = [pod if p.name == name else p for p in lab.pods]
        lab.save()
        wait_until(f"pod {name}: app", functools.partial(app_ready, pod), timeout=READY_TIMEOUT, pid=pod.app_pid)


def sidecar_ready(pod: Pod) -> bool:
    """Envoy has its listeners, clusters and certificate from istiod (Istio's readiness probe)."""
    return http_ok(f"http://{pod.address}:{SIDECAR_STATUS_PORT}/healthz/ready")()


def app_ready(pod: Pod) -> bool:
    """The app's readiness, through pilot-agent's probe rewrite (a plain probe would meet STRICT mTLS)."""
    return http_ok(f"http://{pod.address}:{AGENT_STATUS_PORT}{APP_PROBE}")()


def wait_ready(pod: Pod) -> None:
    """The sidecar's readiness, then the app's (each failure names the process's log)."""
    logs = Path(pod.root).parent
    for what, ready, log_name, pid in (
        ("sidecar", sidecar_ready, "istio-proxy.log", pod.sidecar_pid),
        ("app", app_ready, "app.log", pod.app_pid),
    ):
        wait_until(
            f"pod {pod.name}: {what}",
            functools.partial(ready, pod),
            timeout=READY_TIMEOUT,
            log_path=logs / log_name,
            pid=pid,
        )


def stop_processes(pod: Pod) -> None:
    """SIGTERM to each process group (pilot-agent takes its Envoy down with it), SIGKILL after a grace period."""
    for pid in (pod.app_pid, pod.sidecar_pid):
        if pid is None or not alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        stop(pid, timeout=10)
        # Whatever is left in the group (an Envoy whose agent was killed) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def stop_sandbox(pod: Pod) -> None:
    """Processes and network namespace: a restarted pod gets a new sandbox, as in Kubernetes (and Istio's
    iptables rules are set once per fresh namespace, as its init container does)."""
    stop_processes(pod)
    network.host_net_down(netns(pod.name), pod.name)


def remove(pod: Pod) -> None:
    """Processes, network namespace, resolver files and the pod's directory (the Pod object goes with etcd)."""
    stop_sandbox(pod)
    shutil.rmtree(resolver_dir(pod), ignore_errors=True)
    shutil.rmtree(Path(pod.root).parent, ignore_errors=True)


def net_up(pod: Pod) -> None:
    network.host_net_up(netns(pod.name), pod.name, pod.address, link_routes=LINK_ROUTES)


def rfc3339_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- the kubelet's part in the API server ---------------------------------------------------------------------


def register(api: Any, pod: Pod) -> str:
    """ServiceAccount, Service and a new Pod object (a pod restarted is a new Pod, as a kubelet would see it);
    returns the Pod's uid."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    client.apply(api, manifests(pod))
    core: Any = k8s.CoreV1Api(api)  # typed for model objects; it takes manifests as dicts too
    try:
        # No kubelet will confirm a graceful deletion: delete at once, as `kubectl delete --force` does.
        core.delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            raise OperationFailedError(f"pod {pod.name}: deleting the old Pod: {exc.status} {exc.reason}") from exc
    deadline = time.monotonic() + 30
    while True:
        try:
            created = core.create_namespaced_pod(pod.namespace, pod_object(pod))
            break
        except ApiException as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                raise OperationFailedError(f"pod {pod.name}: creating the Pod: {exc.status} {exc.reason}") from exc
            time.sleep(0.2)
    core.patch_namespaced_pod_status(pod.name, pod.namespace, pod_status(pod, ready=False, started=rfc3339_now()))
    return str(created.metadata.uid)


def mark_ready(api: Any, pod: Pod) -> None:
    from kubernetes import client as k8s

    k8s.CoreV1Api(api).patch_namespaced_pod_status(
        pod.name, pod.namespace, pod_status(pod, ready=True, started=rfc3339_now())
    )


def istio_token(api: Any, pod: Pod, uid: str) -> str:
    """A token for the pod's ServiceAccount, audience istio-ca, bound to this Pod object (as a projected volume)."""
    from kubernetes import client as k8s

    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["istio-ca"],
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": uid},
        },
    }
    core: Any = k8s.CoreV1Api(api)
    answer = core.create_namespaced_service_account_token(pod.service_account, pod.namespace, request)
    return str(answer.status.token)


def istio_root(api: Any, namespace: str, *, timeout: float = 30.0) -> str:
    """Istio's root certificate, from the ConfigMap istiod writes into each namespace."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    core = k8s.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = core.read_namespaced_config_map(istiod.ROOT_CONFIGMAP, namespace).data or {}
            if data.get("root-cert.pem"):
                return str(data["root-cert.pem"])
        except ApiException as exc:
            if exc.status != 404:
                raise OperationFailedError(f"reading {namespace}/{istiod.ROOT_CONFIGMAP}: {exc.status}") from exc
        if time.monotonic() > deadline:
            raise OperationFailedError(
                f"istiod has not written {istiod.ROOT_CONFIGMAP} into namespace {namespace} after {timeout:.0f}s"
            )
        time.sleep(0.2)


# --- a whole pod ----------------------------------------------------------------------------------------------


def launch(api: Any, pod: Pod, *, lab_istiod: IstiodInfo, bootstrap_template: Path, hosts_file: str) -> Pod:
    """Network, API objects, token, files, capture, processes; returns the pod with its processes' pids. The
    caller saves them before waiting (see :func:`wait_ready`), so `lab down` can always stop them."""
    net_up(pod)
    uid = register(api, pod)
    write_files(
        pod,
        token=istio_token(api, pod, uid),
        root_cert=istio_root(api, pod.namespace),
        bootstrap_template=bootstrap_template,
        hosts_file=hosts_file,
    )
    capture_traffic(pod, lab_istiod.pilot_agent)
    return start_processes(pod, lab_istiod)


def state(pod: Pod) -> str:
    """The sidecar's state as `lab status` shows it."""
    if pod.sidecar_pid is None or not alive(pod.sidecar_pid):
        return "stopped"
    if not sidecar_ready(pod):
        return "sidecar not ready"
    return "running" if app_ready(pod) else "app not ready"
