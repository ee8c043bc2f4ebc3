"""Data-plane benchmark: meshvm's sidecars side by side with Istio's and with the floor, in one run.

Five paths, each driven by the same fortio client at the same load for the same time and answered by the same
fortio server, interleaved (direct, floor, meshvm, istio, mixed, direct, ... for --rounds rounds) so that drift on
the machine falls on all of them alike:

    direct  vm1 fortio -> vm2 fortio                                                       no proxy
    floor   vm1 fortio -> Envoy -> TLS with a client certificate -> Envoy -> vm2 fortio    the least two Envoys do:
                                                   one listener each, TCP proxy; same binary and workers as meshvm's
    meshvm  vm1 fortio -> vm1 sidecar -> mTLS -> vm2 sidecar -> vm2 fortio                 as meshvm ships them
    istio   pod1 fortio -> pod1 sidecar -> Istio mTLS -> pod2 sidecar -> pod2 fortio       configured by istiod
    mixed   pod1 fortio -> pod1 sidecar -> Istio mTLS -> vm2 sidecar -> vm2 fortio         pod -> VM

    .venv/bin/python -m bench.dataplane [--qps 1000] [--connections 16] [--duration 20] [--rounds 3] [--h2]
                                        [--variant access-log-off|tcp|tracing-off]

Needs the lab with two pods and vm1 (web, calling api) and vm2 (api) joined into both meshes, as `scripts/demo`
leaves it. For the run, vm2's demo `api` app and pod2's app are replaced by fortio's server on the same ports;
every other VM serving `api` is put in Consul maintenance and pod1's calls to `api` are pinned to vm2 (an Istio
DestinationRule subset and VirtualService), so every path reaches one server. All of it is put back after.

Reports, per path, p50/p90/p99 (median over the rounds) and the latency added over direct; the ratios
meshvm / Istio and meshvm / floor of the added p90 (median and spread over the rounds); each proxy's CPU per 1000
requests (= vCPU per 1000 rps) and its own memory (anonymous RSS: heap, stats, connections, not the mapped
binary). Writes bench/results/dataplane.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshvm import inventory
from meshvm.artifacts import cache_dir
from meshvm.errors import MeshvmError
from meshvm.lab.artifacts import run_long
from meshvm.lab.procs import wait_until
from meshvm.remote import Remote

# 1.69 and later need grol.io modules the Go proxy here refuses; 1.68.2 is the newest that builds.
FORTIO_VERSION = "1.68.2"
FORTIO = "/usr/local/bin/fortio"
REPO = Path(__file__).resolve().parents[1]
PATHS = ("direct", "floor", "meshvm", "istio", "mixed")
TARGETS = {"meshvm_vs_istio_added_p90": 1.0, "meshvm_vs_floor_added_p90": 1.2, "own_memory_mb": 20.0}
FLOOR_PORT, FLOOR_ADMIN_PORT = 25001, 25002
FLOOR_DIR = "/run/bench-floor"
FLOOR_UNIT = "bench-floor-envoy"
SERVER_UNIT = "bench-fortio"
BENCH_OBJECT = "bench-dataplane"
NETWORKING = ("networking.istio.io", "v1")
TOKEN_ENV = "CONSUL_HTTP_TOKEN_FILE=/etc/meshvm/consul-token"  # noqa: S105


def fortio() -> Path:
    binary = cache_dir() / "bin" / f"fortio-{FORTIO_VERSION}"
    if binary.exists():
        return binary
    gobin = binary.parent / f"fortio-{FORTIO_VERSION}.d"
    env = {
        **os.environ,
        "GOBIN": str(gobin),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
        "GOMODCACHE": str(cache_dir() / "go" / "mod"),
        "GOCACHE": str(cache_dir() / "go" / "build"),
    }
    run_long(
        ["go", "install", f"fortio.org/fortio@v{FORTIO_VERSION}"],
        what=f"building fortio {FORTIO_VERSION}",
        log_path=cache_dir() / "logs" / "fortio.log",
        env=env,
    )
    (gobin / "fortio").replace(binary)
    return binary


# --- pure: what fortio and /proc say, the floor's configuration, the report ------------------------------------


def fortio_result(text: str) -> dict[str, Any]:
    """Latency percentiles (ms), achieved rate and answers from `fortio load -json -`."""
    data = json.loads(text)
    percentiles = {p["Percentile"]: p["Value"] * 1000 for p in data["DurationHistogram"]["Percentiles"]}
    return {
        "p50": percentiles[50],
        "p90": percentiles[90],
        "p99": percentiles[99],
        "qps": data["ActualQPS"],
        "ok": data.get("RetCodes", {}).get("200", 0),
        "total": data["DurationHistogram"]["Count"],
    }


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # user + system, since the process started
    anon_mb: float  # its own memory: heap, stats, connections
    rss_mb: float  # also the pages of its binary mapped from disk, shared and dropped first under pressure
    argv: tuple[str, ...]

    @property
    def workers(self) -> int | None:
        return int(self.argv[self.argv.index("--concurrency") + 1]) if "--concurrency" in self.argv else None


def usage(stat: str, status: str, cmdline: str, ticks: int) -> Usage:
    """From /proc/<pid>/stat, /status and /cmdline (NUL-separated) of one Envoy."""
    fields = stat.rsplit(")", 1)[1].split()
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Usage(
        cpu_s=(int(fields[11]) + int(fields[12])) / ticks,
        anon_mb=int(values["RssAnon"].split()[0]) / 1024,
        rss_mb=int(values["VmRSS"].split()[0]) / 1024,
        argv=tuple(cmdline.rstrip("\0").split("\0")),
    )


def _tls(files: dict[str, str], *, downstream: bool) -> dict[str, Any]:
    kind = "DownstreamTlsContext" if downstream else "UpstreamTlsContext"
    context: dict[str, Any] = {
        "@type": f"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}",
        "common_tls_context": {
            "tls_certificates": [
                {"certificate_chain": {"filename": files["cert"]}, "private_key": {"filename": files["key"]}}
            ],
            "validation_context": {"trusted_ca": {"filename": files["ca"]}},
        },
    }
    if downstream:
        context["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _cluster(address: str, port: int, tls: dict[str, Any] | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(address, port)}}]}],
        },
    }
    if tls:
        cluster["transport_socket"] = tls
    return cluster


def _address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def floor_config(
    *,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    files: dict[str, str],
    server_side: bool,
    admin_port: int = FLOOR_ADMIN_PORT,
) -> dict[str, Any]:
    """The smallest Envoy that carries the mesh's traffic: one listener, TCP proxy, TLS with a client certificate
    between the two (the server side requires and verifies it)."""
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "floor",
                    "cluster": "upstream",
                },
            }
        ]
    }
    if server_side:
        chain["transport_socket"] = _tls(files, downstream=True)
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [{"name": "floor", "address": _address(*listen), "filter_chains": [chain]}],
            "clusters": [_cluster(*upstream, None if server_side else _tls(files, downstream=False))],
        },
    }


def access_log_off(config: dict[str, Any], service: str) -> bool:
    config.setdefault("envoy", {})["access_log_path"] = None
    return True


def tcp_proxying(config: dict[str, Any], service: str) -> bool:
    """The service as TCP (mTLS, L4 authorization) instead of HTTP: set on every host that serves it, as callers
    follow what the instances register only when they agree."""
    mine = [s for s in config.get("services", []) if s.get("name") == service]
    for entry in mine:
        entry["protocol"] = "tcp"
    return bool(mine)


def tracing_off(config: dict[str, Any], service: str) -> bool:
    """No spans and no trace headers (the lab's VMs trace 1 % of requests, as its pods do)."""
    return config.pop("tracing", None) is not None


# Features the shipped configuration has that the floor has not, each switched off on the VMs for a run: what
# each one costs is the difference to a run of the shipped configuration.
VARIANTS: dict[str, Callable[[dict[str, Any], str], bool]] = {
    "access-log-off": access_log_off,
    "tcp": tcp_proxying,
    "tracing-off": tracing_off,
}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the rounds; the latency each path adds over direct in the same round; the ratios of meshvm's
    added p90 to Istio's and to the floor's, per round (so drift cancels), with their spread."""
    direct = rounds["direct"]
    report: dict[str, Any] = {"paths": {}, "ratios": {}}
    for name, results in rounds.items():
        row: dict[str, Any] = {p: statistics.median(r[p] for r in results) for p in ("p50", "p90", "p99", "qps")}
        row["ok"] = sum(r["ok"] for r in results)
        row["total"] = sum(r["total"] for r in results)
        row["added"] = {
            p: statistics.median(r[p] - d[p] for r, d in zip(results, direct, strict=True))
            for p in ("p50", "p90", "p99")
        }
        row["proxies"] = {
            proxy: {
                "cpu_s_per_1000_requests": statistics.median(r["proxies"][proxy]["cpu_s_per_1000"] for r in results),
                "own_memory_mb": results[-1]["proxies"][proxy]["anon_mb"],
                "rss_mb": results[-1]["proxies"][proxy]["rss_mb"],
                "workers": results[-1]["proxies"][proxy]["workers"],
            }
            for proxy in results[0].get("proxies", {})
        }
        report["paths"][name] = row
    for other in ("istio", "floor"):
        if "meshvm" not in rounds or other not in rounds:
            continue
        ratios = []
        for mine, theirs, base in zip(rounds["meshvm"], rounds[other], direct, strict=True):
            added = theirs["p90"] - base["p90"]
            if added > 0:
                ratios.append((mine["p90"] - base["p90"]) / added)
        if ratios:
            report["ratios"][f"meshvm_vs_{other}_added_p90"] = _spread(ratios)
    return report


def _cpu_per_proxy(row: dict[str, Any]) -> float:
    values = [float(p["cpu_s_per_1000_requests"]) for p in row["proxies"].values()]
    return sum(values) / len(values)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'path':8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'+p50':>8}{'+p90':>8}{'+p99':>8}{'rps':>7}"
        f"{'ok':>13}   proxies: vCPU per 1000 rps, own memory MB (workers)",
    ]
    for name, row in report["paths"].items():
        added = row["added"]
        proxies = ", ".join(
            f"{proxy} {p['cpu_s_per_1000_requests']:.3f} vCPU {p['own_memory_mb']:.1f} MB ({p['workers']})"
            for proxy, p in row["proxies"].items()
        )
        lines.append(
            f"{name:8}{row['p50']:>9.2f}{row['p90']:>9.2f}{row['p99']:>9.2f}{added['p50']:>8.2f}{added['p90']:>8.2f}"
            f"{added['p99']:>8.2f}{row['qps']:>7.0f}{row['ok']:>7}/{row['total']:<6}  {proxies}"
        )
    paths = report["paths"]
    for key, spread in report["ratios"].items():
        target = TARGETS[key]
        verdict = "met" if spread["median"] <= target else "MISSED"
        lines.append(
            f"{key}: {spread['median']:.2f} (rounds {spread['min']:.2f}..{spread['max']:.2f}; target <= {target}: "
            f"{verdict})"
        )
    if "meshvm" in paths and "istio" in paths:
        mine, theirs = _cpu_per_proxy(paths["meshvm"]), _cpu_per_proxy(paths["istio"])
        verdict = "met" if mine <= theirs else "MISSED"
        lines.append(
            f"CPU per 1000 rps per proxy: meshvm {mine:.3f}, Istio {theirs:.3f} (target <= Istio's: {verdict})"
        )
    if "meshvm" in paths:
        largest = max(p["own_memory_mb"] for p in paths["meshvm"]["proxies"].values())
        verdict = "met" if largest <= TARGETS["own_memory_mb"] else "MISSED"
        lines.append(
            f"own memory per meshvm proxy: {largest:.1f} MB (target <= {TARGETS['own_memory_mb']:g}: {verdict})"
        )
    return "\n".join(lines)


# --- on the lab ---------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    read: Callable[[], Usage]


@dataclass
class Route:
    """One path: how to drive fortio along it, and the proxies it crosses."""

    name: str
    load: Callable[[int, int, int], dict[str, Any]]  # qps, connections, seconds -> fortio_result
    proxies: list[Proxy]


def fortio_argv(url: str, qps: int, connections: int, seconds: int, *, h2: bool, binary: str = FORTIO) -> list[str]:
    argv = [binary, "load", "-qps", str(qps), "-c", str(connections), "-t", f"{seconds}s", "-json", "-", "-quiet"]
    return [*argv, *(["-h2"] if h2 else []), url]


def vm_envoy(remote: Remote, unit: str) -> Proxy:
    """The Envoy process of a systemd unit on a VM (for meshvm's sidecar, not the unit's main process: that is
    envoy-restarter, the small supervisor that makes hot restarts possible)."""
    script = (
        f"m=$(systemctl show -p MainPID --value {unit}); for p in $m $(pgrep -P $m); do "
        '[ "$(cat /proc/$p/comm)" = envoy ] && { cat /proc/$p/stat; echo @@; cat /proc/$p/status; echo @@; '
        "cat /proc/$p/cmdline; exit 0; }; done; exit 1"
    )

    def read() -> Usage:
        done = remote.run("sh", "-c", script)
        if done.code != 0:
            raise SystemExit(f"bench.dataplane: no Envoy process in {unit} on {remote.host.name}")
        stat, status, cmdline = done.out.split("@@\n")
        return usage(stat, status, cmdline, os.sysconf("SC_CLK_TCK"))

    return Proxy(f"{remote.host.name}", read)


def pod_envoy(pod: Any) -> Proxy:
    """The Envoy that the pod's pilot-agent runs (a child of the sidecar process)."""

    def read() -> Usage:
        children = subprocess.run(
            ["pgrep", "-P", str(pod.sidecar_pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        # The lab's Envoy binary is named envoy-<sha256 prefix>.
        pid = [c for c in children if Path(f"/proc/{c}/comm").read_text().startswith("envoy")]
        if not pid:
            raise SystemExit(f"bench.dataplane: no Envoy under {pod.name}'s pilot-agent")
        proc = Path("/proc") / pid[0]
        return usage(
            (proc / "stat").read_text(),
            (proc / "status").read_text(),
            (proc / "cmdline").read_text(),
            os.sysconf("SC_CLK_TCK"),
        )

    return Proxy(pod.name, read)


def measure(route: Route, qps: int, connections: int, seconds: int) -> dict[str, Any]:
    before = {p.name: p.read() for p in route.proxies}
    result = route.load(qps, connections, seconds)
    after = {p.name: p.read() for p in route.proxies}
    thousands = max(result["total"], 1) / 1000
    result["proxies"] = {
        name: {
            "cpu_s_per_1000": (after[name].cpu_s - before[name].cpu_s) / thousands,
            "anon_mb": after[name].anon_mb,
            "rss_mb": after[name].rss_mb,
            "workers": after[name].workers,
        }
        for name in before
    }
    return result


def floor_certificates(directory: Path, server_ip: str) -> None:
    """A throwaway CA, a server certificate for vm2's address and a client certificate, in PEM."""
    from meshvm import pki

    ca = pki.new_ca("bench floor CA", validity=datetime.timedelta(days=1))
    (directory / "ca.pem").write_text(ca.cert_pem)
    for name, pair in (
        ("server", pki.issue(ca, "server", ips=(server_ip,), server=True, validity=datetime.timedelta(days=1))),
        ("client", pki.issue(ca, "client", uris=("spiffe://bench.floor/client",), validity=datetime.timedelta(days=1))),
    ):
        (directory / f"{name}.pem").write_text(pair.cert_pem)
        (directory / f"{name}-key.pem").write_text(pair.key_pem)


@contextmanager
def floor_envoys(client: Remote, server: Remote, app_port: int) -> Iterator[tuple[Proxy, Proxy]]:
    """Two floor Envoys, one on each VM, with the binary and worker count of the VM's own sidecar."""
    sidecar = vm_envoy(client, "envoy.service").read()
    envoy, workers = sidecar.argv[0], str(sidecar.workers or 2)
    files = {"cert": f"{FLOOR_DIR}/{{side}}.pem", "key": f"{FLOOR_DIR}/{{side}}-key.pem", "ca": f"{FLOOR_DIR}/ca.pem"}
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        floor_certificates(local, server.host.address)
        sides = (
            (client, "client", ("127.0.0.1", FLOOR_PORT), (server.host.address, FLOOR_PORT), False),
            (server, "server", (server.host.address, FLOOR_PORT), ("127.0.0.1", app_port), True),
        )
        for remote, side, listen, upstream, server_side in sides:
            named = {k: v.format(side=side) for k, v in files.items()}
            config = floor_config(listen=listen, upstream=upstream, files=named, server_side=server_side)
            (local / "envoy.json").write_text(json.dumps(config))
            remote.run("mkdir", "-p", "-m", "0700", FLOOR_DIR)
            for name in ("ca.pem", f"{side}.pem", f"{side}-key.pem", "envoy.json"):
                remote.put(local / name, f"{FLOOR_DIR}/{name}", 0o600)
    try:
        for remote, *_ in sides:
            started = remote.run(
                "systemd-run",
                f"--unit={FLOOR_UNIT}",
                "--collect",
                envoy,
                "-c",
                f"{FLOOR_DIR}/envoy.json",
                "--concurrency",
                workers,
                "--disable-hot-restart",
                "-l",
                "warning",
            )
            if started.code != 0:
                raise SystemExit(f"bench.dataplane: floor Envoy on {remote.host.name}: {started.err.strip()}")
        for remote, *_ in sides:
            _wait(f"floor Envoy on {remote.host.name}", functools.partial(_admin_ready, remote, FLOOR_ADMIN_PORT))
        yield vm_envoy(client, f"{FLOOR_UNIT}.service"), vm_envoy(server, f"{FLOOR_UNIT}.service")
    finally:
        for remote, *_ in sides:
            remote.run("systemctl", "stop", FLOOR_UNIT)
            remote.run("rm", "-rf", FLOOR_DIR)


def _wait(what: str, ready: Callable[[], bool]) -> None:
    wait_until(what, ready, timeout=60)


def _admin_ready(remote: Remote, port: int) -> bool:
    return remote.run("curl", "-sf", f"http://127.0.0.1:{port}/ready").code == 0


AGENT_CONFIG = "/etc/meshvm/agent.yaml"
XDS_DIR = "/var/lib/meshvm/envoy"


@contextmanager
def variant(name: str | None, remotes: list[Remote], service: str) -> Iterator[None]:
    """Each VM's agent configuration edited by VARIANTS[name] (in place: owner and mode kept) and the agent
    restarted, until the run ends; then the original back and the agent restarted again."""
    if name is None:
        yield
        return
    import yaml

    originals: dict[str, str] = {}
    try:
        for remote in remotes:
            text = remote.run("cat", AGENT_CONFIG).out
            config = yaml.safe_load(text)
            if not VARIANTS[name](config, service):
                continue
            originals[remote.host.name] = text
            _replace_agent_config(remote, yaml.safe_dump(config, sort_keys=False))
        if not originals:
            raise SystemExit(f"bench.dataplane: variant {name} changes nothing on {[r.host.name for r in remotes]}")
        yield
    finally:
        for remote in remotes:
            if remote.host.name in originals:
                _replace_agent_config(remote, originals[remote.host.name])


def _replace_agent_config(remote: Remote, text: str) -> None:
    """Write the agent's configuration, restart the agent and wait for its next render of Envoy's listeners."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as scratch:
        scratch.write(text)
        scratch.flush()
        remote.put(Path(scratch.name), "/run/bench-agent.yaml", 0o600)
    before = remote.run("stat", "-c", "%y", f"{XDS_DIR}/lds.json").out.strip()
    done = remote.run("sh", "-c", f"cat /run/bench-agent.yaml > {AGENT_CONFIG} && rm /run/bench-agent.yaml")
    if done.code != 0:
        raise SystemExit(f"bench.dataplane: writing {AGENT_CONFIG} on {remote.host.name}: {done.err.strip()}")
    remote.run("systemctl", "restart", "meshvm-agent.service")
    _wait(
        f"{remote.host.name}'s agent rendering the new listeners",
        lambda: remote.run("stat", "-c", "%y", f"{XDS_DIR}/lds.json").out.strip() != before,
    )


def maintenance(remote: Remote, service: str, enable: bool) -> None:
    """Take the host's sidecar for `service` out of the mesh (or back in) through its local Consul agent."""
    flag = ["-enable", "-reason", "bench.dataplane: one server"] if enable else ["-disable"]
    done = remote.run("env", TOKEN_ENV, "/usr/local/bin/consul", "maint", *flag, "-service", f"{service}-sidecar-proxy")
    if done.code != 0:
        raise SystemExit(f"bench.dataplane: consul maint on {remote.host.name} failed: {done.err.strip()}")


def healthy_endpoints(clusters: str, cluster: str) -> set[str]:
    """Addresses Envoy's /clusters lists as healthy for ``cluster``."""
    return {
        line.split("::")[1].rsplit(":", 1)[0]
        for line in clusters.splitlines()
        if line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")
    }


@contextmanager
def pinned_to(lab: Any, namespace: str, service: str, host: str, pod: Any) -> Iterator[None]:
    """Istio sends pod -> ``service`` only to ``host``'s WorkloadEntry: a subset by its labels, and a
    VirtualService to it. Both are deleted after."""
    from kubernetes import client as k8s

    from meshvm.kube.client import api_client

    custom = k8s.CustomObjectsApi(api_client(Path(lab.kube.kubeconfig), context="lab-admin"))
    listed: Any = custom.list_namespaced_custom_object(*NETWORKING, namespace, "workloadentries")
    entries = listed["items"]
    mine = next((e for e in entries if e["metadata"]["name"] == f"{service}-{host}"), None)
    if mine is None:
        raise SystemExit(
            f"bench.dataplane: no WorkloadEntry {namespace}/{service}-{host}: join {host} into Istio first"
        )
    labels = mine["spec"]["labels"]
    if any(e is not mine and e["spec"].get("labels", {}).items() >= labels.items() for e in entries):
        raise SystemExit(f"bench.dataplane: {host}'s WorkloadEntry labels {labels} do not single it out")
    fqdn = f"{service}.{namespace}.svc.cluster.local"
    objects = [
        (
            "destinationrules",
            {"host": fqdn, "subsets": [{"name": "bench", "labels": labels}]},
        ),
        (
            "virtualservices",
            {"hosts": [fqdn], "http": [{"route": [{"destination": {"host": fqdn, "subset": "bench"}}]}]},
        ),
    ]
    kinds = {"destinationrules": "DestinationRule", "virtualservices": "VirtualService"}
    try:
        for plural, spec in objects:
            body = {
                "apiVersion": "/".join(NETWORKING),
                "kind": kinds[plural],
                "metadata": {"name": BENCH_OBJECT, "namespace": namespace},
                "spec": spec,
            }
            custom.create_namespaced_custom_object(*NETWORKING, namespace, plural, body)
        _wait(
            f"{pod.name}'s sidecar routing {service} to {host} only",
            lambda: f"|bench|{fqdn}" in _pod_admin(pod, "/config_dump?resource=dynamic_route_configs"),
        )
        yield
    finally:
        from kubernetes.client.exceptions import ApiException

        for plural, _spec in objects:
            try:
                custom.delete_namespaced_custom_object(*NETWORKING, namespace, plural, BENCH_OBJECT)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def _pod_admin(pod: Any, path: str) -> str:
    from meshvm.lab.pods import in_pod

    argv = in_pod(pod, ["curl", "-sf", f"http://127.0.0.1:15000{path}"])
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def _in_pod_load(pod: Any, url: str, h2: bool) -> Callable[[int, int, int], dict[str, Any]]:
    from meshvm.lab.pods import in_pod

    def load(qps: int, connections: int, seconds: int) -> dict[str, Any]:
        argv = in_pod(pod, fortio_argv(url, qps, connections, seconds, h2=h2, binary=str(fortio())))
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
        if done.returncode != 0:
            raise SystemExit(f"bench.dataplane: fortio in {pod.name} failed: {done.stderr.strip()[-300:]}")
        return fortio_result(done.stdout)

    return load


def _vm_load(remote: Remote, url: str, h2: bool) -> Callable[[int, int, int], dict[str, Any]]:
    def load(qps: int, connections: int, seconds: int) -> dict[str, Any]:
        done = remote.run(*fortio_argv(url, qps, connections, seconds, h2=h2), timeout=seconds + 60)
        if done.code != 0:
            raise SystemExit(f"bench.dataplane: fortio on {remote.host.name} failed: {done.err.strip()[-300:]}")
        return fortio_result(done.out)

    return load


@contextmanager
def lab_routes(args: argparse.Namespace) -> Iterator[dict[str, Route]]:
    """The five paths on the lab, with one fortio server behind them all; everything put back on the way out."""
    from meshvm.lab import state as lab_state
    from meshvm.lab.pods import HTTP_PORT, app_replaced, service_host

    lab = lab_state.load()
    if lab is None or len(lab.pods) < 2 or lab.kube is None:
        raise SystemExit("bench.dataplane: needs the lab with two pods (`meshvm lab up --pods 2`, then scripts/demo)")
    hosts = inventory.load(args.inventory)
    vm1, vm2 = hosts["vm1"], hosts["vm2"]
    upstream = next(u for s in vm1.services for u in s.upstreams if u.service == "api")
    api = next(s for s in vm2.services if s.name == "api")
    source = next(s for s in vm1.services if upstream in s.upstreams)
    others = [h for h in hosts.values() if h.name != vm2.name and any(s.name == "api" for s in h.services)]
    pod1, pod2 = lab.pods[0], lab.pods[1]
    binary = fortio()
    serve = ["server", "-grpc-port", "disabled", "-redirect-port", "disabled", "-http-port"]
    with Remote(vm1) as client, Remote(vm2) as server, ExitStack() as stack:
        parked = [stack.enter_context(Remote(h)) for h in others]
        for remote in (client, server):
            remote.put(binary, FORTIO, 0o755)
        server.run("systemctl", "stop", "demo-app-api.service")
        stack.callback(server.run, "systemctl", "start", "demo-app-api.service")
        server.run("systemd-run", f"--unit={SERVER_UNIT}", "--collect", FORTIO, *serve, f"0.0.0.0:{api.port}")
        stack.callback(server.run, "systemctl", "stop", SERVER_UNIT)
        stack.enter_context(app_replaced(lab, pod2.name, [str(binary), *serve, f"0.0.0.0:{HTTP_PORT}"]))
        # First: a restarted agent deregisters its services on stop and registers them on start, ending their
        # maintenance.
        stack.enter_context(variant(args.variant, [client, server, *parked], api.name))
        for remote in parked:
            maintenance(remote, "api", enable=True)
            stack.callback(maintenance, remote, "api", False)
        _wait(
            f"vm1's sidecar sending api to {vm2.name} only",
            lambda: (
                healthy_endpoints(
                    client.run("curl", "-s", f"http://127.0.0.1:{vm1.envoy_admin_port}/clusters").out,
                    f"out.{source.name}.api",
                )
                == {vm2.address}
            ),
        )
        stack.enter_context(pinned_to(lab, args.namespace, api.name, vm2.name, pod1))
        floor_client, floor_server = stack.enter_context(floor_envoys(client, server, api.port))
        vm_api = "http://{}:{}/"
        routes = {
            "direct": Route("direct", _vm_load(client, vm_api.format(vm2.address, api.port), args.h2), []),
            "floor": Route(
                "floor",
                _vm_load(client, vm_api.format("127.0.0.1", FLOOR_PORT), args.h2),
                [floor_client, floor_server],
            ),
            "meshvm": Route(
                "meshvm",
                _vm_load(client, vm_api.format("127.0.0.1", upstream.local_port), args.h2),
                [vm_envoy(client, "envoy.service"), vm_envoy(server, "envoy.service")],
            ),
            "istio": Route(
                "istio",
                _in_pod_load(pod1, f"http://{service_host(pod2)}/", args.h2),
                [pod_envoy(pod1), pod_envoy(pod2)],
            ),
            "mixed": Route(
                "mixed",
                _in_pod_load(pod1, f"http://{api.name}.{args.namespace}.svc.cluster.local:{api.port}/", args.h2),
                [pod_envoy(pod1), vm_envoy(server, "envoy.service")],
            ),
        }
        yield routes


def interleaved(routes: dict[str, Route], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    for route in routes.values():  # warm connection pools and TLS sessions
        route.load(200, args.connections, 3)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
    for number in range(1, args.rounds + 1):
        for name in PATHS:
            result = measure(routes[name], args.qps, args.connections, args.duration)
            rounds[name].append(result)
            print(
                f"round {number}/{args.rounds} {name:7} p90 {result['p90']:.2f} ms, {result['qps']:.0f} rps, "
                f"{result['ok']}/{result['total']} ok",
                flush=True,
            )
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qps", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=20, help="seconds per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--h2", action="store_true", help="fortio speaks HTTP/2 (h2c) instead of HTTP/1.1")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        help="switch one feature off on the VMs for the run (the shipped configuration is put back after)",
    )
    parser.add_argument("--namespace", default="meshvm", help="where `meshvm join` registered the VMs")
    parser.add_argument("-i", "--inventory", type=Path, default=REPO / "inventories" / "lab")
    args = parser.parse_args()
    try:
        with lab_routes(args) as routes:
            rounds = interleaved(routes, args)
    except MeshvmError as exc:
        raise SystemExit(f"bench.dataplane: {exc}") from exc

    report = summarize(rounds)
    settings = {k: getattr(args, k) for k in ("qps", "connections", "duration", "rounds", "h2", "variant")}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = "-".join(["dataplane", *(["h2"] if args.h2 else []), *([args.variant] if args.variant else [])]) + ".json"
    (out / name).write_text(json.dumps({"settings": settings, "rounds": rounds, **report}, indent=2))
    print(
        f"fortio {args.qps} qps x {args.connections} connections x {args.duration} s x {args.rounds} rounds, "
        f"{'HTTP/2 (h2c)' if args.h2 else 'HTTP/1.1'}, meshvm {args.variant or 'as shipped'}; ms, median over rounds; "
        "+ = added over direct in the same round"
    )
    print(table(report))
    print(f"JSON: {out / name}")


if __name__ == "__main__":
    main()
