"""The traffic support servers and clients work against each other on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import h2.connection
import h2.events
import httpx
import pytest
from h2.config import H2Configuration
from h2.settings import SettingCodes

from tests.support.traffic import (
    GrpcHealthServer,
    H2Server,
    HttpServer,
    Load,
    TcpEchoServer,
    burst,
    grpc_health_check,
    h2_get,
    http_get,
    http_request,
    tcp_echo,
)

HOST = "127.0.0.1"


def test_http_server_answers_with_name_path_and_headers() -> None:
    with HttpServer("alpha") as server:
        status, headers, body = http_get(server.url("/x?y=1"), headers={"X-Test": "Abc"})
        assert status == 200
        assert headers["x-served-by"] == "alpha"
        assert headers["content-type"] == "application/json"
        doc = json.loads(body)
        assert doc["server"] == "alpha"
        assert doc["path"] == "/x?y=1"
        assert doc["headers"]["x-test"] == "Abc"
        assert server.requests == 1
        server.reset()
        assert server.requests == 0


def test_http_server_head_post_and_chunked_post_keep_the_connection_usable() -> None:
    with HttpServer("alpha") as server:
        status, headers, body = http_request("HEAD", server.url("/h"))
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0
        status, _, body = http_request("POST", server.url("/p"), body=b"x" * 100_000)
        assert status == 200
        assert json.loads(body)["path"] == "/p"
        status, _, _ = http_request("POST", server.url("/c"), body=iter([b"ab", b"cd"]))  # type: ignore[arg-type]
        assert status == 200
        summary = burst(server.url(), 20, concurrency=2)  # persistent connections after GETs
        assert summary.ok == 20
        assert server.requests == 23


def test_fail_ratio_is_exactly_periodic() -> None:
    with HttpServer("alpha") as server:
        server.fail_ratio = 0.5
        assert [http_get(server.url())[0] for _ in range(4)] == [200, 500, 200, 500]
        server.reset()
        summary = burst(server.url(), 100, concurrency=16)
        assert summary.total == 100
        assert summary.by_status == {200: 50, 500: 50}
        assert (summary.ok, summary.failed) == (50, 50)
        server.reset()
        server.fail_ratio = 0.29
        assert burst(server.url(), 100).by_status == {200: 71, 500: 29}
        server.fail_ratio = 1.0
        assert burst(server.url(), 10).by_status == {500: 10}


def test_status_delay_and_health_are_adjustable() -> None:
    with HttpServer("alpha") as server:
        server.status = 503
        assert http_get(server.url())[0] == 503
        server.status = 200
        assert http_get(server.url("/health"))[0] == 200
        server.health_status = 503
        server.fail_ratio = 1.0
        assert http_get(server.url("/health"))[0] == 503
        assert (server.requests, server.health_checks) == (1, 2)
        server.fail_ratio = 0.0
        server.delay = 0.2
        start = time.monotonic()
        assert http_get(server.url())[0] == 200
        assert time.monotonic() - start >= 0.2
        assert http_get(server.url(), timeout=0.05)[0] == 0  # timed out: status 0, no exception


def test_stop_cuts_keepalive_connections_and_restart_reuses_the_port() -> None:
    server = HttpServer("alpha").start()
    port = server.port
    with Load(server.url(), rate_per_s=40, concurrency=2) as load:
        time.sleep(0.5)
        server.stop()
        assert http_get(f"http://{HOST}:{port}/")[0] == 0
        stopped_at = time.monotonic()
        time.sleep(0.5)
        server.start()
        assert server.port == port
        restarted_at = time.monotonic()
        time.sleep(0.5)
    server.stop()
    before = load.summary()
    assert before.by_status.get(0, 0) > 0
    during = [r for r in load.results if stopped_at + 0.1 <= r.started < restarted_at]
    assert during
    assert all(r.status == 0 and r.error for r in during)
    after = load.summary(since=restarted_at + 0.1)
    assert after.total > 0
    assert after.ok == after.total


def test_http_get_to_a_closed_port_returns_status_zero() -> None:
    server = HttpServer("gone").start()
    url = server.url()
    server.stop()
    assert http_get(url) == (0, {}, b"")


def test_h2_client_really_speaks_http2() -> None:
    with H2Server("h2-alpha") as server:
        assert h2_get(HOST, server.port, "/a") == (200, "HTTP/2")
        with httpx.Client(http1=False, http2=True, trust_env=False) as client:
            resp = client.get(server.url("/b"), headers={"X-Test": "1"})
        assert resp.http_version == "HTTP/2"
        assert resp.headers["x-served-by"] == "h2-alpha"
        assert resp.json() == {"server": "h2-alpha", "path": "/b", "headers": resp.json()["headers"]}
        assert resp.json()["headers"]["x-test"] == "1"
        assert server.requests == 2


def _h2_many_streams(port: int, n: int, pad: int) -> dict[int, tuple[str, int]]:
    """n streams at once on one h2c connection, 1 kB stream windows: stream id -> (status, body length)."""
    conn = h2.connection.H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1024})
    for i in range(n):
        conn.send_headers(
            conn.get_next_available_stream_id(),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", f"{HOST}:{port}"),
                (":path", f"/s{i}"),
                ("x-pad", "p" * pad),
            ],
            end_stream=True,
        )
    status: dict[int, str] = {}
    size: dict[int, int] = {}
    done: dict[int, tuple[str, int]] = {}
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        while len(done) < n:
            data = sock.recv(65536)
            assert data, f"connection closed after {len(done)} of {n} streams"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status[event.stream_id] = dict(event.headers)[":status"]
                elif isinstance(event, h2.events.DataReceived):
                    size[event.stream_id] = size.get(event.stream_id, 0) + len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    done[event.stream_id] = (status[event.stream_id], size.get(event.stream_id, 0))
            sock.sendall(conn.data_to_send())
    return done


def test_h2_server_handles_many_streams_on_one_connection() -> None:
    # 300 streams (over h2's default limit of 100) whose ~1.7 kB bodies overflow both the 1 kB stream windows
    # and the 64 kB connection window: the server must multiplex and wait for WINDOW_UPDATEs.
    with H2Server("h2-alpha") as server:
        done = _h2_many_streams(server.port, 300, 1500)
        assert len(done) == 300
        assert {s for s, _ in done.values()} == {"200"}
        assert min(n for _, n in done.values()) > 1500
        assert server.requests == 300


def test_h2_server_handles_many_connections() -> None:
    with H2Server("h2-alpha") as server:
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(lambda _: h2_get(HOST, server.port), range(20)))
        assert results == [(200, "HTTP/2")] * 20
        assert server.requests == 20


def test_grpc_health_reports_serving_and_not_serving() -> None:
    with GrpcHealthServer() as server:
        assert grpc_health_check(HOST, server.port) == "SERVING"
        server.set_serving(False)
        assert grpc_health_check(HOST, server.port) == "NOT_SERVING"
        server.set_serving(True)
        assert grpc_health_check(HOST, server.port) == "SERVING"
        port = server.port
    with pytest.raises(grpc.RpcError):
        grpc_health_check(HOST, port, timeout=1)


def test_tcp_echo_returns_the_payload() -> None:
    with TcpEchoServer() as server:
        assert tcp_echo(HOST, server.port, b"hello") == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB
        assert tcp_echo(HOST, server.port, big) == big
        assert server.connections == 2


def test_load_holds_its_rate_and_counts_servers() -> None:
    with HttpServer("alpha") as server:
        with Load(server.url(), rate_per_s=50, concurrency=4) as load:
            time.sleep(1.0)
        summary = load.summary()
    assert 40 <= summary.total <= 60
    assert summary.ok == summary.total
    assert summary.failed == 0
    assert summary.by_status == {200: summary.total}
    assert summary.by_server == {"alpha": summary.total}
    assert len(summary.latencies) == summary.total
    assert server.requests == summary.total


def test_load_counts_failures() -> None:
    with HttpServer("alpha") as server:
        server.fail_ratio = 0.5
        with Load(server.url(), rate_per_s=40, concurrency=2) as load:
            time.sleep(0.5)
    summary = load.summary()
    assert summary.total > 0
    assert abs(summary.failed - summary.total / 2) <= 1
    assert summary.by_status.get(500, 0) == summary.failed
