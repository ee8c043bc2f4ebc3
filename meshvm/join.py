"""`meshvm join | leave | status | prune`: from an inventory to healthy mesh members registered in Kubernetes."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshvm import bootstrap as bootstrap_mod
from meshvm import inventory, playbooks
from meshvm.config import ConsulSpec
from meshvm.consul.client import ConsulClient
from meshvm.errors import ConfigError, MeshvmError, UsageError
from meshvm.inventory import InventoryHost
from meshvm.kube import identity as kube_identity
from meshvm.kube import registration
from meshvm.remote import Remote
from meshvm.values import NAME_RE

log = logging.getLogger(__name__)
SUPPORTED_OS = {("debian", "12")}
EXPECTED_OS = {("debian", "11"), ("ubuntu", "22.04"), ("ubuntu", "24.04")}
MIN_FREE_MIB = 512
OUR_PROCESSES = ("consul", "envoy", "meshvm", "python3")
HEALTH_TIMEOUT = 90.0
Progress = Callable[[str, str], None]


def _quiet(_host: str, _message: str) -> None:
    return None


@dataclass
class HostReport:
    host: str
    address: str
    services: list[str]
    ok: bool = True
    step: str = ""
    error: str = ""
    consul_passing: int = 0
    consul_checks: int = 0
    envoy: str = "-"
    identities: list[str] = field(default_factory=list)  # Consul services with a mesh certificate in Envoy
    expiry: dict[str, str] = field(default_factory=dict)  # SPIFFE ID -> expiry of each certificate Envoy holds
    kubernetes: list[str] = field(default_factory=list)
    changed: int = 0  # tasks the playbook changed on this host (0 on a re-run of a joined host)
    istio_expected: bool = False

    def fail(self, step: str, error: str) -> None:
        self.ok, self.step, self.error = False, step, error

    @property
    def istio(self) -> str:
        """The Istio identity Envoy presents and until when; "" when the VM holds none."""
        found = [uri for uri in self.expiry if "/sa/" in uri]
        return f"{found[0]} until {self.expiry[found[0]]}" if found else ""

    @property
    def healthy(self) -> bool:
        """Every check passing in Consul, Envoy ready, and a mesh certificate for every service."""
        return (
            self.consul_checks > 0
            and self.consul_passing == self.consul_checks
            and self.envoy == "LIVE"
            and len(self.identities) == len(self.services)
            and (bool(self.istio) or not self.istio_expected)
        )


@dataclass(frozen=True)
class Target:
    """Where a join puts things: the cluster side and the playbook side."""

    inventory: tuple[Path, ...]  # layered as Ansible layers several -i (later ones override)
    project: Path
    namespace: str = "meshvm"
    mesh: registration.Mesh = "istio"
    kubeconfig: Path | None = None
    context: str | None = None

    def api(self) -> Any:
        from meshvm.kube.client import api_client

        return api_client(self.kubeconfig, self.context)


def _ports(host: InventoryHost) -> set[int]:
    agent = host.variables.get("meshvm_agent_agent") or {}
    ports = {
        host.envoy_admin_port,
        int(agent.get("listen_port", 19200)),
        int(host.variables.get("consul_agent_http_port", 8500)),
        int(host.variables.get("consul_agent_serf_lan_port", 8301)),
    }
    ports |= {s.mesh_port for s in host.services} | {u.local_port for s in host.services for u in s.upstreams}
    return ports


def preflight(host: InventoryHost) -> str:
    """'' when ``host`` can be enrolled; else what is wrong, in one line."""
    with Remote(host) as remote:
        facts = remote.run(
            "sh",
            "-c",
            '. /etc/os-release; echo "$ID $VERSION_ID"; cat /proc/1/comm; df -Pm / | tail -1; ss -ltnpH 2>/dev/null',
        )
    lines = facts.out.splitlines()
    if len(lines) < 3:
        return f"could not read the host's facts: {facts.err.strip()[:200]}"
    os_id = tuple(lines[0].split()[:2])
    if os_id not in SUPPORTED_OS | EXPECTED_OS:
        return (
            f"{' '.join(os_id)} is not supported: Debian 12 is tested; Debian 11 and Ubuntu 22.04/24.04 are "
            "expected to work"
        )
    if lines[1].strip() != "systemd":
        return f"PID 1 is {lines[1].strip()!r}, not systemd"
    free = int(lines[2].split()[3])
    if free < MIN_FREE_MIB:
        return f"only {free} MiB free on /, {MIN_FREE_MIB} MiB needed"
    wanted, busy = _ports(host), []
    for line in lines[3:]:
        fields = line.split()
        port = int(fields[3].rsplit(":", 1)[-1]) if len(fields) >= 4 else 0
        if port in wanted and not any(f'"{name}' in line for name in OUR_PROCESSES):
            busy.append(f"{port} ({fields[-1]})")
    if busy:
        return f"ports already taken by something else: {', '.join(busy)}"
    return ""


def observe(host: InventoryHost, consul: ConsulClient | None, report: HostReport) -> None:
    """Fill ``report`` with the host's health right now: Consul checks, Envoy readiness, mesh identities."""
    admin = f"http://127.0.0.1:{host.envoy_admin_port}"
    with Remote(host) as remote:
        report.envoy = remote.run("curl", "-s", "--max-time", "3", f"{admin}/ready").out.strip() or "down"
        certs = remote.run("curl", "-s", "--max-time", "3", f"{admin}/certs").out
    report.expiry = envoy_identities(certs)
    report.identities = [s.name for s in host.services if any(i.endswith(f"/svc/{s.name}") for i in report.expiry)]
    checks = consul.node_checks(host.name) if consul is not None else []
    ours = {s.name for s in host.services}
    wanted = [
        c
        for c in checks
        if c.get("ServiceName", "").removesuffix("-sidecar-proxy") in ours or c.get("CheckID") == "serfHealth"
    ]
    report.consul_checks = len(wanted)
    report.consul_passing = sum(c["Status"] == "passing" for c in wanted)


def envoy_identities(certs_json: str) -> dict[str, str]:
    """SPIFFE ID -> expiry of each workload certificate in Envoy's ``/certs`` (Consul's and Istio's)."""
    try:
        data = json.loads(certs_json or "{}")
    except ValueError:
        return {}
    found: dict[str, str] = {}
    for entry in data.get("certificates") or []:
        for cert in entry.get("cert_chain") or []:
            for name in cert.get("subject_alt_names") or []:
                uri = name.get("uri", "")
                if uri.startswith("spiffe://"):
                    found[uri] = str(cert.get("expiration_time", ""))
    return found


def _consul_client(material: bootstrap_mod.Bootstrap | None) -> ConsulClient | None:
    if material is None or not material.consul_http_addr:
        return None
    spec = ConsulSpec(http_addr=material.consul_http_addr)
    return ConsulClient(spec, material.controller_token())


def load_bootstrap(target: Target, bootstrap_file: Path | None) -> bootstrap_mod.Bootstrap:
    if bootstrap_file is not None:
        return bootstrap_mod.from_file(bootstrap_file)
    return bootstrap_mod.from_cluster(target.api(), target.namespace)


def _reports(hosts: dict[str, InventoryHost]) -> dict[str, HostReport]:
    return {n: HostReport(n, h.address, [s.name for s in h.services]) for n, h in hosts.items()}


def _preflight_all(hosts: dict[str, InventoryHost], reports: dict[str, HostReport], progress: Progress) -> None:
    def check_host(name: str) -> None:
        try:
            problem = preflight(hosts[name])
        except MeshvmError as exc:
            problem = str(exc)
        if problem:
            reports[name].fail("preflight", problem)
        progress(name, "preflight: " + (problem or "ok"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(check_host, hosts))


def _check_names(workloads: list[registration.VmWorkload]) -> None:
    """A ServiceAccount the cluster could not hold: one line naming the host, before anything is applied."""
    for vm in workloads:
        if not NAME_RE.match(vm.service_account):
            raise ConfigError(
                f"inventory host {vm.host}: meshvm_service_account {vm.service_account!r} cannot be a ServiceAccount",
                hint="use lower-case letters, digits and '-', starting with a letter, at most 63 characters",
            )


def workload(host: InventoryHost) -> registration.VmWorkload:
    """The VM as the cluster sees it: its ServiceAccount is ``meshvm_service_account``, else its first service's
    name (else the host's)."""
    variables = host.variables
    return registration.VmWorkload(
        host.name,
        host.address,
        host.services,
        # No service at all: the playbook's checks stop such a host with their own message.
        service_account=str(variables.get("meshvm_service_account") or (host.services or [host])[0].name),
        network=str(variables.get("meshvm_network", "")),
        locality=str(variables.get("meshvm_locality", "")),
        plaintext=bool(variables.get("meshvm_kubernetes_plaintext", False)),
    )


def _register(
    target: Target,
    hosts: dict[str, InventoryHost],
    names: list[str],
    reports: dict[str, HostReport],
    part: registration.Part,
) -> None:
    try:
        changes = registration.register(
            target.api(), [workload(hosts[n]) for n in names], target.namespace, target.mesh, part
        )
    except MeshvmError as exc:
        for name in names:
            reports[name].fail("kubernetes", str(exc))
        return
    for change in changes:
        for name in names:
            if change.name.endswith(f"-{name}"):
                reports[name].kubernetes.append(f"{change.kind}/{change.name} {change.action}")


@dataclass(frozen=True)
class IstioMaterial:
    """What every VM joining the cluster's Istio mesh gets: Istio's root, and the bootstrap material that names
    istiod and the API server (with its CA)."""

    root_pem: str
    material: bootstrap_mod.Bootstrap


def _istio_material(target: Target, material: bootstrap_mod.Bootstrap) -> IstioMaterial | None:
    """Checked before anything is applied: the bootstrap names istiod and the API server, istiod has a root here."""
    if target.mesh != "istio":
        return None
    kube_identity.require_istio(material, "the bootstrap material")
    return IstioMaterial(kube_identity.root_certificate(target.api(), target.namespace), material)


def _istio_host_vars(
    target: Target,
    hosts: dict[str, InventoryHost],
    names: list[str],
    istio: IstioMaterial,
    reports: dict[str, HostReport],
    *,
    check: bool,
) -> dict[str, dict[str, Any]]:
    """Each VM's istio: settings and first refresh token (its identity objects exist first; not in check mode)."""
    if not check:
        _register(target, hosts, names, reports, "identity")
    api = None if check else target.api()
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        if not reports[name].ok:
            continue
        vm = workload(hosts[name])
        token = ""
        if api is not None:
            try:
                seconds = int(istio.material.istio_token_lifetime)
                token = kube_identity.first_token(api, target.namespace, vm, seconds)
            except MeshvmError as exc:
                reports[name].fail("kubernetes", str(exc))
                continue
        found[name] = {
            "meshvm_agent_istio": kube_identity.settings(istio.material, vm, target.namespace),
            "meshvm_agent_istio_token": token,
        }
    return found


def _wait_healthy(
    hosts: dict[str, InventoryHost],
    names: list[str],
    reports: dict[str, HostReport],
    material: bootstrap_mod.Bootstrap,
    progress: Progress,
) -> None:
    consul = _consul_client(material)
    deadline = time.monotonic() + HEALTH_TIMEOUT
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            try:
                observe(hosts[name], consul, reports[name])
            except MeshvmError as exc:
                reports[name].envoy = f"unreachable: {exc}"[:80]
            if reports[name].healthy:
                pending.discard(name)
                progress(name, "healthy")
        if pending:
            time.sleep(1)
    for name in pending:
        r = reports[name]
        istio = f", Istio identity {r.istio or 'none yet'}" if r.istio_expected else ""
        r.fail(
            "health",
            f"not healthy after {HEALTH_TIMEOUT:.0f}s: Consul {r.consul_passing}/{r.consul_checks} "
            f"passing, Envoy {r.envoy}, mesh identities {len(r.identities)}/{len(r.services)}{istio}",
        )


def join(
    target: Target,
    names: list[str],
    *,
    bootstrap_file: Path | None = None,
    check: bool = False,
    progress: Progress = _quiet,
) -> list[HostReport]:
    """Preflight, enrol (playbooks), register in Kubernetes, wait for health. Every host gets a report."""
    hosts = inventory.select(inventory.load(target.inventory), names)
    material = load_bootstrap(target, bootstrap_file)
    workloads = [workload(h) for h in hosts.values()]
    _check_names(workloads)
    registration.check_plaintext(workloads, target.mesh)
    istio = _istio_material(target, material)
    reports = _reports(hosts)
    for report in reports.values():
        report.istio_expected = istio is not None
    _preflight_all(hosts, reports, progress)
    ready = [n for n in hosts if reports[n].ok]
    extravars = material.ansible_vars()
    host_vars: dict[str, dict[str, Any]] = {}
    if istio is not None and ready:
        host_vars = _istio_host_vars(target, hosts, ready, istio, reports, check=check)
        extravars |= {
            "meshvm_agent_istio_root_cert": istio.root_pem,
            "meshvm_agent_istio_kube_ca": istio.material.kube_ca_pem,
        }
        ready = [n for n in ready if reports[n].ok]
    if ready:
        run = playbooks.run(
            "enroll.yml",
            inventory=target.inventory,
            project=target.project,
            limit=ready,
            extravars=extravars,
            host_vars=host_vars,
            check=check,
            on_task=progress,
        )
        for name, outcome in run.hosts.items():
            reports[name].changed = outcome.changed
            if not outcome.ok:
                reports[name].fail(f"enroll: {outcome.failed_task}", outcome.message)
    enrolled = [n for n in ready if reports[n].ok]
    if enrolled and not check:
        _register(target, hosts, enrolled, reports, "services")
        _wait_healthy(hosts, [n for n in enrolled if reports[n].ok], reports, material, progress)
    return list(reports.values())


def leave(
    target: Target,
    names: list[str],
    *,
    purge: bool = False,
    bootstrap_file: Path | None = None,
    progress: Progress = _quiet,
) -> list[HostReport]:
    """Remove from Kubernetes, then drain, deregister from Consul, stop the units and remove the hosts' own
    Consul ACL tokens. Safe to repeat."""
    if not names:
        raise UsageError("name the hosts to take out of the mesh", hint="meshvm leave vm1 vm2 -i INVENTORY")
    hosts = inventory.select(inventory.load(target.inventory), names)
    reports = _reports(hosts)
    try:
        token_vars = load_bootstrap(target, bootstrap_file).token_vars()
    except MeshvmError as exc:
        log.warning("the hosts' own Consul ACL tokens stay (no bootstrap material: %s)", exc)
        token_vars = {}
    try:
        for change in registration.remove_hosts(target.api(), target.namespace, set(hosts)):
            for name in hosts:
                if change.name.endswith(f"-{name}"):
                    reports[name].kubernetes.append(f"deleted {change.kind}/{change.name}")
    except MeshvmError as exc:
        for report in reports.values():
            report.fail("kubernetes", str(exc))
    run = playbooks.run(
        "leave.yml",
        inventory=target.inventory,
        project=target.project,
        limit=list(hosts),
        extravars={"meshvm_leave_purge": purge, **token_vars},
        on_task=progress,
    )
    for name, outcome in run.hosts.items():
        if not outcome.ok and reports[name].ok:
            reports[name].fail(f"leave: {outcome.failed_task}", outcome.message)
    return list(reports.values())


def status(target: Target, *, bootstrap_file: Path | None = None) -> dict[str, Any]:
    """One row per inventory host, plus Kubernetes objects of hosts no longer in the inventory (stale)."""
    hosts = inventory.load(target.inventory)
    try:
        material: bootstrap_mod.Bootstrap | None = load_bootstrap(target, bootstrap_file)
    except MeshvmError as exc:
        log.warning("Consul health not shown: %s", exc)
        material = None
    consul = _consul_client(material)
    try:
        objects = registration.hosts_with_objects(target.api(), target.namespace)
    except MeshvmError as exc:
        log.warning("Kubernetes objects not shown: %s", exc)
        objects = {}
    reports = _reports(hosts)

    def one(name: str) -> HostReport:
        report = reports[name]
        report.kubernetes = objects.get(name, [])
        # A VM registered as a WorkloadEntry is in the cluster's Istio mesh: it must present its Istio identity.
        report.istio_expected = any(o.startswith("WorkloadEntry/") for o in report.kubernetes)
        try:
            observe(hosts[name], consul, report)
        except MeshvmError as exc:
            report.fail("reach", str(exc))
        report.ok = report.ok and report.healthy and bool(report.kubernetes)
        return report

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(one, sorted(hosts)))
    stale = {h: objs for h, objs in objects.items() if h not in hosts}
    return {"hosts": [asdict(r) | {"healthy": r.healthy, "istio": r.istio} for r in rows], "stale": stale}


def prune(target: Target) -> list[str]:
    """Remove Kubernetes objects of VMs that are no longer in the inventory."""
    hosts = inventory.load(target.inventory)
    api = target.api()
    stale = {h for h in registration.hosts_with_objects(api, target.namespace) if h not in hosts}
    return [f"{c.kind}/{c.name}" for c in registration.remove_hosts(api, target.namespace, stale)] if stale else []
