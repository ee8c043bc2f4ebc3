"""mTLS and authorization with real Consul, real Envoy and real requests.

Inbound listeners refuse plaintext and certificates from another CA; authorization follows the policy (403 for HTTP,
a closed connection for TCP); a CA rotation re-issues every leaf and traffic keeps flowing with zero failures.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshvm import pki
from meshvm.lab.state import LabState
from tests.support.mesh import MeshNode, management, wait_for
from tests.support.traffic import HttpServer, Load, TcpEchoServer, http_get, tcp_echo

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def topo(node_factory: Callable[[str], MeshNode], mesh_tag: str, policy: Callable[[dict[str, Any]], None]) -> Any:
    names = {k: f"{mesh_tag}-{k}" for k in ("web", "api", "db", "batch")}
    policy(
        {
            "authorization": {
                "default_action": "deny",
                "rules": [
                    {"source": names["web"], "destination": names["api"], "action": "allow"},
                    {"source": names["web"], "destination": names["db"], "action": "allow"},
                ],
            }
        }
    )
    app = HttpServer("api-app").start()
    echo = TcpEchoServer().start()
    server = node_factory("server")
    server.add_service(names["api"], app.port, check={"type": "http", "path": "/health"})
    server.add_service(names["db"], echo.port, protocol="tcp")
    client = node_factory("client")
    client.add_service(
        names["web"],
        1,
        check={"type": "none"},
        upstreams=[{"service": names["api"], "protocol": "http"}, {"service": names["db"], "protocol": "tcp"}],
    )
    outsider = node_factory("outsider")
    outsider.add_service(
        names["batch"],
        1,
        check={"type": "none"},
        upstreams=[{"service": names["api"], "protocol": "http"}, {"service": names["db"], "protocol": "tcp"}],
    )
    for node in (server, client, outsider):
        node.start()
    for node, svc in ((client, names["web"]), (outsider, names["batch"])):
        for upstream in (names["api"], names["db"]):
            wait_for("endpoints", lambda n=node, s=svc, u=upstream: n.endpoints(f"out.{s}.{u}"))
    yield {"names": names, "server": server, "client": client, "outsider": outsider, "app": app}
    app.stop()
    echo.stop()


def test_allowed_caller_gets_200_with_its_identity(topo: Any) -> None:
    names, client = topo["names"], topo["client"]
    status, headers, body = http_get(client.upstream_url(names["web"], names["api"]))
    assert status == 200
    assert headers["x-served-by"] == "api-app"
    xfcc = json.loads(body)["headers"]["x-forwarded-client-cert"]
    assert f"/svc/{names['web']}" in xfcc, "the server side must see the caller's SPIFFE ID"


def test_denied_caller_gets_403_over_http(topo: Any) -> None:
    names, outsider = topo["names"], topo["outsider"]
    status, _, body = http_get(outsider.upstream_url(names["batch"], names["api"]))
    assert status == 403
    assert b"RBAC" in body
    assert topo["server"].stat(f"http.inbound_{names['api']}.rbac.denied") >= 1


def test_tcp_allow_echoes_and_deny_closes_the_connection(topo: Any) -> None:
    names = topo["names"]
    allowed = topo["client"].upstream_port(names["web"], names["db"])
    assert tcp_echo("127.0.0.1", allowed, b"ping over mtls") == b"ping over mtls"
    denied = topo["outsider"].upstream_port(names["batch"], names["db"])
    try:
        echoed = tcp_echo("127.0.0.1", denied, b"ping", timeout=3)
    except OSError:
        echoed = b""
    assert echoed == b"", "the network RBAC filter must close a denied TCP connection without echo"
    assert (
        topo["server"].stat(f"{names['db']}.rbac.denied".replace(names["db"], f"inbound_{names['db']}")) >= 1
        or topo["server"].stat(f"inbound_{names['db']}.rbac.denied") >= 1
    )


def test_policy_change_flips_authorization_without_restart(topo: Any, policy: Callable[[dict[str, Any]], None]) -> None:
    names, outsider, server = topo["names"], topo["outsider"], topo["server"]
    url = outsider.upstream_url(names["batch"], names["api"])
    envoy_pid = server.pids["envoy"]
    policy(
        {
            "authorization": {
                "default_action": "deny",
                "rules": [
                    {"source": names["web"], "destination": names["api"], "action": "allow"},
                    {"source": names["web"], "destination": names["db"], "action": "allow"},
                    {"source": names["batch"], "destination": names["api"], "action": "allow"},
                ],
            }
        }
    )
    took = wait_for("batch allowed", lambda: http_get(url)[0] == 200, timeout=10)
    assert took < 5
    policy(
        {
            "authorization": {
                "default_action": "deny",
                "rules": [
                    {"source": names["web"], "destination": names["api"], "action": "allow"},
                    {"source": names["web"], "destination": names["db"], "action": "allow"},
                ],
            }
        }
    )
    wait_for("batch denied again", lambda: http_get(url)[0] == 403, timeout=10)
    assert server.pids["envoy"] == envoy_pid


def _raw_inbound(node: MeshNode, service: str) -> tuple[str, int]:
    return node.address, node.mesh_port(service)


def test_inbound_refuses_plaintext(topo: Any) -> None:
    host, port = _raw_inbound(topo["server"], topo["names"]["api"])
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = sock.recv(1024)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert not answer.startswith(b"HTTP/"), "plaintext must never reach the application"


def _tls_client(cert: pki.KeyPair | None, tmp: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we test the server's refusal, not its certificate
    if cert is not None:
        (tmp / "c.pem").write_text(cert.cert_pem)
        (tmp / "k.pem").write_text(cert.key_pem)
        context.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return context


def _https_status(context: ssl.SSLContext, host: str, port: int) -> str:
    try:
        with (
            socket.create_connection((host, port), timeout=3) as raw,
            context.wrap_socket(raw, server_hostname="api") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
            return tls.recv(64).decode(errors="replace")
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
        return f"refused: {type(exc).__name__}"


def test_inbound_refuses_missing_and_foreign_certificates(topo: Any, lab: LabState, tmp_path: Path) -> None:
    names = topo["names"]
    host, port = _raw_inbound(topo["server"], names["api"])
    assert _https_status(_tls_client(None, tmp_path), host, port).startswith("refused")
    trust_domain = management(lab).connect.ca.roots()["TrustDomain"]
    foreign_ca = pki.new_ca("not the mesh CA", uris=(f"spiffe://{trust_domain}",))
    impostor = pki.issue(foreign_ca, "web", uris=(pki.spiffe_id(trust_domain, names["web"], "lab"),))
    assert _https_status(_tls_client(impostor, tmp_path), host, port).startswith("refused"), (
        "a certificate with the right SPIFFE ID from another CA must be refused"
    )


def _inbound_serial(node: MeshNode) -> str:
    certs = json.loads(node.admin("/certs"))["certificates"]
    serials = [c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])]
    return ",".join(sorted(serials))


def test_ca_rotation_reissues_leaves_with_zero_failed_requests(topo: Any, lab: LabState) -> None:
    names, client, server = topo["names"], topo["client"], topo["server"]
    url = client.upstream_url(names["web"], names["api"])
    consul = management(lab)
    before_roots = {r["ID"] for r in consul.connect.ca.roots()["Roots"]}
    server_before, client_before = _inbound_serial(server), _inbound_serial(client)
    new_root_key = pki.new_ca("rotation").key_pem
    config = consul.connect.ca.configuration()
    with Load(url, rate_per_s=100, concurrency=4) as load:
        time.sleep(1)
        body = {"Provider": "consul", "Config": {**config["Config"], "PrivateKey": new_root_key}}
        consul.http.put(
            lambda r: r.code, "/v1/connect/ca/configuration", data=json.dumps(body), headers=consul.prepare_headers()
        )
        wait_for("server leaf re-issued", lambda: _inbound_serial(server) != server_before, timeout=30)
        wait_for("client leaf re-issued", lambda: _inbound_serial(client) != client_before, timeout=30)
        time.sleep(2)  # new connections now use the new certificates
    roots = consul.connect.ca.roots()["Roots"]
    assert {r["ID"] for r in roots} - before_roots, "Consul must have a new active root"
    summary = load.summary()
    assert summary.total > 300
    assert summary.failed == 0, f"failed requests during rotation: {summary.by_status}"
    assert http_get(url)[0] == 200
