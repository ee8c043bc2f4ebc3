"""`lab up` twice is a no-op; `lab down` removes all it made; `lab up` afterwards works. Runs last in the session."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from meshvm import lab as lab_api
from meshvm.lab import network
from meshvm.lab.launcher import CGROUP_ROOTS
from meshvm.lab.procs import alive
from meshvm.lab.state import LabState

pytestmark = pytest.mark.lab


def _pids(state: LabState | None) -> list[int]:
    assert state is not None
    peers = [state.consul, state.etcd, state.kube, state.controller_manager, state.dns, state.istiod]
    assert all(peer is not None for peer in peers)
    vm_pids = [int((Path(state.state_dir) / "vms" / h.name / "launcher.pid").read_text()) for h in state.hosts]
    pod_pids = [pid for p in state.pods for pid in (p.sidecar_pid, p.app_pid) if pid is not None]
    assert len(pod_pids) == 2 * len(state.pods)
    return [peer.pid for peer in peers if peer is not None] + vm_pids + pod_pids


def _leftovers() -> list[str]:
    found = []
    if subprocess.run(["ip", "link", "show", network.BRIDGE], capture_output=True, check=False).returncode == 0:
        found.append(f"bridge {network.BRIDGE}")
    netns = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=False).stdout
    found += [f"netns {n['name']}" for n in json.loads(netns or "[]") if n["name"].startswith("meshvm-")]
    routes = subprocess.run(
        ["ip", "-j", "route", "show", "type", "unreachable"], capture_output=True, text=True, check=False
    ).stdout
    found += [f"route {r['dst']}" for r in json.loads(routes or "[]") if r["dst"].startswith("198.51.100.")]
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "meshvm-lab" in line.split()[4]
    ]
    found += [f"cgroup {root / 'meshvm-lab'}" for root in CGROUP_ROOTS if (root / "meshvm-lab").exists()]
    netns_etc = Path("/etc/netns")
    found += [f"resolver files {d}" for d in netns_etc.glob("meshvm-*")] if netns_etc.exists() else []
    return found


def test_up_twice_down_and_up_again(lab: LabState, meshvm_cli: str) -> None:
    before = _pids(lab_api.load())  # fresh: earlier tests restart pods
    again = subprocess.run(
        [meshvm_cli, "lab", "up", "--hosts", str(len(lab.hosts)), "--pods", str(len(lab.pods))],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert _pids(lab_api.load()) == before, "a second `lab up` must keep the running lab"

    down = subprocess.run([meshvm_cli, "lab", "down"], capture_output=True, text=True, check=False, timeout=180)
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in before)
    assert _leftovers() == []
    assert not Path(lab.state_dir).exists()
    assert not Path(lab.inventory).exists()
    noop = subprocess.run([meshvm_cli, "lab", "down"], capture_output=True, text=True, check=False, timeout=60)
    assert noop.returncode == 0
    assert "nothing to do" in noop.stderr

    # Leave a lab up for whatever runs next (molecule), as the session found it.
    restored = lab_api.up(len(lab.hosts), pods=len(lab.pods))
    assert len(restored.hosts) == len(lab.hosts)
    assert len(restored.pods) == len(lab.pods)
