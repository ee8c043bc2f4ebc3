"""The data-plane benchmark's own logic: the floor Envoys carry traffic over TLS with a client certificate (real
Envoy, on loopback), the report's ratios are per round, and /proc is read right."""

from __future__ import annotations

import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import dataplane
from meshvm.lab.procs import free_port, wait_until


@pytest.fixture
def app() -> Iterator[int]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _envoy(envoy_bin: Path, config: dict[str, Any], path: Path) -> subprocess.Popen[bytes]:
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        [str(envoy_bin), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _request_without_a_certificate(port: int, ca: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        if not tls.recv(1):
            raise ConnectionError("closed without an answer")


def test_the_floor_envoys_carry_http_over_tls_with_a_client_certificate(
    envoy_bin: Path, tmp_path: Path, app: int
) -> None:
    dataplane.floor_certificates(tmp_path, "127.0.0.1")
    listen, tls_port = free_port(), free_port()
    procs = []
    try:
        for side, config_listen, upstream, server_side in (
            ("server", ("127.0.0.1", tls_port), ("127.0.0.1", app), True),
            ("client", ("127.0.0.1", listen), ("127.0.0.1", tls_port), False),
        ):
            files = {"cert": f"{tmp_path}/{side}.pem", "key": f"{tmp_path}/{side}-key.pem", "ca": f"{tmp_path}/ca.pem"}
            config = dataplane.floor_config(
                listen=config_listen, upstream=upstream, files=files, server_side=server_side, admin_port=free_port()
            )
            procs.append(_envoy(envoy_bin, config, tmp_path / f"{side}.json"))
        url = f"http://127.0.0.1:{listen}/"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.read() == b"hello")
            except OSError:
                return False

        wait_until("a request through both floor Envoys", answers, timeout=30)
        # The server side requires a client certificate from the CA: TLS without one is refused.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _request_without_a_certificate(tls_port, tmp_path / "ca.pem")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def _round(p90: float, proxies: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"p50": p90 / 2, "p90": p90, "p99": p90 * 2, "qps": 1000.0, "ok": 10, "total": 10, "proxies": proxies or {}}


def test_ratios_are_taken_per_round_so_drift_cancels() -> None:
    proxy = {"a": {"cpu_s_per_1000": 0.2, "anon_mb": 12.0, "rss_mb": 60.0, "workers": 2}}
    # The machine gets twice as slow in round 2; in every round meshvm adds 2 ms, Istio 4 ms, the floor 1 ms.
    rounds = {
        "direct": [_round(1.0), _round(2.0)],
        "floor": [_round(2.0, proxy), _round(4.0, proxy)],
        "meshvm": [_round(3.0, proxy), _round(6.0, proxy)],
        "istio": [_round(5.0, proxy), _round(10.0, proxy)],
    }
    report = dataplane.summarize(rounds)
    istio, floor = report["ratios"]["meshvm_vs_istio_added_p90"], report["ratios"]["meshvm_vs_floor_added_p90"]
    assert istio == {"median": 0.5, "min": 0.5, "max": 0.5}
    assert floor == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert report["paths"]["meshvm"]["added"]["p90"] == pytest.approx(3.0)  # median of 2 and 4
    assert report["paths"]["meshvm"]["proxies"]["a"]["own_memory_mb"] == 12.0
    text = dataplane.table(report)
    assert "meshvm_vs_istio_added_p90: 0.50" in text
    assert "met" in next(line for line in text.splitlines() if line.startswith("meshvm_vs_istio"))
    assert "MISSED" in next(line for line in text.splitlines() if line.startswith("meshvm_vs_floor"))


def test_usage_reads_cpu_own_memory_and_workers_from_proc() -> None:
    proc = Path("/proc/self")
    found = dataplane.usage(
        (proc / "stat").read_text(),
        (proc / "status").read_text(),
        "\0".join(["envoy", "-c", "x", "--concurrency", "2", ""]),
        100,
    )
    assert found.workers == 2
    assert 0 < found.anon_mb <= found.rss_mb
    assert found.cpu_s >= 0
    assert dataplane.usage((proc / "stat").read_text(), (proc / "status").read_text(), "envoy\0", 100).workers is None
    assert os.sysconf("SC_CLK_TCK") > 0


def test_variants_switch_off_one_feature_and_say_when_they_change_nothing() -> None:
    config = {"envoy": {"access_log_path": "/dev/stdout"}, "services": [{"name": "api", "protocol": "http"}]}
    assert dataplane.VARIANTS["tcp"](config, "api")
    assert config["services"] == [{"name": "api", "protocol": "tcp"}]
    assert not dataplane.VARIANTS["tcp"]({"services": [{"name": "web", "protocol": "http"}]}, "api")
    assert dataplane.VARIANTS["access-log-off"](config, "api")
    assert config["envoy"] == {"access_log_path": None}
    assert not dataplane.VARIANTS["tracing-off"](config, "api"), "nothing to switch off"
    config["tracing"] = {"zipkin_address": "198.51.100.1:9411"}
    assert dataplane.VARIANTS["tracing-off"](config, "api")
    assert "tracing" not in config
