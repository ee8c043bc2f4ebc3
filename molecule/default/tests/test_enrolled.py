"""After site.yml: every VM runs a hardened Consul agent, meshvm agent and Envoy, and web on vm1 reaches api on
vm2 over mutual TLS through the mesh (and only through it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import VMS, wait_for

UNITS = ("consul.service", "meshvm-agent.service", "envoy.service")
DEMO = {"vm1": "web", "vm2": "api", "vm3": "api"}
ADDRESS = {"vm1": "198.51.100.11", "vm2": "198.51.100.12", "vm3": "198.51.100.13"}
ADMIN_PORT = 19000
MESH_PORT = 21000
APP_PORT = 8080
UPSTREAM_PORT = 9191
# systemd-analyze security: 0 is locked down, 10 is unprotected; "OK" ends at 4.9.
MAX_EXPOSURE = 2.0
# Consul checks per VM: serfHealth, the application's, and its sidecar's listener and alias checks.
MIN_CHECKS = 4


@pytest.mark.units(*UNITS)
@pytest.mark.parametrize("name", VMS)
def test_units_are_active_and_enabled(vm: Any, name: str) -> None:
    host = vm(name)
    for unit in (*UNITS, f"demo-app-{DEMO[name]}.service"):
        service = host.service(unit)
        assert service.is_running, f"{unit} is not running on {name}"
        assert service.is_enabled, f"{unit} is not enabled on {name}"


@pytest.mark.units("envoy.service")
@pytest.mark.parametrize("name", VMS)
def test_envoy_admin_listens_on_loopback_only(vm: Any, name: str) -> None:
    host = vm(name)
    listeners = host.run(f"ss -H -l -n -t sport = :{ADMIN_PORT}").stdout.split("\n")
    addresses = {line.split()[3] for line in listeners if line.strip()}
    assert addresses == {f"127.0.0.1:{ADMIN_PORT}"}, f"Envoy admin on {name} listens on {addresses}"
    reached = host.run(f"curl -s -m 2 -o /dev/null -w '%{{http_code}}' http://{ADDRESS[name]}:{ADMIN_PORT}/ready")
    assert reached.stdout in {"000", ""}, f"Envoy admin answered on {ADDRESS[name]}: {reached.stdout}"
    assert host.run(f"curl -s -m 2 http://127.0.0.1:{ADMIN_PORT}/ready").stdout.strip() == "LIVE"


SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "RestrictSUIDSGID": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
}
USERS = {"consul.service": "consul", "meshvm-agent.service": "meshvm", "envoy.service": "envoy"}


@pytest.mark.units(*UNITS)
@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("name", VMS)
def test_units_run_sandboxed_as_their_own_user(vm: Any, name: str, unit: str) -> None:
    host = vm(name)
    shown = host.run(f"systemctl show {unit} -p User -p {' -p '.join(SANDBOX)}").stdout
    properties = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert properties["User"] == USERS[unit]
    for key, expected in SANDBOX.items():
        assert properties[key] == expected, f"{unit} on {name}: {key}={properties[key]!r}, want {expected!r}"
    pid = host.run(f"systemctl show {unit} -p MainPID --value").stdout.strip()
    assert pid not in {"", "0"}
    assert host.run(f"ps -o user= -p {pid}").stdout.strip() == USERS[unit]
    shell = host.user(USERS[unit]).shell
    assert shell == "/usr/sbin/nologin"
    summary = host.run(f"systemd-analyze security --no-pager {unit}").stdout.strip().splitlines()[-1]
    exposure = float(summary.split("exposure level for")[1].split(":")[1].split()[0])
    assert exposure <= MAX_EXPOSURE, f"{unit} on {name}: {summary}"


SECRETS = {
    "/etc/consul.d/secrets.json": ("root", "consul", 0o640),
    "/etc/meshvm/consul-token": ("root", "meshvm", 0o640),
    "/etc/meshvm/agent.yaml": ("root", "meshvm", 0o640),
}


@pytest.mark.parametrize("name", VMS)
def test_secrets_are_private_and_stay_out_of_configs_and_command_lines(vm: Any, lab: dict[str, Any], name: str) -> None:
    host = vm(name)
    for path, (owner, group, mode) in SECRETS.items():
        secret = host.file(path)
        assert (secret.user, secret.group, secret.mode) == (owner, group, mode), path
    for key in host.run("find /var/lib/meshvm/envoy/sds -name '*.json'").stdout.split():
        private = host.file(key)
        assert (private.user, private.group, private.mode) == ("meshvm", "meshvm", 0o640), key
    # The host's own two Consul tokens (made for it at enrolment), the gossip key, and the issuer token that made
    # them, which must not be on the host at all.
    agent = json.loads(host.file("/etc/consul.d/secrets.json").content_string)["acl"]["tokens"]["agent"]
    meshvm = host.file("/etc/meshvm/consul-token").content_string.strip()
    assert len({agent, meshvm, lab["consul"]["issuer_token"]}) == 3, "each agent has a token of its own"
    tokens = (agent, meshvm, lab["consul"]["gossip_key"], lab["consul"]["issuer_token"])
    for path in ("/etc/consul.d/consul.json", "/etc/meshvm/agent.yaml", "/etc/meshvm/envoy.json"):
        content = host.file(path).content_string
        assert not any(token in content for token in tokens), f"a secret is in {path}"
    command_lines = host.run("ps -eo args=").stdout
    assert not any(token in command_lines for token in tokens), f"a secret is on a command line on {name}"


@pytest.mark.units("consul.service", "meshvm-agent.service")
def test_consul_has_every_vm_with_passing_checks(consul: Any) -> None:
    members = {m["Name"]: m["Status"] for m in consul("/v1/agent/members")}
    for name in VMS:
        assert members.get(name) == 1, f"{name} is not an alive Consul member: {members.get(name)}"

    def failing() -> dict[str, list[str]]:
        found = {}
        for name in VMS:
            checks = consul(f"/v1/health/node/{name}")
            bad = [f"{c['ServiceID'] or 'node'}/{c['Name']}={c['Status']}" for c in checks if c["Status"] != "passing"]
            # serfHealth, then the app and its sidecar (listener + alias) for the one service of each VM
            if bad or len(checks) < MIN_CHECKS:
                found[name] = bad or [f"only {len(checks)} checks"]
        return found

    wait_for("every check of every VM passes", lambda: not failing(), timeout=120, describe=failing)
    api = {e["Node"]["Node"] for e in consul("/v1/health/connect/api?passing=1")}
    assert api == {"vm2", "vm3"}
    web = {e["Node"]["Node"] for e in consul("/v1/health/connect/web?passing=1")}
    assert web == {"vm1"}


@pytest.mark.units("envoy.service", "meshvm-agent.service", "demo-app-api.service", "demo-app-web.service")
def test_web_on_vm1_reaches_api_on_vm2_over_mtls(vm: Any) -> None:
    vm1, vm2 = vm("vm1"), vm("vm2")

    def answer_from_vm2() -> dict[str, Any] | None:
        reply = vm1.run(f"curl -s -m 5 http://127.0.0.1:{UPSTREAM_PORT}/hello")
        if reply.rc != 0:
            return None
        body: dict[str, Any] = json.loads(reply.stdout)
        return body if body["hostname"] == "vm2" else None

    body = wait_for("a request from vm1 through its Envoy answered by vm2", answer_from_vm2, timeout=30, interval=0.2)
    caller = body.pop("caller")
    assert body == {"hostname": "vm2", "service": "api", "path": "/hello"}
    # vm2's Envoy verified web's certificate and told the app who called.
    assert caller.endswith("/svc/web"), caller
    # Envoy pools its upstream connections, so count TLS handshakes at all, on both ends, not per request.
    assert _counter(vm1, "cluster.out.web.api.ssl.handshake") > 0, "vm1's connections to api are not TLS"
    assert _counter(vm2, f"listener.0.0.0.0_{MESH_PORT}.ssl.handshake") > 0, "vm2's mesh port saw no TLS handshake"
    assert _counter(vm2, "http.inbound_api.rbac.allowed") > 0
    # The mesh port speaks TLS with client certificates only: plain HTTP and TLS without a certificate fail.
    plain = vm1.run(f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://{ADDRESS['vm2']}:{MESH_PORT}/")
    assert plain.stdout in {"000", ""}, f"vm2's mesh port answered plain HTTP: {plain.stdout}"
    anonymous = vm1.run(f"curl -s -k -m 3 -o /dev/null -w '%{{http_code}}' https://{ADDRESS['vm2']}:{MESH_PORT}/")
    assert anonymous.stdout in {"000", ""}, f"vm2's mesh port answered TLS without a client cert: {anonymous.stdout}"
    # The application itself is not reachable from another VM: only Envoy, on vm2's loopback, talks to it.
    direct = vm1.run(f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://{ADDRESS['vm2']}:{APP_PORT}/")
    assert direct.stdout in {"000", ""}, f"the api app on vm2 answered vm1 directly: {direct.stdout}"


@pytest.mark.units("envoy.service", "meshvm-agent.service")
def test_policy_allows_web_to_api_and_denies_everything_else(vm: Any) -> None:
    """Call api on vm2 straight at its mesh port with a real workload certificate from Consul's CA: web's (from
    vm1) is allowed by policy.yml, api's own (from vm3) is refused, since the mesh denies by default."""
    as_web = _call_with_identity(vm("vm1"), "web", f"https://{ADDRESS['vm2']}:{MESH_PORT}/whoami")
    assert as_web.split("\n")[-1] == "200", as_web
    assert json.loads(as_web.split("\n")[0])["hostname"] == "vm2"
    as_api = _call_with_identity(vm("vm3"), "api", f"https://{ADDRESS['vm2']}:{MESH_PORT}/whoami")
    assert as_api.split("\n")[-1] == "403", as_api
    assert _counter(vm("vm2"), "http.inbound_api.rbac.denied") > 0


def _call_with_identity(host: Any, service: str, url: str) -> str:
    """curl url on host with the certificate and key of service (Envoy's SDS file); prints body, then status."""
    script = f"""
set -e
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
python3 - "$d" <<'PY'
import json, sys
secret = json.load(open("/var/lib/meshvm/envoy/sds/leaf.{service}.json"))["resources"][0]["tls_certificate"]
open(sys.argv[1] + "/cert.pem", "w").write(secret["certificate_chain"]["inline_string"])
open(sys.argv[1] + "/key.pem", "w").write(secret["private_key"]["inline_string"])
PY
curl -s -k -m 5 --cert "$d/cert.pem" --key "$d/key.pem" -w '\n%{{http_code}}' {url}
"""
    return str(host.run(script).stdout.strip())


def _counter(host: Any, name: str) -> int:
    out = host.run(f"curl -s -m 2 'http://127.0.0.1:{ADMIN_PORT}/stats?filter=^{name}$'").stdout
    values = [int(line.partition(":")[2]) for line in out.splitlines() if line.startswith(f"{name}:")]
    return sum(values)
