"""The lab pods' test app: ``python -m meshvm.lab.podapp --name pod1 …``.

HTTP on ``--http-port``: ``/healthz`` answers ``ok``; every other path answers JSON with the pod's name, the path
and the request headers it received (so a test sees what the sidecar forwarded, such as the caller's identity in
``x-forwarded-client-cert``). gRPC on ``--grpc-port``: the standard health service, SERVING.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


def handler(name: str, namespace: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                body, ctype = b"ok\n", "text/plain"
            else:
                answer = {"pod": name, "namespace": namespace, "path": self.path, "headers": dict(self.headers)}
                body, ctype = (json.dumps(answer, sort_keys=True) + "\n").encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshvm-lab-podapp")
    parser.add_argument("--name", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=9090)
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    grpc_server.add_insecure_port(f"0.0.0.0:{args.grpc_port}")
    grpc_server.start()

    http = ThreadingHTTPServer(("0.0.0.0", args.http_port), handler(args.name, args.namespace))
    http.daemon_threads = True

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=http.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    print(f"{args.name}: http :{args.http_port}, grpc health :{args.grpc_port}", flush=True)
    http.serve_forever()
    grpc_server.stop(grace=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
