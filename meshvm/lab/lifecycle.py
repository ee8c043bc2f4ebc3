"""`meshvm lab up | down | status`: bring the real peers up on this machine, report them, take them down."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshvm import versions
from meshvm.artifacts import cache_dir
from meshvm.bootstrap import Bootstrap
from meshvm.errors import MeshvmError, OperationFailedError, UsageError
from meshvm.fsutil import atomic_write
from meshvm.kube.client import api_client
from meshvm.lab import artifacts, consul_server, dns, istiod, jaeger, kube, network, pods, vms
from meshvm.lab.launcher import CGROUP_ROOTS
from meshvm.lab.procs import alive, http_ok, run, stop
from meshvm.lab.state import (
    DEFAULT_STATE_DIR,
    ClusterDnsInfo,
    ConsulInfo,
    ControllerManagerInfo,
    EnvoyInfo,
    EtcdInfo,
    Host,
    IstiodInfo,
    JaegerInfo,
    KubeInfo,
    LabState,
    Pod,
    load,
)
from meshvm.lab.tools import require_root, require_tools

log = logging.getLogger(__name__)

MAX_HOSTS = 50
MAX_PODS = 50
UP_TOOLS = (
    "ip",
    "systemd-nspawn",
    "debootstrap",
    "ssh",
    "ssh-keygen",
    "go",
    "dpkg-deb",
    "tar",
    "zstd",
    "mount",
    "iptables",
    "setpriv",
)


@dataclass(frozen=True)
class Artifacts:
    consul: artifacts.Artifact
    etcd: artifacts.Artifact
    kube_apiserver: artifacts.Artifact
    kube_controller_manager: artifacts.Artifact
    coredns: artifacts.Artifact
    istio: artifacts.Istio
    jaeger: artifacts.Artifact
    envoy: artifacts.Artifact
    rootfs: artifacts.Artifact


def fetch_artifacts(cache: Path, *, envoy_version: str, fallback_debs: tuple[Path, ...] = ()) -> Artifacts:
    """Everything the lab runs, built or fetched once. Go builds (CPU) overlap with downloads (network)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        builds = pool.submit(
            lambda: (
                artifacts.etcd(cache),
                artifacts.kube_component(cache, "kube-apiserver"),
                artifacts.kube_component(cache, "kube-controller-manager"),
                artifacts.coredns(cache),
                artifacts.istio(cache),
                artifacts.jaeger(cache),
            )
        )
        fetches = pool.submit(
            lambda: (
                artifacts.consul(cache, fallback_debs),
                artifacts.envoy(cache, envoy_version),
                artifacts.rootfs(cache),
            )
        )
        etcd, apiserver, controller_manager, coredns, istio, tracer = builds.result()
        consul, envoy, rootfs = fetches.result()
    return Artifacts(
        consul=consul,
        etcd=etcd,
        kube_apiserver=apiserver,
        kube_controller_manager=controller_manager,
        coredns=coredns,
        istio=istio,
        jaeger=tracer,
        envoy=envoy,
        rootfs=rootfs,
    )


def _hosts_file(hosts: list[Host], lab_pods: list[Pod]) -> str:
    lines = [
        "127.0.0.1 localhost",
        f"{network.BRIDGE_ADDRESS} lab-server {istiod.HOST}",
        *(f"{h.address} {h.name}" for h in hosts),
        *(f"{p.address} {p.name}" for p in lab_pods),
    ]
    return "# written by meshvm lab\n" + "\n".join(lines) + "\n"


def _write_access_files(lab: LabState, known_hosts: list[str], inventory: Path) -> None:
    state = Path(lab.state_dir)
    atomic_write(Path(lab.known_hosts), "\n".join(known_hosts) + "\n", mode=0o644)
    ssh_config = [
        "# written by meshvm lab: ssh -F <this file> vm1",
        *[
            line
            for h in lab.hosts
            for line in (
                f"Host {h.name}",
                f"  HostName {h.address}",
                "  User root",
                f"  IdentityFile {lab.ssh_key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {lab.known_hosts}",
                "  StrictHostKeyChecking yes",
                "  ConnectTimeout 5",
                "  LogLevel ERROR",
            )
        ],
    ]
    atomic_write(Path(lab.ssh_config), "\n".join(ssh_config) + "\n", mode=0o644)
    if lab.consul is None:
        raise OperationFailedError("the lab's Consul is not up; cannot write its address file")
    atomic_write(
        Path(lab.consul_env),
        (
            f"CONSUL_HTTP_ADDR=http://{lab.consul.local_http_addr}\n"
            f"CONSUL_HTTP_TOKEN={lab.consul.management_token}\n"
            f"MESHVM_LAB_CONSUL_DATACENTER={lab.consul.datacenter}\n"
        ),
        mode=0o600,
    )
    hosts_yaml = {
        "all": {
            "children": {
                "meshvm": {
                    "hosts": {h.name: {"ansible_host": h.address} for h in lab.hosts},
                    "vars": {
                        "ansible_user": "root",
                        "ansible_ssh_private_key_file": lab.ssh_key,
                        "ansible_ssh_common_args": (
                            f"-o UserKnownHostsFile={lab.known_hosts} "
                            "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
                        ),
                        "ansible_python_interpreter": "/usr/bin/python3",
                    },
                }
            }
        },
    }
    header = f"# Written by `meshvm lab up` ({state}); `meshvm lab down` removes it.\n"
    atomic_write(inventory, header + yaml.safe_dump(hosts_yaml, sort_keys=False), mode=0o644)
    # The lab's Consul for the roles (consul_agent, meshvm_agent) and playbooks/policy.yml. It holds the gossip key
    # and ACL tokens, so it is readable by root only. The management token is here because only it may write the
    # mesh policy in the lab; a real deployment gives policy.yml a token limited to `key_prefix "meshvm/"`.
    lab_vars = {
        **lab_bootstrap(lab).ansible_vars(),
        "meshvm_policy_consul_http_addr": lab.consul.http_addr,
        "meshvm_policy_consul_token": lab.consul.management_token,
        **({"meshvm_lab_zipkin_address": lab.jaeger.zipkin_addr} if lab.jaeger else {}),
        **_istio_vars(lab),
    }
    atomic_write(
        lab_vars_path(inventory),
        f"---\n# Written by `meshvm lab up` from {lab.path}; `meshvm lab down` removes it. Secrets: keep it 0600.\n"
        + yaml.safe_dump(lab_vars, sort_keys=False),
        mode=0o600,
    )


def _istio_vars(lab: LabState) -> dict[str, str]:
    """What inventories/lab-istio needs to run enroll.yml on VMs that joined the cluster's Istio mesh (join passes
    the same itself): where istiod and the API server are, their roots. Not the VMs' tokens: they keep their own."""
    if lab.kube is None:
        return {}
    material = lab_bootstrap(lab)
    root = pods.istio_root(api_client(Path(lab.kube.kubeconfig), context="lab-admin"), kube.NAMESPACE)
    return {
        "meshvm_lab_istiod_address": str(material.istiod_address),
        "meshvm_lab_kube_api": str(material.kube_api),
        "meshvm_agent_istio_kube_ca": str(material.kube_ca_pem),
        "meshvm_agent_istio_root_cert": root,
    }


def lab_bootstrap(lab: LabState) -> Bootstrap:
    """What a lab VM needs to join the lab's Consul and its cluster's Istio mesh (stored in the cluster for
    `meshvm join`): istiod's xDS/CA address on the bridge, and the API server with its CA."""
    consul, kube_info = lab.consul, lab.kube
    if consul is None or kube_info is None:
        raise OperationFailedError("the lab's Consul and kube-apiserver must be up before its bootstrap material")
    return Bootstrap.model_validate(
        {
            "datacenter": consul.datacenter,
            "retry_join": [consul.serf_lan_addr],
            "consul_http_addr": consul.http_addr,
            "gossip_key": consul.gossip_key,
            "acl_issuer_token": consul.issuer_token,
            "istiod_address": f"{network.BRIDGE_ADDRESS}:{istiod.XDS_PORT}",
            "istiod_name": istiod.HOST,
            "kube_api": kube_info.server,
            "kube_ca_pem": Path(kube_info.ca).read_text(),
            "trust_domain": istiod.TRUST_DOMAIN,
            # Short on purpose: the lab's tests see certificates renew and tokens replace themselves many times.
            "istio_cert_lifetime": "10m",
            "istio_token_lifetime": "10m",
        }
    )


def lab_vars_path(inventory: Path) -> Path:
    """``group_vars/all/lab.yml`` next to the lab inventory: the lab's Consul address, gossip key and tokens."""
    return inventory.parent / "group_vars" / "all" / "lab.yml"


def default_inventory_path(state_dir: Path) -> Path:
    """``inventories/lab/hosts.yml`` when run from a meshvm checkout, else inside the state directory."""
    local = Path.cwd() / "inventories" / "lab"
    return local / "hosts.yml" if local.is_dir() else state_dir / "inventory" / "hosts.yml"


def _running(lab: LabState) -> bool:
    peers = (lab.consul, lab.etcd, lab.kube, lab.controller_manager, lab.dns, lab.istiod, lab.jaeger)
    procs = [p for p in peers if p]
    vm_pids = [Path(lab.state_dir) / "vms" / h.name / "launcher.pid" for h in lab.hosts]
    pod_pids = [pid for p in lab.pods for pid in (p.sidecar_pid, p.app_pid)]
    return (
        len(procs) == len(peers)
        and all(alive(p.pid) for p in procs)
        and all(p.exists() and alive(int(p.read_text())) for p in vm_pids)
        and all(pid is not None and alive(pid) for pid in pod_pids)
    )


def up(
    hosts: int = 2,
    *,
    pods: int = 0,
    state_dir: Path = DEFAULT_STATE_DIR,
    cache: Path | None = None,
    inventory: Path | None = None,
    envoy_version: str = versions.ENVOY,
    fallback_debs: tuple[Path, ...] = (),
    keep_on_failure: bool = False,
) -> LabState:
    """Bring the lab up with at least ``hosts`` VMs. Idempotent: a running lab is kept and only grown."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise UsageError(f"--hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
    if not 0 <= pods <= MAX_PODS:
        raise UsageError(f"--pods must be between 0 and {MAX_PODS}, not {pods}")
    require_root("meshvm lab up")
    require_tools(*UP_TOOLS)
    cache = cache or cache_dir()
    existing = load(state_dir)
    if existing is not None and not _running(existing):
        log.warning("a lab in %s is partly down; taking it down before bringing it up again", state_dir)
        down(state_dir=state_dir)
        existing = None
    if existing is not None and len(existing.hosts) >= hosts and len(existing.pods) >= pods:
        log.info("lab already up in %s with %d hosts and %d pods", state_dir, len(existing.hosts), len(existing.pods))
        return existing
    started = time.monotonic()
    made = existing is None
    try:
        lab = _up(
            hosts,
            pods,
            state_dir=state_dir,
            cache=cache,
            inventory=inventory,
            envoy_version=envoy_version,
            fallback_debs=fallback_debs,
            existing=existing,
        )
    except (MeshvmError, OSError, KeyboardInterrupt):
        if made and not keep_on_failure:
            log.error("lab up failed; removing what it made (use --keep-on-failure to inspect)")
            down(state_dir=state_dir)
        raise
    log.info("lab up in %.1fs", time.monotonic() - started)
    return lab


def _up(
    hosts: int,
    pod_count: int,
    *,
    state_dir: Path,
    cache: Path,
    inventory: Path | None,
    envoy_version: str,
    fallback_debs: tuple[Path, ...],
    existing: LabState | None,
) -> LabState:
    built = fetch_artifacts(cache, envoy_version=envoy_version, fallback_debs=fallback_debs)
    state_dir.mkdir(parents=True, exist_ok=True)
    # Traversable, not listable: pods' sidecars run as uid 1337 from directories in here. Secrets in it are 0600.
    state_dir.chmod(0o711)
    lab = existing or LabState(
        state_dir=str(state_dir),
        cache_dir=str(cache),
        ssh_key=str(state_dir / "ssh" / "id_ed25519"),
        ssh_config=str(state_dir / "ssh" / "config"),
        known_hosts=str(state_dir / "ssh" / "known_hosts"),
        consul_env=str(state_dir / "consul.env"),
        inventory=str(inventory or default_inventory_path(state_dir)),
        envoy=EnvoyInfo(version=built.envoy.version, binary=str(built.envoy.path), sha256=built.envoy.sha256),
        host_os=f"Debian {artifacts.ROOTFS_SUITE} (systemd-nspawn)",
    )
    lab.save()
    if existing is None:
        network.bridge_up()
        consul = consul_server.start(built.consul.path, state_dir)
        lab.consul = ConsulInfo(version=built.consul.version, binary=str(built.consul.path), **consul)
        lab.save()
        lab.jaeger = JaegerInfo(version=built.jaeger.version, **jaeger.start(built.jaeger.path, state_dir))
        lab.save()
        etcd = kube.start_etcd(built.etcd.path, state_dir)
        lab.etcd = EtcdInfo(version=built.etcd.version, **etcd)
        lab.save()
        apiserver = kube.start_apiserver(built.kube_apiserver.path, state_dir, lab.etcd.url)
        lab.kube = KubeInfo(version=built.kube_apiserver.version, **apiserver)
        lab.save()
        kubeconfig = Path(lab.kube.kubeconfig)
        kube.install_cluster_objects(kubeconfig, lab_bootstrap(lab), built.istio.crds)
        manager = kube.start_controller_manager(built.kube_controller_manager.path, state_dir)
        lab.controller_manager = ControllerManagerInfo(version=built.kube_controller_manager.version, **manager)
        lab.save()
        lab.dns = ClusterDnsInfo(version=built.coredns.version, **dns.start(built.coredns.path, state_dir, kubeconfig))
        lab.save()
        control_plane = istiod.start(built.istio, state_dir, kubeconfig)
        lab.istiod = IstiodInfo(
            version=built.istio.version,
            pilot_agent=str(_link_for_pods(built.istio.pilot_agent, state_dir)),
            envoy=str(_link_for_pods(built.envoy.path, state_dir)),
            **control_plane,
        )
        lab.save()
        kube.wait_controllers(kubeconfig, pid=lab.controller_manager.pid, log_path=Path(lab.controller_manager.log))
        key = Path(lab.ssh_key)
        key.parent.mkdir(parents=True, exist_ok=True)
        if not key.exists():
            run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshvm-lab", "-f", str(key)],
                what="ssh-keygen for the lab key",
            )
    lower = state_dir / "rootfs"
    vms.unpack_rootfs(built.rootfs.path, lower)
    first_new = len(lab.hosts) + 1
    for index in range(first_new, hosts + 1):
        lab.hosts.append(Host(name=f"vm{index}", index=index, address=network.host_address(index)))
    first_pod = len(lab.pods) + 1
    for index in range(first_pod, pod_count + 1):
        lab.pods.append(pods.new_pod(index, state_dir))
    lab.save()
    _boot(lab, lab.hosts[first_new - 1 :], starting=lab.pods[first_pod - 1 :], template=built.istio.bootstrap_template)
    return lab


def _link_for_pods(binary: Path, state_dir: Path) -> Path:
    """A binary from the cache (under root's home, closed to other users) where pods' uid 1337 can run it."""
    dest = state_dir / "bin" / binary.name
    dest.parent.mkdir(mode=0o755, exist_ok=True)
    if not dest.exists():
        part = dest.with_name(dest.name + ".part")
        part.unlink(missing_ok=True)
        try:
            os.link(binary, part)
        except OSError:
            shutil.copy2(binary, part)
        part.chmod(0o755)
        part.replace(dest)
    return dest


def _boot(lab: LabState, booting: list[Host], *, starting: Sequence[Pod] = (), template: Path | None = None) -> None:
    """Start (or keep) every VM, rewrite the access files, wait for ``booting`` to finish booting and, meanwhile,
    start the pods in ``starting`` and wait until they are ready."""
    state_dir = Path(lab.state_dir)
    public_key = Path(f"{lab.ssh_key}.pub").read_text()
    hosts_file = _hosts_file(lab.hosts, lab.pods)
    known: list[str] = []
    for host in lab.hosts:
        _address, lines = vms.start(
            host.name,
            host.index,
            vm_root=state_dir / "vms" / host.name,
            lower=state_dir / "rootfs",
            public_key=public_key,
            hosts_file=hosts_file,
        )
        known += lines
    _write_access_files(lab, known, Path(lab.inventory))
    lab.save()
    saving = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        waits = [
            pool.submit(
                vms.wait_booted, h.name, h.address, vm_root=state_dir / "vms" / h.name, ssh_argv=lab.ssh_argv(h)
            )
            for h in booting
        ]
        if starting:
            if template is None:
                raise ValueError("starting pods needs Istio's bootstrap template")
            waits += [pool.submit(_start_pod, lab, pod, template, hosts_file, saving) for pod in starting]
        for wait in waits:
            wait.result()


def _start_pod(lab: LabState, pod: Pod, template: Path, hosts_file: str, saving: threading.Lock) -> None:
    if lab.kube is None or lab.istiod is None:
        raise OperationFailedError("the lab's kube-apiserver and istiod must be up before its pods")
    api = api_client(Path(lab.kube.kubeconfig), context="lab-admin")
    launched = pods.launch(api, pod, lab_istiod=lab.istiod, bootstrap_template=template, hosts_file=hosts_file)
    with saving:
        lab.pods = [launched if p.name == pod.name else p for p in lab.pods]
        lab.save()
    pods.wait_ready(launched)
    pods.mark_ready(api, launched)


def reset(names: list[str], *, state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Give VMs a fresh root filesystem (a new machine-id, host keys, nothing installed) and boot them again; give
    pods a new Pod object, token and sidecar (a restarted pod). No names: every VM (pods only when named)."""
    require_root("meshvm lab reset")
    lab = load(state_dir)
    if lab is None:
        raise UsageError("no lab is up", hint="start one with `meshvm lab up`")
    pod_names = {p.name for p in lab.pods}
    hosts = [lab.host(name) for name in names if name not in pod_names] if names else list(lab.hosts)
    restarted = [lab.pod(name) for name in names if name in pod_names]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda h: vms.stop_vm(h.name, vm_root=state_dir / "vms" / h.name), hosts))
        list(pool.map(pods.stop_sandbox, restarted))
    template = artifacts.istio(Path(lab.cache_dir)).bootstrap_template if restarted else None
    _boot(lab, hosts, starting=restarted, template=template)
    return [h.name for h in hosts] + [p.name for p in restarted]


def stop_istiod(*, state_dir: Path = DEFAULT_STATE_DIR) -> None:
    """Stop istiod (to see what the mesh does without its control plane); `start_istiod` brings it back."""
    require_root("meshvm lab stop istiod")
    lab = load(state_dir)
    if lab is None or lab.istiod is None:
        raise UsageError("no lab with istiod is up", hint="start one with `meshvm lab up`")
    stop(lab.istiod.pid)


def start_istiod(*, state_dir: Path = DEFAULT_STATE_DIR) -> IstiodInfo:
    """Start the lab's istiod again (a no-op while it runs); it keeps its CA, which lives in the cluster."""
    require_root("meshvm lab start istiod")
    lab = load(state_dir)
    if lab is None or lab.istiod is None or lab.kube is None:
        raise UsageError("no lab with istiod is up", hint="start one with `meshvm lab up`")
    if alive(lab.istiod.pid):
        return lab.istiod
    started = istiod.start(
        artifacts.istio(Path(lab.cache_dir), lab.istiod.version), state_dir, Path(lab.kube.kubeconfig)
    )
    lab.istiod = lab.istiod.model_copy(update=started)
    lab.save()
    return lab.istiod


def down(*, state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Remove everything the lab made (VMs, processes, network, files it wrote). False if nothing was up."""
    require_root("meshvm lab down")
    lab = load(state_dir)
    if lab is None:
        log.debug("no lab in %s", state_dir)
        return False
    failures: list[str] = []

    def attempt(name: str, step: Callable[[], Any]) -> None:
        try:
            step()
        except (MeshvmError, OSError) as exc:
            failures.append(f"{name}: {exc}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda h: attempt(f"VM {h.name}", lambda: vms.stop_vm(h.name, vm_root=state_dir / "vms" / h.name)),
                lab.hosts,
            )
        )
        list(pool.map(lambda p: attempt(f"pod {p.name}", functools.partial(pods.remove, p)), lab.pods))
    for name, proc in (
        ("istiod", lab.istiod),
        ("CoreDNS", lab.dns),
        ("kube-controller-manager", lab.controller_manager),
        ("kube-apiserver", lab.kube),
        ("etcd", lab.etcd),
        ("consul", lab.consul),
        ("jaeger", lab.jaeger),
    ):
        if proc is not None:
            attempt(name, functools.partial(stop, proc.pid))
    for root in CGROUP_ROOTS:
        attempt("cgroups", functools.partial(vms.remove_cgroup, root / "meshvm-lab"))
    attempt("network", network.bridge_down)
    if lab.inventory:
        attempt("inventory", lambda: Path(lab.inventory).unlink(missing_ok=True))
        attempt("inventory vars", lambda: lab_vars_path(Path(lab.inventory)).unlink(missing_ok=True))
    if failures:
        raise MeshvmError(
            "lab down left something behind: " + "; ".join(failures),
            hint=f"fix it and run `meshvm lab down` again (state kept in {state_dir})",
        )
    shutil.rmtree(state_dir)
    log.info(
        "lab down: removed %d VMs, %d pods, istiod, CoreDNS, Consul, Jaeger, etcd, kube-apiserver and %s",
        len(lab.hosts),
        len(lab.pods),
        network.BRIDGE,
    )
    return True


@dataclass(frozen=True)
class PeerStatus:
    peer: str
    version: str
    address: str
    state: str
    detail: str = ""


def status(*, state_dir: Path = DEFAULT_STATE_DIR) -> list[PeerStatus]:
    lab = load(state_dir)
    if lab is None:
        return []
    rows: list[PeerStatus] = []

    def state_of(pid: int) -> str:
        return "running" if alive(pid) else "stopped"

    def serving(pid: int, ready_url: str) -> str:
        if not alive(pid):
            return "stopped"
        return "running" if http_ok(ready_url)() else "not ready"

    if lab.consul:
        rows.append(
            PeerStatus("consul", lab.consul.version, f"http://{lab.consul.http_addr}", state_of(lab.consul.pid))
        )
    if lab.etcd:
        rows.append(PeerStatus("etcd", lab.etcd.version, lab.etcd.url, state_of(lab.etcd.pid)))
    if lab.kube:
        rows.append(PeerStatus("kube-apiserver", lab.kube.version, lab.kube.server, state_of(lab.kube.pid)))
    if lab.controller_manager:
        manager = lab.controller_manager
        rows.append(
            PeerStatus(
                "kube-controller-manager",
                manager.version,
                "-",
                state_of(manager.pid),
                f"controllers: {', '.join(manager.controllers)}",
            )
        )
    if lab.dns:
        cluster_dns = lab.dns
        rows.append(
            PeerStatus(
                "coredns",
                cluster_dns.version,
                f"dns://{cluster_dns.address}",
                serving(cluster_dns.pid, f"http://{cluster_dns.ready_addr}/ready"),
                "the cluster DNS: cluster.local from the API server",
            )
        )
    if lab.istiod:
        control = lab.istiod
        rows.append(
            PeerStatus(
                "istiod",
                control.version,
                f"grpcs://{control.xds_addr}",
                serving(control.pid, f"http://{control.http_addr}/ready"),
                f"xDS and CA; debug http://{control.http_addr}",
            )
        )
    if lab.jaeger:
        tracer = lab.jaeger
        rows.append(
            PeerStatus(
                "jaeger",
                tracer.version,
                f"zipkin http://{tracer.zipkin_addr}",
                serving(tracer.pid, f"http://{tracer.health_addr}/status"),
                f"traces: {tracer.query_url}/api/traces; OTLP grpc://{tracer.otlp_addr}",
            )
        )
    if lab.envoy:
        rows.append(PeerStatus("envoy", lab.envoy.version, lab.envoy.binary, "installed"))
    for host in lab.hosts:
        pidfile = state_dir / "vms" / host.name / "launcher.pid"
        running = pidfile.exists() and alive(int(pidfile.read_text()))
        rows.append(
            PeerStatus(f"vm {host.name}", lab.host_os, f"ssh root@{host.address}", "running" if running else "stopped")
        )
    for pod in lab.pods:
        rows.append(
            PeerStatus(
                f"pod {pod.namespace}/{pod.name}",
                f"istio-proxy {lab.istiod.version if lab.istiod else '?'}",
                pod.address,
                pods.state(pod),
                f"sa {pod.service_account}, {pods.spiffe_id(pod)}",
            )
        )
    return rows
