"""Data-plane benchmark by Istio's published method, on the lab VMs, in one run:

    client (fortio, vm1) -> server (fortio, vm2)                                    direct
    client (fortio, vm1) -> Envoy vm1 (outbound) -> mTLS -> Envoy vm2 -> server     through the mesh

    sudo .venv/bin/python -m bench.dataplane [--qps 1000] [--connections 16] [--duration 60]

Needs `meshvm lab up` and vm1 (web, calling api on 127.0.0.1:9191) and vm2 (api) joined, as the README's first
command leaves them. fortio is built once from the Go module proxy. For the run, vm2's demo `api` app is replaced
by fortio's server on the same port, and every other VM that serves `api` (vm3 in the lab) is put in Consul
maintenance, so both paths reach the same single server; all of it is put back after. Reports p50/p90/p99 for both
paths, the latency the mesh adds, and each Envoy's CPU (vCPU per 1000 rps) and RSS, next to the targets and
Istio's published figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from meshvm import inventory
from meshvm.artifacts import cache_dir
from meshvm.lab.artifacts import run_long
from meshvm.remote import Remote

# 1.69 and later need grol.io modules the Go proxy here refuses; 1.68.2 is the newest that builds.
FORTIO_VERSION = "1.68.2"
REPO = Path(__file__).resolve().parents[1]
TARGETS = {"added_p90_ms": 0.5, "vcpu_per_1000rps": 0.2, "rss_mb": 40.0}
ISTIO = {"added_p90_ms": 2.65, "vcpu_per_1000rps": 0.35, "rss_mb": 40.0}


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


def envoy_usage(remote: Remote) -> tuple[float, dict[str, float]]:
    """CPU seconds used so far, and memory in MB, of the host's Envoy: the newest `envoy` process, not the unit's
    main process (that is envoy-restarter, the small Python supervisor that makes hot restarts possible).

    Memory: RSS, and its two parts: anonymous (heap, stats, connections: what the proxy itself costs) and file
    (pages of the Envoy binary mapped from disk: shared by every process running it, dropped under pressure)."""
    pid = remote.run("pgrep", "-n", "-x", "envoy").out.strip()
    if not pid.isdigit():
        raise SystemExit(f"bench.dataplane: no envoy process on {remote.host.name}")
    stat = remote.run("cat", f"/proc/{pid}/stat").out.rsplit(")", 1)[1].split()
    ticks = int(remote.run("getconf", "CLK_TCK").out.strip() or 100)
    status = dict(
        line.split(":", 1) for line in remote.run("cat", f"/proc/{pid}/status").out.splitlines() if ":" in line
    )
    memory = {key: int(status[field].split()[0]) / 1024 for key, field in MEMORY_FIELDS.items()}
    return (int(stat[11]) + int(stat[12])) / ticks, memory


MEMORY_FIELDS = {"rss_mb": "VmRSS", "anon_mb": "RssAnon", "file_mb": "RssFile"}
TOKEN_ENV = "CONSUL_HTTP_TOKEN_FILE=/etc/meshvm/consul-token"  # noqa: S105


def maintenance(remote: Remote, service: str, enable: bool) -> None:
    """Take the host's sidecar for `service` out of the mesh (or back in) through its local Consul agent."""
    flag = ["-enable", "-reason", "bench.dataplane: one server"] if enable else ["-disable"]
    done = remote.run("env", TOKEN_ENV, "/usr/local/bin/consul", "maint", *flag, "-service", f"{service}-sidecar-proxy")
    if done.code != 0:
        raise SystemExit(f"bench.dataplane: consul maint on {remote.host.name} failed: {done.err.strip()}")


def wait_for_endpoints(client: Remote, admin_port: int, cluster: str, addresses: set[str]) -> None:
    """Wait until the client's Envoy sends `cluster` to exactly these addresses: the healthy endpoints (the agent
    marks a host in maintenance unhealthy within ~50 ms; it stays listed)."""
    seen: set[str] = set()
    for _ in range(100):
        clusters = client.run("curl", "-s", f"http://127.0.0.1:{admin_port}/clusters").out
        seen = {
            line.split("::")[1].rsplit(":", 1)[0]
            for line in clusters.splitlines()
            if line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")
        }
        if seen == addresses:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench.dataplane: {cluster} on the client still goes to {sorted(seen)}, not {sorted(addresses)}")


def load(client: Remote, url: str, qps: int, connections: int, duration: int) -> dict[str, Any]:
    done = client.run(
        "/usr/local/bin/fortio",
        "load",
        "-qps",
        str(qps),
        "-c",
        str(connections),
        "-t",
        f"{duration}s",
        "-json",
        "-",
        "-quiet",
        url,
        timeout=duration + 60,
    )
    data = json.loads(done.out)
    percentiles = {p["Percentile"]: p["Value"] * 1000 for p in data["DurationHistogram"]["Percentiles"]}
    codes = data.get("RetCodes", {})
    return {
        "p50": percentiles[50],
        "p90": percentiles[90],
        "p99": percentiles[99],
        "qps": data["ActualQPS"],
        "ok": codes.get("200", 0),
        "total": data["DurationHistogram"]["Count"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qps", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=60)
    parser.add_argument("-i", "--inventory", type=Path, default=REPO / "inventories" / "lab")
    args = parser.parse_args()
    hosts = inventory.load(args.inventory)
    vm1, vm2 = hosts["vm1"], hosts["vm2"]
    upstream = next(u for s in vm1.services for u in s.upstreams if u.service == "api")
    api = next(s for s in vm2.services if s.name == "api")
    source = next(s for s in vm1.services if upstream in s.upstreams)
    cluster = f"out.{source.name}.api"
    others = [h for h in hosts.values() if h.name != vm2.name and any(s.name == "api" for s in h.services)]
    binary = fortio()
    with Remote(vm1) as client, Remote(vm2) as server, ExitStack() as stack:
        parked = [stack.enter_context(Remote(h)) for h in others]
        for remote in (client, server):
            remote.put(binary, "/usr/local/bin/fortio", 0o755)
        server.run("systemctl", "stop", "demo-app-api.service")
        server.run(
            "systemd-run",
            "--unit=bench-fortio",
            "--collect",
            "/usr/local/bin/fortio",
            "server",
            "-http-port",
            f"0.0.0.0:{api.port}",
            "-grpc-port",
            "disabled",
            "-redirect-port",
            "disabled",
        )
        try:
            for remote in parked:
                maintenance(remote, "api", enable=True)
            wait_for_endpoints(client, vm1.envoy_admin_port, cluster, {vm2.address})
            # Warm both paths (connection pools, TLS sessions) before measuring.
            load(client, f"http://{vm2.address}:{api.port}/", 200, args.connections, 3)
            load(client, f"http://127.0.0.1:{upstream.local_port}/", 200, args.connections, 3)
            direct = load(client, f"http://{vm2.address}:{api.port}/", args.qps, args.connections, args.duration)
            before = envoy_usage(client), envoy_usage(server)
            started = time.monotonic()
            mesh = load(client, f"http://127.0.0.1:{upstream.local_port}/", args.qps, args.connections, args.duration)
            elapsed = time.monotonic() - started
            after = envoy_usage(client), envoy_usage(server)
        finally:
            for remote in parked:
                maintenance(remote, "api", enable=False)
            server.run("systemctl", "stop", "bench-fortio")
            server.run("systemctl", "start", "demo-app-api.service")
    per_1000 = mesh["qps"] / 1000
    proxies = {
        side: {"vcpu_per_1000rps": (after[i][0] - before[i][0]) / elapsed / per_1000, **after[i][1]}
        for i, side in enumerate(("client-side Envoy (vm1)", "server-side Envoy (vm2)"))
    }
    added = {p: mesh[p] - direct[p] for p in ("p50", "p90", "p99")}
    result = {
        "qps": args.qps,
        "connections": args.connections,
        "duration_s": args.duration,
        "direct": direct,
        "mesh": mesh,
        "added_ms": added,
        "proxies": proxies,
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "dataplane.json").write_text(json.dumps(result, indent=2))
    print(
        f"fortio {args.qps} qps x {args.connections} connections x {args.duration}s "
        f"(achieved: direct {direct['qps']:.0f}, mesh {mesh['qps']:.0f} qps; mesh ok {mesh['ok']}/{mesh['total']})"
    )
    print(f"{'':28}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, row in (("direct", direct), ("through the mesh (mTLS)", mesh), ("added by the mesh", added)):
        print(f"{name:28}{row['p50']:>9.3f}{row['p90']:>9.3f}{row['p99']:>9.3f}")
    print(
        f"added p90 {added['p90']:.3f} ms: target {TARGETS['added_p90_ms']} ms, Istio publishes "
        f"{ISTIO['added_p90_ms']} ms (ratio to Istio {added['p90'] / ISTIO['added_p90_ms']:.2f})"
    )
    for side, usage in proxies.items():
        print(
            f"{side}: {usage['vcpu_per_1000rps']:.3f} vCPU per 1000 rps (target {TARGETS['vcpu_per_1000rps']}, "
            f"Istio {ISTIO['vcpu_per_1000rps']}), RSS {usage['rss_mb']:.1f} MB (target {TARGETS['rss_mb']}): "
            f"anonymous {usage['anon_mb']:.1f} MB + the binary's mapped pages {usage['file_mb']:.1f} MB"
        )


if __name__ == "__main__":
    main()
