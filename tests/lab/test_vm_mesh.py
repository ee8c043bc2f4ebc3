"""`meshvm join/leave/status` on the lab's nspawn VMs, then the resilience and security suite under steady load.

The VMs are reset to fresh disks first; the demo apps and the lab policy come from the playbooks, the rest from
`meshvm join` exactly as the README's first command runs it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshvm import lab as lab_api
from meshvm.kube import registration
from meshvm.kube.client import api_client
from meshvm.lab import consul_server
from meshvm.lab.procs import stop
from meshvm.lab.state import LabState
from tests.support.mesh import management, meshvm_exe, wait_for
from tests.support.mesh import ssh as _ssh

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "inventories" / "lab"
FORTIO = "/usr/local/bin/fortio"


def _meshvm(lab: LabState, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    assert lab.kube is not None
    return subprocess.run(
        [meshvm_exe(), *args, "-i", str(INVENTORY), "--kubeconfig", lab.kube.kubeconfig, "--context", "lab-registrar"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def _playbook(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(meshvm_exe()).parent / "ansible-playbook"), "-i", str(INVENTORY), f"playbooks/{name}", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=900,
        env={
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "PATH": f"{Path(meshvm_exe()).parent}:/usr/bin:/bin",
            "HOME": "/root",
        },
    )


@pytest.fixture(scope="module")
def joined(lab: LabState) -> LabState:
    subprocess.run([meshvm_exe(), "lab", "reset", "vm1", "vm2", "vm3"], check=True, capture_output=True)
    # `--mesh kubernetes` (join's default) is for clusters without a mesh: pods reach a VM's service through its
    # EndpointSlice, without mTLS, so the apps listen on the VM's address here (the lab default is loopback only).
    for playbook, extra in (("demo.yml", ["-e", "demo_app_address=0.0.0.0"]), ("policy.yml", [])):
        done = _playbook(playbook, *extra)
        assert done.returncode == 0, done.stdout[-3000:]
    return lab


def test_join_two_vms_end_to_end(joined: LabState) -> None:
    done = _meshvm(joined, "join", "vm1", "vm2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vm1" in done.stdout
    assert "vm2" in done.stdout
    # VM to VM over mTLS: the web app's upstream on vm1 reaches the api app on vm2.
    reply = _ssh(joined, "vm1", "curl", "-sf", "http://127.0.0.1:9191/")
    assert reply.returncode == 0, reply.stderr
    body = json.loads(reply.stdout)
    assert body["hostname"] == "vm2", body
    assert body["service"] == "api", body


def test_join_registered_correct_kubernetes_objects(joined: LabState) -> None:
    assert joined.kube is not None
    api = api_client(Path(joined.kube.kubeconfig), context="lab-registrar")
    objects = registration.hosts_with_objects(api, "meshvm")
    assert sorted(objects["vm2"]) == ["EndpointSlice/api-vm2"]
    kinds = registration.Kinds(api)
    endpoint_slice = kinds.read("EndpointSlice", "meshvm", "api-vm2")
    address = endpoint_slice["endpoints"][0]["addresses"][0]
    port = endpoint_slice["ports"][0]["port"]
    assert address == joined.host("vm2").address
    # A request to the EndpointSlice's address reaches the VM's application.
    reply = subprocess.run(
        ["curl", "-sf", "--max-time", "5", f"http://{address}:{port}/"], capture_output=True, text=True, check=False
    )
    assert reply.returncode == 0, reply.stderr
    assert kinds.read("Service", "meshvm", "api")["spec"]["ports"][0]["port"] == port


def test_join_again_changes_nothing(joined: LabState) -> None:
    done = _meshvm(joined, "join", "vm1", "vm2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ vm")]
    assert rows, done.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[3] == "0", f"a second join changed something: {row}"
    assert "created" not in done.stdout
    assert "updated" not in done.stdout


def test_status_reports_every_host(joined: LabState) -> None:
    done = _meshvm(joined, "status", "--json")
    data = json.loads(done.stdout)
    rows = {row["host"]: row for row in data["hosts"]}
    assert rows["vm1"]["healthy"] is True
    assert rows["vm2"]["healthy"] is True
    assert rows["vm3"]["healthy"] is False, "vm3 has not joined yet"
    assert done.returncode == 1


def test_bad_input_gets_one_clear_line(joined: LabState, tmp_path: Path) -> None:
    assert joined.kube is not None
    missing = subprocess.run(
        [meshvm_exe(), "join", "-i", str(tmp_path / "nope")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    unknown = _meshvm(joined, "join", "vm9")
    assert unknown.returncode == 2
    assert "unknown host vm9" in unknown.stderr
    no_secret = subprocess.run(
        [
            meshvm_exe(),
            "join",
            "-i",
            str(INVENTORY),
            "--kubeconfig",
            joined.kube.kubeconfig,
            "--context",
            "lab-admin",
            "--namespace",
            "default",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert no_secret.returncode == 2
    assert "no bootstrap material in namespace default" in no_secret.stderr


def test_unreachable_host_is_named_and_the_others_still_join(joined: LabState, tmp_path: Path) -> None:
    inventory = yaml.safe_load((INVENTORY / "hosts.yml").read_text())
    inventory["all"]["children"]["meshvm"]["hosts"]["ghost"] = {"ansible_host": "198.51.100.99"}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    for sub in ("group_vars", "host_vars"):
        (tmp_path / sub).symlink_to(INVENTORY / sub)
    assert joined.kube is not None
    done = subprocess.run(
        [
            meshvm_exe(),
            "join",
            "vm3",
            "ghost",
            "-i",
            str(tmp_path),
            "--kubeconfig",
            joined.kube.kubeconfig,
            "--context",
            "lab-registrar",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=900,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    ghost = next(line for line in done.stdout.splitlines() if "ghost" in line)
    assert "preflight" in ghost
    vm3 = next(line for line in done.stdout.splitlines() if line.startswith("│ vm3"))
    assert "ok" in vm3


# --- resilience under steady load (vm1 -> api on vm2 and vm3) --------------------------------------------------


class FortioLoad:
    """fortio on vm1, through vm1's Envoy to the api service; counts every non-200."""

    def __init__(self, lab: LabState, seconds: int, qps: int = 100) -> None:
        self.lab, self.seconds, self.qps = lab, seconds, qps
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FortioLoad:
        import shlex

        command = [
            FORTIO,
            "load",
            "-qps",
            str(self.qps),
            "-c",
            "4",
            "-t",
            f"{self.seconds}s",
            "-json",
            "-",
            "-quiet",
            "http://127.0.0.1:9191/",
        ]
        self.proc = subprocess.Popen(
            [*self.lab.ssh_argv(self.lab.host("vm1")), shlex.join(command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        return self

    def result(self) -> dict[str, Any]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=self.seconds + 120)
        data = json.loads(out)
        codes = {int(k): v for k, v in data.get("RetCodes", {}).items()}
        total = data["DurationHistogram"]["Count"]
        return {"total": total, "ok": codes.get(200, 0), "codes": codes, "stderr": err[-500:]}

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None and exc[0] is not None:
            self.proc.kill()


@pytest.fixture(scope="module")
def mesh_under_load(joined: LabState) -> LabState:
    done = _meshvm(joined, "join", "vm1", "vm2", "vm3")
    assert done.returncode == 0, done.stdout + done.stderr
    fortio = Path.home() / ".cache" / "meshvm" / "bin"
    binary = sorted(fortio.glob("fortio-*[0-9]"))
    if not binary:
        from bench.dataplane import fortio as build_fortio

        binary = [build_fortio()]
    subprocess.run(["scp", "-F", joined.ssh_config, str(binary[-1]), "vm1:" + FORTIO], check=True)
    return joined


@pytest.mark.resilience
def test_consul_server_away_60s(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    assert lab.consul is not None
    with FortioLoad(lab, 75) as load:
        stop(lab.consul.pid)
        time.sleep(60)
        pid = consul_server.launch(Path(lab.consul.binary), Path(lab.state_dir))
        state = lab_api.load()
        assert state is not None
        assert state.consul is not None
        state.consul.pid = lab.consul.pid = pid
        state.save()
        back = time.monotonic()

        def resynced() -> bool:
            health = _ssh(lab, "vm1", "curl", "-s", "127.0.0.1:19200/health").stdout
            return bool(health) and json.loads(health)["consul_reachable"] is True

        wait_for("vm1's agent resyncs", resynced, timeout=30, interval=0.2)
        resync = time.monotonic() - back
        result = load.result()
    assert result["total"] > 5000
    assert result["ok"] == result["total"], result
    # Consul itself needs a few seconds after a restart before its CA signs; the agent adds at most ~1 s.
    assert resync < 12, f"{resync:.1f}s"


@pytest.mark.resilience
def test_agent_killed_is_restarted_without_failures(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    before = _ssh(lab, "vm2", "systemctl", "show", "-p", "MainPID", "--value", "meshvm-agent").stdout.strip()
    with FortioLoad(lab, 20) as load:
        _ssh(lab, "vm2", "kill", "-9", before)
        wait_for(
            "agent back",
            lambda: (
                _ssh(lab, "vm2", "systemctl", "is-active", "meshvm-agent").stdout.strip() == "active"
                and _ssh(lab, "vm2", "systemctl", "show", "-p", "MainPID", "--value", "meshvm-agent").stdout.strip()
                not in {before, "0"}
            ),
            timeout=30,
        )
        result = load.result()
    assert result["ok"] == result["total"], result


@pytest.mark.resilience
def test_envoy_restart_drains(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    with FortioLoad(lab, 30) as load:
        time.sleep(3)
        restarted = _ssh(lab, "vm2", "systemctl", "restart", "envoy", timeout=120)
        assert restarted.returncode == 0, restarted.stderr
        result = load.result()
    failed = result["total"] - result["ok"]
    assert failed <= result["total"] * 0.001, result


@pytest.mark.resilience
def test_vm_reboot_comes_back_in_the_mesh(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    _ssh(lab, "vm3", "systemctl", "reboot", timeout=30)
    time.sleep(3)

    def back() -> bool:
        return all(
            _ssh(lab, "vm3", "systemctl", "is-active", unit, timeout=15).stdout.strip() == "active"
            for unit in ("consul", "meshvm-agent", "envoy")
        )

    wait_for("vm3's units after reboot", back, timeout=120, interval=2)
    wait_for(
        "vm3 passing in Consul",
        lambda: all(c["Status"] == "passing" for c in management(lab).health.node("vm3")[1]),
        timeout=60,
        interval=1,
    )
    _, services = management(lab).catalog.node("vm3")
    assert {"api", "api-sidecar-proxy"} <= set(services["Services"])


@pytest.mark.resilience
def test_leaf_rotation_zero_failures(mesh_under_load: LabState) -> None:
    from meshvm import pki

    lab = mesh_under_load
    consul = management(lab)
    serial_before = _ssh(lab, "vm2", "curl", "-s", "127.0.0.1:19000/certs").stdout
    config = consul.connect.ca.configuration()
    with FortioLoad(lab, 60) as load:
        body = {"Provider": "consul", "Config": {**config["Config"], "PrivateKey": pki.new_ca("rotate").key_pem}}
        consul.http.put(
            lambda r: r.code, "/v1/connect/ca/configuration", data=json.dumps(body), headers=consul.prepare_headers()
        )
        wait_for(
            "vm2 serves a new leaf",
            lambda: _ssh(lab, "vm2", "curl", "-s", "127.0.0.1:19000/certs").stdout != serial_before,
            timeout=50,
            interval=1,
        )
        result = load.result()
    assert result["ok"] == result["total"], result


@pytest.mark.resilience
def test_crashed_upstream_is_ejected_and_retries_keep_success(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    with FortioLoad(lab, 30, qps=200) as load:
        time.sleep(3)
        _ssh(lab, "vm3", "systemctl", "kill", "-s", "KILL", "demo-app-api")
        result = load.result()
    _ssh(lab, "vm3", "systemctl", "start", "demo-app-api")
    assert result["ok"] / result["total"] >= 0.999, result


# --- security --------------------------------------------------------------------------------------------------


def test_units_are_sandboxed(mesh_under_load: LabState) -> None:
    exposure = {}
    for unit in ("envoy", "meshvm-agent", "consul"):
        out = _ssh(mesh_under_load, "vm2", "systemd-analyze", "security", unit, "--no-pager").stdout
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, out[-500:]
        exposure[unit] = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure["envoy"] <= 3.0, exposure
    assert exposure["meshvm-agent"] <= 3.0, exposure


def test_no_secret_leaks(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    assert lab.consul is not None
    secrets = [lab.consul.gossip_key, lab.consul.vm_token]
    key_pem = json.loads(_ssh(lab, "vm2", "cat", "/var/lib/meshvm/envoy/sds/leaf.api.json").stdout)["resources"][0][
        "tls_certificate"
    ]["private_key"]["inline_string"]
    secrets.append(key_pem.splitlines()[1])
    for host in ("vm1", "vm2"):
        argv = _ssh(lab, host, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        journal = _ssh(lab, host, "journalctl", "--no-pager", "-o", "cat").stdout
        for secret in secrets:
            assert secret not in argv, f"a secret is on a command line on {host}"
            assert secret not in journal, f"a secret is in the journal on {host}"
    done = _playbook("enroll.yml")
    for secret in secrets:
        assert secret not in done.stdout, "a secret is in Ansible's output"


def test_world_readable_files_hold_no_secret(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    assert lab.consul is not None
    for host in ("vm1", "vm2"):
        for secret in (lab.consul.gossip_key, lab.consul.vm_token):
            found = _ssh(
                lab,
                host,
                "sh",
                "-c",
                f"grep -rlF -- {secret!r} /etc /var/lib /opt 2>/dev/null | xargs -r stat -c '%a %n'",
                timeout=120,
            ).stdout.split("\n")
            for line in filter(None, found):
                mode, path = line.split(" ", 1)
                assert int(mode[-1]) & 4 == 0, f"{path} on {host} holds a secret and is world-readable ({mode})"


def test_envoy_admin_unreachable_from_another_vm(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    done = _ssh(lab, "vm1", "curl", "-s", "--max-time", "3", f"http://{lab.host('vm2').address}:19000/ready")
    assert done.returncode != 0
    assert "LIVE" not in done.stdout


def test_inbound_refuses_a_client_without_mesh_certificate(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    address = lab.host("vm2").address
    plain = _ssh(lab, "vm1", "curl", "-s", "--max-time", "3", f"http://{address}:21000/")
    assert plain.stdout == ""
    tls = _ssh(lab, "vm1", "curl", "-sk", "--max-time", "3", f"https://{address}:21000/")
    assert tls.returncode != 0, "TLS without a client certificate must be refused"


def test_graph_draws_who_calls_whom(mesh_under_load: LabState, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    calls = _ssh(
        mesh_under_load, "vm1", "sh", "-c", "for i in $(seq 50); do curl -sf -o /dev/null 127.0.0.1:9191/; done"
    )
    assert calls.returncode == 0, calls.stderr
    as_json = subprocess.run(
        [meshvm_exe(), "graph", "-i", str(INVENTORY), "--json"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    edges = {(e["source"], e["destination"]): e for e in data["edges"]}
    assert set(edges) == {("web", "api")}, edges
    assert edges["web", "api"]["requests"] >= 50, edges
    assert sorted(data["services"]["api"]) == ["vm2", "vm3"]
    picture = tmp_path / "mesh.svg"
    drawn = subprocess.run(
        [meshvm_exe(), "graph", "-i", str(INVENTORY), "-o", str(picture)], capture_output=True, text=True, check=False
    )
    assert drawn.returncode == 0, drawn.stderr
    lines = ET.parse(picture).getroot().findall("{http://www.w3.org/2000/svg}line")  # noqa: S314 - our own output
    assert [(e.get("data-source"), e.get("data-destination")) for e in lines] == [("web", "api")]


def test_leave_removes_everything_and_is_idempotent(mesh_under_load: LabState) -> None:
    lab = mesh_under_load
    done = _meshvm(lab, "leave", "vm3")
    assert done.returncode == 0, done.stdout + done.stderr
    _, services = management(lab).catalog.node("vm3")
    assert not (services or {}).get("Services"), "vm3 still has Consul registrations"
    for unit in ("meshvm-agent", "envoy"):
        assert _ssh(lab, "vm3", "systemctl", "is-active", unit).stdout.strip() != "active"
    assert lab.kube is not None
    api = api_client(Path(lab.kube.kubeconfig), context="lab-registrar")
    assert "vm3" not in registration.hosts_with_objects(api, "meshvm")
    reply = _ssh(lab, "vm1", "curl", "-sf", "http://127.0.0.1:9191/")
    assert reply.returncode == 0, "api stays served by vm2 after vm3 left"
    again = _meshvm(lab, "leave", "vm3")
    assert again.returncode == 0, again.stdout + again.stderr
