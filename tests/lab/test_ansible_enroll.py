"""playbooks/enroll.yml against the lab when the input is wrong or a host is away.

Each case runs the real ansible-playbook on a freshly reset VM (vm3) and checks what the operator sees and what
the host is left with: a missing or mistyped variable is named by the argument specs, a configuration meshvm's
model refuses is reported with meshvm's own message, a checksum mismatch stops the run before anything is
installed (with the expected and the actual sha256), --check changes nothing, and an unreachable host is
reported while the others are enrolled; the collection built from this tree and installed elsewhere enrols
by its collection name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshvm.config import ConsulSpec
from meshvm.consul import tokens
from meshvm.consul.client import ConsulClient
from meshvm.lab.state import LabState

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HOST = "vm3"
NOTHING_INSTALLED = ("/usr/local/bin/consul", "/etc/consul.d", "/opt/meshvm", "/etc/meshvm", "/usr/local/bin/envoy")


def _meshvm() -> str:
    return shutil.which("meshvm") or str(REPO / ".venv" / "bin" / "meshvm")


def _playbook(inventory: Path, playbook: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    """Run a playbook of this repository; stdout gets stderr too (ansible-core 2.19 prints errors there)."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env["ANSIBLE_FORCE_COLOR"] = "0"
    binary = shutil.which("ansible-playbook") or str(REPO / ".venv" / "bin" / "ansible-playbook")
    return subprocess.run(
        [binary, "-i", str(inventory), str(REPO / "playbooks" / playbook), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def _on_vm(lab: LabState, *command: str) -> subprocess.CompletedProcess[str]:
    host = lab.host(HOST)
    return subprocess.run([*lab.ssh_argv(host), *command], capture_output=True, text=True, timeout=60, check=False)


def _installed(lab: LabState) -> list[str]:
    return [path for path in NOTHING_INSTALLED if _on_vm(lab, "test", "-e", path).returncode == 0]


def _forget_node(lab: LabState) -> None:
    assert lab.consul is not None
    subprocess.run(
        [lab.consul.binary, "force-leave", "-prune", f"-http-addr={lab.consul.local_http_addr}", HOST],
        env={**os.environ, "CONSUL_HTTP_TOKEN": lab.consul.management_token},
        capture_output=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def fresh(lab: LabState) -> Iterator[LabState]:
    """vm3 with a fresh disk; reset again (and forgotten by Consul) when the module is done."""
    subprocess.run([_meshvm(), "lab", "reset", HOST], check=True, capture_output=True, timeout=180)
    yield lab
    subprocess.run([_meshvm(), "lab", "reset", HOST], check=True, capture_output=True, timeout=180)
    _forget_node(lab)


@pytest.fixture
def inventory(fresh: LabState, tmp_path: Path) -> Path:
    """A copy of inventories/lab (hosts, Consul secrets, demo services) that a test may change."""
    source = Path(fresh.inventory).parent
    target = tmp_path / "inventory"
    shutil.copytree(source, target)
    # The lab inventory finds policies/ next to inventories/; the copy lives elsewhere, so name the file outright.
    group_vars = target / "group_vars" / "meshvm.yml"
    settings = yaml.safe_load(group_vars.read_text())
    settings["meshvm_policy_file"] = str(REPO / "policies" / "lab.yml")
    group_vars.write_text(yaml.safe_dump(settings))
    return target


def test_a_missing_variable_is_named_before_anything_is_installed(fresh: LabState, inventory: Path) -> None:
    host_vars = inventory / "host_vars" / f"{HOST}.yml"
    data = yaml.safe_load(host_vars.read_text())
    del data["meshvm_agent_services"]
    host_vars.write_text(yaml.safe_dump(data))
    done = _playbook(inventory, "enroll.yml", "--limit", HOST)
    assert done.returncode != 0
    assert "missing required arguments: meshvm_agent_services" in done.stdout, done.stdout[-3000:]
    assert _installed(fresh) == []


def test_a_mistyped_variable_is_named(fresh: LabState, inventory: Path) -> None:
    services = [{"name": "api", "port": 8080, "mesh_prot": 21000}]
    done = _playbook(inventory, "enroll.yml", "--limit", HOST, "-e", json.dumps({"meshvm_agent_services": services}))
    assert done.returncode != 0
    # ansible-core names the unknown key and lists the ones it supports.
    assert "meshvm_agent_services.mesh_prot. Supported parameters include: address, check, mesh_port" in done.stdout, (
        done.stdout[-3000:]
    )
    wrong_type = _playbook(inventory, "enroll.yml", "--limit", HOST, "-e", "consul_agent_http_port=eighty")
    assert wrong_type.returncode != 0
    assert "consul_agent_http_port" in wrong_type.stdout, wrong_type.stdout[-3000:]
    assert _installed(fresh) == []


def test_a_configuration_meshvm_refuses_gets_meshvm_s_message(fresh: LabState, inventory: Path) -> None:
    services = [{"name": "api", "port": 8080, "mesh_port": 19000}]
    done = _playbook(inventory, "enroll.yml", "--limit", HOST, "-e", json.dumps({"meshvm_agent_services": services}))
    assert done.returncode != 0
    assert "port 19000 is used twice: envoy.admin_port and services[api].mesh_port" in done.stdout, done.stdout[-3000:]
    assert _installed(fresh) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"consul_agent_sha256": "0" * 64}, "checksum mismatch for http://deb.debian.org/"),
        ({"envoy_binary_sha256": "0" * 64}, "checksum mismatch for Envoy 1.40.0"),
    ],
    ids=["consul", "envoy"],
)
def test_a_checksum_mismatch_stops_before_anything_is_installed(
    fresh: LabState, inventory: Path, override: dict[str, str], message: str
) -> None:
    done = _playbook(inventory, "enroll.yml", "--limit", HOST, "-e", json.dumps(override))
    assert done.returncode != 0
    output = " ".join(done.stdout.split())
    assert message in output, done.stdout[-3000:]
    assert f"expected sha256 {'0' * 64}, got " in output, done.stdout[-3000:]
    assert _installed(fresh) == []


def test_check_mode_on_a_fresh_host_changes_nothing(fresh: LabState, inventory: Path) -> None:
    done = _playbook(inventory, "site.yml", "--limit", HOST, "--check", "--diff")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "failed=0" in done.stdout
    assert _installed(fresh) == []
    users = _on_vm(fresh, "getent", "passwd", "consul", "meshvm", "envoy")
    assert users.stdout == "", f"check mode created users: {users.stdout}"


def test_an_unreachable_host_is_reported_and_the_others_enrol(fresh: LabState, inventory: Path) -> None:
    # A host in the lab's subnet with no VM behind it: the lab routes that subnet to `unreachable`.
    (inventory / "away.yml").write_text(
        yaml.safe_dump({"all": {"children": {"meshvm": {"hosts": {"vm-away": {"ansible_host": "198.51.100.99"}}}}}})
    )
    done = _playbook(inventory, "enroll.yml", "--limit", f"{HOST},vm-away", "-e", "ansible_ssh_timeout=5")
    recap = done.stdout[done.stdout.rindex("PLAY RECAP") :]
    assert done.returncode == 4, recap  # 4: a host was unreachable
    away = next(line for line in recap.splitlines() if line.startswith("vm-away"))
    assert "unreachable=1" in away
    enrolled = next(line for line in recap.splitlines() if line.startswith(HOST))
    assert "failed=0" in enrolled, recap
    assert "unreachable=0" in enrolled, recap
    for unit in ("consul", "meshvm-agent", "envoy"):
        assert _on_vm(fresh, "systemctl", "is-active", unit).stdout.strip() == "active", unit


# Run on the VM: the status of one request to its Consul agent with the token in a file (never on a command line).
ASK_CONSUL = """
import json, sys, urllib.error, urllib.request
token_file, key, method, path, body = sys.argv[1:6]
token = open(token_file).read().strip()
if key:
    token = json.loads(token)["acl"]["tokens"][key]
request = urllib.request.Request("http://127.0.0.1:8500" + path, method=method, data=body.encode() or None,
                                 headers={"X-Consul-Token": token})
try:
    with urllib.request.urlopen(request, timeout=5) as answer:
        print(answer.status, answer.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def _ask(lab: LabState, token: tuple[str, str], method: str, path: str, body: object = "") -> tuple[int, str]:
    data = json.dumps(body) if body != "" else ""
    # ssh hands the remote shell one command line: each argument quoted for it.
    done = _on_vm(lab, *(shlex.quote(a) for a in ("python3", "-c", ASK_CONSUL, *token, method, path, data)))
    status, _, text = done.stdout.partition(" ")
    assert status.isdigit(), done.stdout + done.stderr
    return int(status), text


def test_each_agent_has_its_own_token_which_cannot_register_another_service_or_write_the_policy(
    fresh: LabState,
) -> None:
    """After the enrolment above: vm3's Consul agent and meshvm agent hold tokens of their own, made for vm3."""
    meshvm = ("/etc/meshvm/consul-token", "")
    agent = ("/etc/consul.d/secrets.json", "agent")
    status, me = _ask(fresh, meshvm, "GET", "/v1/acl/token/self")
    assert status == 200, me
    me_token = json.loads(me)
    assert me_token["Description"] == f"meshvm: meshvm agent of {HOST}"
    assert [s["ServiceName"] for s in me_token["ServiceIdentities"]] == ["api"]
    status, node = _ask(fresh, agent, "GET", "/v1/acl/token/self")
    assert status == 200, node
    node_token = json.loads(node)
    assert [n["NodeName"] for n in node_token["NodeIdentities"]] == [HOST]
    assert node_token["AccessorID"] != me_token["AccessorID"]
    policy_key = "/v1/kv/meshvm/lab-vms/policy"
    assert _ask(fresh, meshvm, "GET", policy_key)[0] in (200, 404), "meshvm's agent reads the policy"
    assert _ask(fresh, meshvm, "PUT", policy_key, {"services": {}})[0] == 403
    assert _ask(fresh, meshvm, "PUT", "/v1/agent/service/register", {"Name": "intruder", "Port": 1})[0] == 403
    assert _ask(fresh, agent, "PUT", "/v1/agent/service/register", {"Name": "intruder", "Port": 1})[0] == 403
    assert _ask(fresh, agent, "PUT", policy_key, {"services": {}})[0] == 403
    # And with those tokens, the host's service and its sidecar are registered (no app runs here: its check fails,
    # the sidecar's listener check passes).
    status, checks = _ask(fresh, meshvm, "GET", "/v1/agent/checks")
    assert status == 200, checks
    found = {c["Name"]: (c["ServiceID"], c["Status"]) for c in json.loads(checks).values()}
    assert found["api sidecar listener"] == ("api-sidecar-proxy", "passing"), found
    assert found["api application"][0] == "api", found


def test_the_installed_collection_runs_enroll_by_its_collection_name(
    fresh: LabState, inventory: Path, tmp_path: Path
) -> None:
    """The roles and playbooks built and installed as the collection meshvm.mesh (as AWX would have them), away
    from this checkout: `meshvm.mesh.enroll` on the host just enrolled finds everything in place."""
    galaxy = shutil.which("ansible-galaxy") or str(REPO / ".venv" / "bin" / "ansible-galaxy")
    built = subprocess.run(
        [galaxy, "collection", "build", "--output-path", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tarball = next(tmp_path.glob("meshvm-mesh-*.tar.gz"))
    installed = tmp_path / "collections"
    done = subprocess.run(
        [galaxy, "collection", "install", "--force", "-p", str(installed), str(tarball)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(installed)}
    binary = shutil.which("ansible-playbook") or str(REPO / ".venv" / "bin" / "ansible-playbook")
    run = subprocess.run(
        [binary, "-i", str(inventory), "meshvm.mesh.enroll", "--limit", HOST],
        cwd=tmp_path,
        env={**env, "ANSIBLE_NOCOLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    found = subprocess.run(
        [galaxy, "collection", "list", "meshvm.mesh"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert str(installed) in found.stdout, "the run saw the installed copy"
    assert str(REPO / "collections") not in found.stdout, "and not this checkout"
    recap = run.stdout[run.stdout.rindex("PLAY RECAP") :]
    line = next(line for line in recap.splitlines() if line.startswith(HOST))
    assert "changed=0" in line, recap
    assert "failed=0" in line, recap


def test_leave_removes_the_host_s_own_tokens(fresh: LabState, inventory: Path) -> None:
    assert fresh.consul is not None
    management = ConsulClient(ConsulSpec(http_addr=fresh.consul.local_http_addr), fresh.consul.management_token)
    accessors = [tokens.accessor_id(fresh.consul.datacenter, HOST, kind) for kind in tokens.KINDS]
    assert all(management.acl_token(a) is not None for a in accessors), "enroll made them"
    done = _playbook(inventory, "leave.yml", "--limit", HOST)
    assert done.returncode == 0, done.stdout[-3000:]
    assert [management.acl_token(a) for a in accessors] == [None, None]
