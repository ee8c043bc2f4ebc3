"""Real test servers and load clients for driving traffic through Envoy in end-to-end tests.

Everything binds to, and connects to, only the addresses it is given (default 127.0.0.1).
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from fractions import Fraction
from http.server import BaseHTTPRequestHandler
from math import floor
from typing import Self, cast
from urllib.parse import urlsplit

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx
import websockets.exceptions
import websockets.sync.server as ws_server
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(url: str) -> tuple[str, int, str]:
    """http://host:port/path?query -> (host, port, "/path?query")."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"need an http:// URL, got {url!r}")
    return parts.hostname, parts.port or 80, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class _Lifecycle:
    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _TCPServer(socketserver.ThreadingTCPServer):
    """Threaded server that tracks its open connections so that stop() really cuts them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, host: str, port: int, handler: type[socketserver.BaseRequestHandler], owner: _SocketServer
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((host, port), handler)  # TCPServer.server_bind: no reverse DNS, unlike HTTPServer

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        """Resets and broken pipes are expected under fault injection; stay quiet."""

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _SocketServer(_Lifecycle):
    """start()/stop() around a _TCPServer; a restart binds the same port again."""

    handler: type[socketserver.BaseRequestHandler]

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError(f"{self.name}: not started")
        return self._port

    def url(self, path: str = "/") -> str:
        return f"http://{_hostport(self.host, self.port)}{path}"

    def start(self) -> Self:
        if self._server is None:
            self._server = _TCPServer(self.host, self._port, self.handler, self)
            self._port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"serve-{self.name}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.close_connections()
            if self._thread is not None:
                self._thread.join(5)

    def _count(self, attr: str) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)


# ---------------------------------------------------------------- HTTP/1.1


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log."""

    def _drain_body(self) -> None:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                self.rfile.read(size + 2)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
        elif length := int(self.headers.get("content-length") or 0):
            self.rfile.read(length)

    def _answer(self, *, send_body: bool) -> None:
        owner = cast(HttpServer, cast(_TCPServer, self.server).owner)
        self._drain_body()
        status = owner._decide(urlsplit(self.path).path)
        body = json.dumps(
            {"server": owner.name, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", owner.name)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class HttpServer(_SocketServer):
    """HTTP/1.1 backend. Adjust `status`, `fail_ratio`, `delay` and `health_status` at any time.

    `requests` counts every request except those to `/health`, which `health_checks` counts. Failures are exactly
    periodic: with fail_ratio=p, request n (1-based, since reset) fails iff floor(n*p) > floor((n-1)*p).
    """

    handler = _HttpHandler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(name, host, port)
        self.status = 200
        self.fail_ratio = 0.0
        self.delay = 0.0
        self.health_status = 200
        self.requests = 0
        self.health_checks = 0

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.health_checks = 0

    def _decide(self, path: str) -> int:
        if path == "/health":
            self._count("health_checks")
            return self.health_status
        ratio = Fraction(min(max(self.fail_ratio, 0.0), 1.0)).limit_denominator(1_000_000)
        with self._lock:
            self.requests += 1
            n = self.requests
        if self.delay > 0:
            time.sleep(self.delay)
        return 500 if floor(n * ratio) > floor((n - 1) * ratio) else self.status


# ---------------------------------------------------------------- HTTP/2 (h2c, prior knowledge)


class _H2Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.owner = cast(H2Server, cast(_TCPServer, self.server).owner)
        self.sock = cast(socket.socket, self.request)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, list[tuple[str, str]]] = {}
        self.pending: dict[int, bytes] = {}
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        self.conn.initiate_connection()
        try:
            self.sock.sendall(self.conn.data_to_send())
            while data := self.sock.recv(65536):
                events = self.conn.receive_data(data)
                for event in events:
                    self._on(event)
                self.sock.sendall(self.conn.data_to_send())
                if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    return
        except h2.exceptions.ProtocolError:
            with suppress(OSError):
                self.sock.sendall(self.conn.data_to_send())
        except OSError:
            return

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.streams[event.stream_id] = cast(list[tuple[str, str]], event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.streams:
            self._respond(event.stream_id, self.streams.pop(event.stream_id))
        elif isinstance(event, h2.events.StreamReset):
            self.streams.pop(event.stream_id, None)
            self.pending.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in list(self.pending) if event.stream_id == 0 else [event.stream_id]:
                if stream_id in self.pending:
                    self._flush(stream_id)

    def _respond(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        self.owner._count("requests")
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        body = json.dumps(
            {
                "server": self.owner.name,
                "path": pseudo.get(":path", ""),
                "headers": {k.lower(): v for k, v in headers if not k.startswith(":")},
            }
        ).encode()
        head = pseudo.get(":method") == "HEAD"
        self.conn.send_headers(
            stream_id,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("x-served-by", self.owner.name),
            ],
            end_stream=head,
        )
        if not head:
            self.pending[stream_id] = body
            self._flush(stream_id)

    def _flush(self, stream_id: int) -> None:
        """Send as much of the stream's body as flow control allows; the rest waits for WINDOW_UPDATE."""
        data = self.pending.pop(stream_id)
        while data and (window := self.conn.local_flow_control_window(stream_id)) > 0:
            size = min(window, self.conn.max_outbound_frame_size, len(data))
            self.conn.send_data(stream_id, data[:size])
            data = data[size:]
        if data:
            self.pending[stream_id] = data
        else:
            self.conn.end_stream(stream_id)


class H2Server(_SocketServer):
    """HTTP/2 cleartext (prior knowledge) backend: 200 + JSON body on every stream, counted in `requests`."""

    handler = _H2Handler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(name, host, port)
        self.requests = 0

    def reset(self) -> None:
        with self._lock:
            self.requests = 0


# ---------------------------------------------------------------- TCP echo


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        cast(_TCPServer, self.server).owner._count("connections")
        sock = cast(socket.socket, self.request)
        with suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)


class TcpEchoServer(_SocketServer):
    """Echoes every byte back; `connections` counts accepted connections."""

    handler = _EchoHandler

    def __init__(self, host: str = "127.0.0.1", port: int = 0, name: str = "tcp-echo") -> None:
        super().__init__(name, host, port)
        self.connections = 0


# ---------------------------------------------------------------- gRPC health


class GrpcHealthServer(_Lifecycle):
    """grpc.health.v1.Health, overall status ("" service) SERVING until set_serving(False)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._serving = True
        self._health = health.HealthServicer()
        self._server: grpc.Server | None = None

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("grpc health server: not started")
        return self._port

    def set_serving(self, serving: bool, service: str = "") -> None:
        if service == "":
            self._serving = serving
        response = health_pb2.HealthCheckResponse
        self._health.set(service, response.SERVING if serving else response.NOT_SERVING)

    def start(self) -> Self:
        if self._server is None:
            server = grpc.server(ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            self._port = server.add_insecure_port(_hostport(self.host, self._port))
            self.set_serving(self._serving)
            server.start()
            self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(5)


class WebSocketEchoServer(_Lifecycle):
    """A WebSocket server (the ``websockets`` package) that sends every message back; counts upgrades it accepted."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self.upgrades = 0
        self._server: ws_server.Server | None = None

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("websocket server: not started")
        return self._port

    def _echo(self, connection: ws_server.ServerConnection) -> None:
        self.upgrades += 1
        with suppress(websockets.exceptions.ConnectionClosed):
            for message in connection:
                connection.send(message)

    def start(self) -> Self:
        if self._server is None:
            self._server = ws_server.serve(self._echo, self.host, self._port)
            self._port = int(self._server.socket.getsockname()[1])
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()


# ---------------------------------------------------------------- clients


def http_request(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, lower-cased headers, body); status 0 if it failed."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException):
        return 0, {}, b""
    finally:
        conn.close()
    merged: dict[str, str] = {}
    for key, value in resp.getheaders():
        merged[key.lower()] = f"{merged[key.lower()]}, {value}" if key.lower() in merged else value
    return resp.status, merged, data


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    return http_request("GET", url, headers, timeout=timeout)


def h2_get(
    host: str, port: int, path: str = "/", timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET over h2c with prior knowledge: (status, http_version). Raises httpx.HTTPError on failure."""
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=timeout) as client:
        resp = client.get(f"http://{_hostport(host, port)}{path}", headers=headers)
        return resp.status_code, resp.http_version


def grpc_health_check(host: str, port: int, timeout: float = 5.0, service: str = "") -> str:
    """The Health/Check status name, e.g. "SERVING"; raises grpc.RpcError when the call fails."""
    target = _hostport(host, port)
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def tcp_echo(host: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send payload and read until as many bytes came back (or EOF)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        received = bytearray()
        while len(received) < len(payload) and (chunk := sock.recv(65536)):
            received += chunk
    return bytes(received)


# ---------------------------------------------------------------- load


@dataclass(frozen=True, slots=True)
class Result:
    started: float  # time.monotonic()
    status: int  # 0: connection error
    server: str | None  # x-served-by
    latency: float
    error: str | None = None


@dataclass
class Summary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_server: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, results: Iterable[Result]) -> Summary:
        results = list(results)
        ok = sum(200 <= r.status < 300 for r in results)
        return cls(
            total=len(results),
            ok=ok,
            failed=len(results) - ok,
            by_status=dict(Counter(r.status for r in results)),
            by_server=dict(Counter(r.server for r in results if r.server is not None)),
            latencies=[r.latency for r in results],
        )


class _Requester:
    """GETs on one persistent HTTP/1.1 connection, reconnecting after any error."""

    def __init__(self, url: str, headers: dict[str, str] | None, timeout: float) -> None:
        host, port, self._path = _split(url)
        self._addr = (host, port)
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def fetch(self) -> Result:
        start = time.monotonic()
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(*self._addr, timeout=self._timeout)
            self._conn.request("GET", self._path, headers=self._headers)
            resp = self._conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Result(start, 0, None, time.monotonic() - start, f"{type(exc).__name__}: {exc}")
        return Result(start, resp.status, resp.getheader("x-served-by"), time.monotonic() - start)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Load(_Lifecycle):
    """Steady background GET load at an aggregate `rate_per_s`, spread evenly over `concurrency` workers.

    A worker that falls behind (slow responses) skips the missed slots rather than bursting to catch up.
    """

    def __init__(
        self,
        url: str,
        rate_per_s: float = 50,
        concurrency: int = 4,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        _Requester(url, headers, timeout)  # validate the URL now
        self.url, self.rate_per_s, self.concurrency = url, rate_per_s, concurrency
        self.headers, self.timeout = headers, timeout
        self._results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Self:
        self._stop.clear()
        t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._work, args=(t0 + i / self.rate_per_s,), name=f"load-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 1)
        self._threads = []

    @property
    def results(self) -> list[Result]:
        with self._lock:
            return list(self._results)

    def summary(self, since: float | None = None) -> Summary:
        """Everything so far, or only requests started at or after `since` (a time.monotonic() value)."""
        return Summary.of(r for r in self.results if since is None or r.started >= since)

    def _work(self, first: float) -> None:
        requester = _Requester(self.url, self.headers, self.timeout)
        interval = self.concurrency / self.rate_per_s
        due = first
        try:
            while not self._stop.is_set():
                wait = due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                result = requester.fetch()
                with self._lock:
                    self._results.append(result)
                due += interval
                due = max(due, time.monotonic() - interval)
        finally:
            requester.close()


def burst(
    url: str, n: int, concurrency: int = 16, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> Summary:
    """n GETs as fast as `concurrency` threads (each on its own persistent connection) can make them."""
    results: list[Result] = []
    lock = threading.Lock()
    tickets = iter(range(n))

    def work() -> None:
        requester = _Requester(url, headers, timeout)
        try:
            while True:
                with lock:
                    if next(tickets, None) is None:
                        return
                result = requester.fetch()
                with lock:
                    results.append(result)
        finally:
            requester.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(0, min(concurrency, n)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Summary.of(results)
