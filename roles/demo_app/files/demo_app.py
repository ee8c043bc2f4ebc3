#!/usr/bin/python3
"""Installed by Ansible (role demo_app): a tiny HTTP service for the meshvm lab, standard library only.

GET /health answers 200 {"status": "ok"}; any other GET answers 200 with the host name, the service name and the
request path as JSON, so a caller can see which instance served it, and the caller's mesh identity as the VM's
Envoy forwarded it (the x-forwarded-client-cert header), so it can see who called.
"""

from __future__ import annotations

import argparse
import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    hostname = socket.gethostname()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/health":
                body = {"status": "ok"}
            else:
                body = {
                    "hostname": hostname,
                    "service": args.name,
                    "path": self.path,
                    "caller": self.headers.get("x-forwarded-client-cert", ""),
                }
            payload = (json.dumps(body) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *values: object) -> None:
            """Health checks every second would flood the journal; errors still go to stderr."""

    server = ThreadingHTTPServer((args.address, args.port), Handler)
    server.daemon_threads = True
    print(f"demo app {args.name} on {hostname} listening on {args.address}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
