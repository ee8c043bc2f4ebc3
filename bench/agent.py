"""Agent benchmark on the lab's real Consul: render + write time and RSS at 100 and 1000 upstream services
(10 endpoints each), and convergence from a health flip in Consul to Envoy's endpoint change.

    sudo .venv/bin/python -m bench.agent            # needs `meshvm lab up`; about 3 minutes

Every figure is a median over repeats; ratios are against baselines measured in the same run:
* render: the same number of files written by a bare loop (json.dumps + atomic rename), i.e. the I/O floor;
* RSS: an idle Python interpreter that has imported meshvm (the floor of any Python agent);
* convergence: Consul's own propagation, i.e. the time for a blocking query on the same service to return.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import consul

from meshvm import lab as lab_api
from meshvm.artifacts import cache_dir
from meshvm.fsutil import atomic_write
from meshvm.lab import artifacts
from tests.support.mesh import MeshNode, apply_policy, management, wait_for

ENDPOINTS = 10
TAG = "bench"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def seed_catalog(c: consul.Consul, services: int) -> list[str]:
    """Register services x ENDPOINTS sidecars on fake nodes straight into the catalog (as a Consul server holds
    them for VMs), with a passing check each. (Consul 1.8's /v1/txn drops Kind and Proxy, so one call each.)"""
    names = [f"{TAG}-s{i:04d}" for i in range(services)]

    def register(item: tuple[int, str]) -> None:
        e, name = item
        node, sid = f"{TAG}-node{e}", f"{name}-sidecar-proxy"
        body = {
            "Node": node,
            "Address": f"127.1.0.{e + 1}",
            "Service": {
                "ID": sid,
                "Service": sid,
                "Port": 20000 + e,
                "Kind": "connect-proxy",
                "Proxy": {"DestinationServiceName": name},
                "Meta": {"protocol": "http"},
            },
            "Check": {"Node": node, "CheckID": f"{sid}:alive", "Name": "alive", "Status": "passing", "ServiceID": sid},
        }
        c.http.put(lambda r: r.code, "/v1/catalog/register", data=json.dumps(body), headers=c.prepare_headers())

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(register, [(e, n) for e in range(ENDPOINTS) for n in names]))
    return names


def unseed(c: consul.Consul) -> None:
    for e in range(ENDPOINTS):
        c.http.put(
            lambda r: r.code,
            "/v1/catalog/deregister",
            data=json.dumps({"Node": f"{TAG}-node{e}"}),
            headers=c.prepare_headers(),
        )


def io_floor(files: int, size: int, directory: Path) -> float:
    """Seconds to write ``files`` files of ``size`` bytes with json.dumps + atomic rename (no fsync), median of 5."""
    payload = {"x": "y" * size}
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for i in range(files):
            atomic_write(directory / f"f{i}.json", json.dumps(payload), durable=False)
        samples.append(time.perf_counter() - started)
        for path in directory.glob("f*.json"):
            path.unlink()
    return statistics.median(samples)


def idle_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", "import meshvm.agent.runner, time; time.sleep(30)"])
    time.sleep(2)
    try:
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def metric(node: MeshNode, name: str) -> float:
    for line in node.agent_metrics().splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def render_run(lab: lab_api.LabState, names: list[str], work: Path, envoy: Path) -> dict[str, float]:
    """An agent with one local service calling ``names``: first full render, re-renders, RSS."""
    node = MeshNode(lab, f"{TAG}-agent-{len(names)}", work, envoy, policy_prefix=f"meshvm/tests/{TAG}")
    node.add_service(
        f"{TAG}-client", 1, check={"type": "none"}, upstreams=[{"service": n, "protocol": "http"} for n in names]
    )
    node.start_consul()
    try:
        return _render_run(lab, node, names)
    finally:
        node.stop()


def _render_run(lab: lab_api.LabState, node: MeshNode, names: list[str]) -> dict[str, float]:
    started = time.monotonic()
    node.start_agent()
    first = time.monotonic() - started
    layout_dir = node.dir / "envoy"
    wait_for("all endpoints rendered", lambda: metric(node, "meshvm_syncs_total") >= 1, timeout=120)
    time.sleep(3)
    files = sum(1 for _ in layout_dir.rglob("*.json"))
    sizes = [p.stat().st_size for p in layout_dir.rglob("cla.json")]
    # Force full re-renders: each policy change re-renders everything; read the agent's own render histogram.
    before_count = metric(node, "meshvm_render_seconds_count")
    before_sum = metric(node, "meshvm_render_seconds_sum")
    durations = []
    for i in range(5):
        apply_policy(lab, {"services": {names[0]: {"timeout": f"{i + 2}s"}}}, f"meshvm/tests/{TAG}")
        wait_for(
            "re-render", lambda c=before_count + i + 1: metric(node, "meshvm_render_seconds_count") >= c, timeout=60
        )
    total = metric(node, "meshvm_render_seconds_sum") - before_sum
    count = metric(node, "meshvm_render_seconds_count") - before_count
    durations.append(total / max(count, 1))
    rss = rss_mb(node.pids["agent"])
    with tempfile.TemporaryDirectory() as tmp:
        floor = io_floor(files, int(statistics.median(sizes)) if sizes else 300, Path(tmp))
    return {
        "services": len(names),
        "files": files,
        "first_render_s": first,
        "render_s": statistics.median(durations),
        "io_floor_s": floor,
        "rss_mb": rss,
    }


def convergence_run(lab: lab_api.LabState, names: list[str], work: Path, envoy: Path, flips: int) -> dict[str, Any]:
    """Flip one endpoint's health in Consul; time until Envoy's admin API shows the change."""
    c = management(lab)
    node = MeshNode(lab, f"{TAG}-conv", work, envoy, policy_prefix=f"meshvm/tests/{TAG}")
    target = names[0]
    node.add_service(f"{TAG}-client", 1, check={"type": "none"}, upstreams=[{"service": target, "protocol": "http"}])
    try:
        return _convergence(c, node, target, flips)
    finally:
        node.stop()


def _convergence(c: consul.Consul, node: MeshNode, target: str, flips: int) -> dict[str, Any]:
    node.start()
    cluster = f"out.{TAG}-client.{target}"
    wait_for("endpoints", lambda: len(node.endpoints(cluster)) == ENDPOINTS, timeout=60)
    sid = f"{target}-sidecar-proxy"
    envoy_times, consul_times = [], []
    for i in range(flips):
        status = "critical" if i % 2 == 0 else "passing"
        want = ENDPOINTS - 1 if status == "critical" else ENDPOINTS
        index, _ = c.health.service(sid)
        seen = threading.Event()

        def block(idx: str = index, done: threading.Event = seen) -> None:
            c.health.service(sid, index=idx, wait="10s")
            done.set()

        waiter = threading.Thread(target=block)
        waiter.start()
        time.sleep(0.05)
        started = time.perf_counter()
        register = {
            "Node": f"{TAG}-node0",
            "Address": "127.1.0.1",
            "SkipNodeUpdate": True,
            "Check": {
                "Node": f"{TAG}-node0",
                "CheckID": f"{sid}:alive",
                "Name": "alive",
                "Status": status,
                "ServiceID": sid,
            },
        }
        c.http.put(lambda r: r.code, "/v1/catalog/register", data=json.dumps(register), headers=c.prepare_headers())
        seen.wait(10)
        consul_times.append(time.perf_counter() - started)
        while len(node.endpoints(cluster)) != want:
            time.sleep(0.002)
        envoy_times.append(time.perf_counter() - started)
        waiter.join()
    q = statistics.quantiles(envoy_times, n=100)
    return {
        "flips": flips,
        "p50_s": statistics.median(envoy_times),
        "p99_s": q[98],
        "consul_p50_s": statistics.median(consul_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    lab = lab_api.load()
    if lab is None or lab.consul is None:
        raise SystemExit("bench.agent: no lab is up; run `meshvm lab up` first")
    envoy = artifacts.envoy(cache_dir()).path
    c = management(lab)
    apply_policy(lab, {"authorization": {"default_action": "allow"}}, f"meshvm/tests/{TAG}")
    results: dict[str, Any] = {"idle_rss_mb": idle_rss(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            names = seed_catalog(c, max(args.sizes))
            for size in args.sizes:
                results["runs"].append(render_run(lab, names[:size], work, envoy))
            results["convergence"] = convergence_run(lab, names, work, envoy, args.flips)
        finally:
            unseed(c)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "agent.json").write_text(json.dumps(results, indent=2))
    print(
        f"{'upstreams':>9} {'files':>6} {'render ms':>10} {'I/O floor ms':>13} {'ratio':>6} {'RSS MB':>7} "
        f"{'RSS/idle':>8} {'first render s':>15}"
    )
    for run in results["runs"]:
        render_ms, floor_ms = run["render_s"] * 1000, run["io_floor_s"] * 1000
        print(
            f"{run['services']:>9} {run['files']:>6} {render_ms:>10.1f} {floor_ms:>13.1f} {render_ms / floor_ms:>6.2f}"
            f" {run['rss_mb']:>7.1f} {run['rss_mb'] / results['idle_rss_mb']:>8.2f} {run['first_render_s']:>15.2f}"
        )
    conv = results["convergence"]
    print(
        f"convergence over {conv['flips']} health flips: p50 {conv['p50_s'] * 1000:.0f} ms, "
        f"p99 {conv['p99_s'] * 1000:.0f} ms (Consul's own blocking query p50 {conv['consul_p50_s'] * 1000:.0f} ms, "
        f"ratio {conv['p50_s'] / conv['consul_p50_s']:.1f})"
    )
    print(f"idle interpreter with meshvm imported: {results['idle_rss_mb']:.1f} MB")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
