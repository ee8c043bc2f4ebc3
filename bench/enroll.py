"""Enrollment benchmark on the lab: wall time of playbooks/enroll.yml on 1, 3 and 10 fresh VMs and of an
idempotent re-run, plus what batch sizes, forks, pipelining, fact caching and Mitogen's strategy do (at 3 VMs), as
ratios against the default run measured in the same session.

    sudo .venv/bin/python -m bench.enroll                 # grows the lab to 10 VMs; about 15 minutes on 2 cores
    sudo .venv/bin/python -m bench.enroll --sizes 1,3 --no-variants

Each run starts from fresh VM disks (`meshvm lab reset`). meshvm's wheelhouse is built once up front (its time is
reported apart) so every run measures enrollment itself. The bench hosts run one mesh service each (no demo app):
the roles do the same work whatever the service is. Results go to bench/results/enroll-<time>.json.
Targets (issue 4): 10 VMs <= 90 s, re-run <= 20 s with 0 changed.
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

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO, env=env)


def _must(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        sys.exit(f"bench.enroll: {what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


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


def _enroll(inventory: Path, wheelhouse: Path, hosts: list[str], variant: Variant) -> dict[str, object]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", **variant.env}
    extra = {"meshvm_agent_wheelhouse": str(wheelhouse), "meshvm_agent_wheelhouse_build": False, **variant.extra_vars}
    argv = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(inventory),
        "playbooks/enroll.yml",
        "--limit",
        ",".join(hosts),
        "-e",
        json.dumps(extra),
    ]
    started, controller, machine = time.monotonic(), _children_cpu(), _machine_busy()
    done = _run(argv, env)
    seconds = time.monotonic() - started
    _must(done, f"enroll.yml on {','.join(hosts)}")
    recap = {m[1]: int(m[3]) for m in RECAP.finditer(done.stdout)}
    return {
        "seconds": round(seconds, 1),
        "changed": sum(recap.get(h, 0) for h in hosts),
        # CPU seconds: Ansible on the controller, and the whole machine (controller + VMs + lab servers).
        "controller_cpu_s": round(_children_cpu() - controller, 1),
        "machine_cpu_s": round(_machine_busy() - machine, 1),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (every /proc/stat column but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _fresh(hosts: list[str]) -> None:
    _must(_run([str(BIN / "meshvm"), "lab", "reset", *hosts]), "meshvm lab reset")


def measure(inventory: Path, wheelhouse: Path, count: int, variant: Variant, repeat: int) -> dict[str, object]:
    hosts = [f"vm{i}" for i in range(1, count + 1)]
    first, again = [], []
    for _ in range(repeat):
        _fresh(hosts)
        first.append(_enroll(inventory, wheelhouse, hosts, variant))
        again.append(_enroll(inventory, wheelhouse, hosts, variant))
    return {
        "hosts": count,
        "enroll_s": statistics.median(float(r["seconds"]) for r in first),
        "rerun_s": statistics.median(float(r["seconds"]) for r in again),
        "rerun_changed": max(int(r["changed"]) for r in again),
        "controller_cpu_s": statistics.median(float(r["controller_cpu_s"]) for r in first),
        "machine_cpu_s": statistics.median(float(r["machine_cpu_s"]) for r in first),
        "runs": {"enroll": first, "rerun": again},
    }


@dataclass(frozen=True)
class Variant:
    env: dict[str, str] = field(default_factory=dict)
    extra_vars: dict[str, object] = field(default_factory=dict)


DEFAULT = Variant()


def _variants(facts: Path) -> dict[str, Variant]:
    found = {
        "default (canary + rest, forks 25, pipelining)": DEFAULT,
        "one batch (serial 100%)": Variant(extra_vars={"meshvm_enroll_serial": "100%"}),
        "batches of 25%": Variant(extra_vars={"meshvm_enroll_serial": [1, "25%"]}),
        "forks 1": Variant(env={"ANSIBLE_FORKS": "1"}),
        "no pipelining": Variant(env={"ANSIBLE_PIPELINING": "False"}),
        "fact cache (jsonfile)": Variant(
            env={"ANSIBLE_CACHE_PLUGIN": "jsonfile", "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(facts)}
        ),
    }
    try:  # Mitogen's strategy (dev extra): one persistent Python per host instead of one per task.
        import ansible_mitogen  # type: ignore[import-untyped]
    except ImportError:
        return found
    strategies = Path(ansible_mitogen.__file__).parent / "plugins" / "strategy"
    found["mitogen_linear strategy"] = Variant(
        env={"ANSIBLE_STRATEGY_PLUGINS": str(strategies), "ANSIBLE_STRATEGY": "mitogen_linear"}
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,3,10", help="how many VMs to enroll at once (default 1,3,10)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the median is reported")
    parser.add_argument("--no-variants", action="store_true", help="skip the forks/pipelining/fact-cache runs")
    parser.add_argument(
        "--variants", default="", help="only the variants whose names contain one of these words (comma-separated)"
    )
    args = parser.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give numbers separated by commas, like 1,3,10")
    if sizes[0] < 1:
        parser.error("--sizes: each size must be 1 or more")
    _must(_run([str(BIN / "meshvm"), "lab", "up", "--hosts", str(max(sizes))]), "meshvm lab up")

    with tempfile.TemporaryDirectory(prefix="meshvm-bench-enroll-") as tmp:
        work = Path(tmp)
        inventory = _inventory(work, max(sizes))
        started = time.monotonic()
        wheelhouse = work / "wheelhouse"
        _must(_run([str(BIN / "meshvm"), "artifacts", "wheelhouse", str(wheelhouse)]), "meshvm artifacts wheelhouse")
        wheel_s = round(time.monotonic() - started, 1)

        by_size = [measure(inventory, wheelhouse, n, DEFAULT, args.repeat) for n in sizes]
        variants: dict[str, dict[str, object]] = {}
        if not args.no_variants:
            wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
            chosen = {n: v for n, v in _variants(work / "facts").items() if not wanted or any(w in n for w in wanted)}
            for name, variant in chosen.items():
                variants[name] = measure(inventory, wheelhouse, min(3, max(sizes)), variant, args.repeat)

    base = float(by_size[0]["enroll_s"])
    print(f"wheelhouse build (once, on the controller): {wheel_s} s")
    header = f"{'VMs':>4} {'enroll s':>9} {'x 1-VM':>7} {'re-run s':>9} {'changed':>8}"
    print(f"{header} {'CPU s/VM: Ansible':>18} {'machine':>8}")
    for row in by_size:
        enroll_s, hosts = float(row["enroll_s"]), int(str(row["hosts"]))
        per_vm = float(row["controller_cpu_s"]) / hosts, float(row["machine_cpu_s"]) / hosts
        print(
            f"{hosts:>4} {enroll_s:>9.1f} {enroll_s / base:>7.2f} {row['rerun_s']:>9} {row['rerun_changed']:>8}"
            f" {per_vm[0]:>18.1f} {per_vm[1]:>8.1f}"
        )
    print(f"(the machine has {os.cpu_count()} CPUs for the controller, the VMs and the lab's servers together)")
    if variants:
        default = next(iter(variants.values()))
        d_enroll, d_rerun = float(default["enroll_s"]), float(default["rerun_s"])
        print(f"\nat {default['hosts']} VMs: enroll s (x default), re-run s (x default)")
        for name, row in variants.items():
            e, r = float(row["enroll_s"]), float(row["rerun_s"])
            print(f"  {name:<48} {e:>6.1f} ({e / d_enroll:.2f})  {r:>6.1f} ({r / d_rerun:.2f})")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"enroll-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"wheelhouse_s": wheel_s, "sizes": by_size, "variants": variants}, indent=2) + "\n")
    print(f"\nwritten: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
