"""The lab's trace collector: Jaeger v2 all in one, with its Zipkin and OTLP receivers on the bridge.

VMs' sidecars and pods' sidecars send spans to ``<bridge>:9411`` (Zipkin v2 JSON, what Envoy's Zipkin tracer
speaks); OTLP is open too, on 4317 (gRPC) and 4318 (HTTP). Traces are kept in memory and read back through Jaeger's
query API at ``http://<bridge>:16686/api/traces/<id>``. Its own health endpoint is on loopback; it exports no metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshvm.fsutil import atomic_write
from meshvm.lab import network
from meshvm.lab.procs import free_port, http_ok, spawn, wait_until

ZIPKIN_PORT = 9411
OTLP_GRPC_PORT = 4317
OTLP_HTTP_PORT = 4318
QUERY_PORT = 16686
MAX_TRACES = 50_000
STORE = "lab_memory"


def config(health_addr: str) -> dict[str, Any]:
    """Jaeger's configuration (an OpenTelemetry Collector pipeline): receivers → batch → in-memory storage."""
    bridge = network.BRIDGE_ADDRESS
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp", "zipkin"],
                    "processors": ["batch"],
                    "exporters": ["jaeger_storage_exporter"],
                }
            },
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": health_addr}},
            "jaeger_query": {
                "storage": {"traces": STORE},
                "http": {"endpoint": f"{bridge}:{QUERY_PORT}"},
                "grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
            },
            "jaeger_storage": {"backends": {STORE: {"memory": {"max_traces": MAX_TRACES}}}},
        },
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"{bridge}:{OTLP_GRPC_PORT}"},
                    "http": {"endpoint": f"{bridge}:{OTLP_HTTP_PORT}"},
                }
            },
            "zipkin": {"endpoint": f"{bridge}:{ZIPKIN_PORT}"},
        },
        # Spans reach the query API within ~0.1 s: the lab's tests read traces right after making them.
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": STORE}},
    }


def start(binary: Path, state: Path) -> dict[str, Any]:
    home = state / "jaeger"
    home.mkdir(parents=True, exist_ok=True)
    health_addr = f"127.0.0.1:{free_port()}"
    path = home / "config.yaml"
    atomic_write(path, yaml.safe_dump(config(health_addr), sort_keys=False), mode=0o644)
    log_path = home / "jaeger.log"
    pid = spawn([str(binary), "--config", f"file:{path}"], log_path=log_path, cwd=home)
    wait_until("Jaeger", http_ok(f"http://{health_addr}/status"), timeout=30, log_path=log_path, pid=pid)
    bridge = network.BRIDGE_ADDRESS
    return {
        "pid": pid,
        "log": str(log_path),
        "zipkin_addr": f"{bridge}:{ZIPKIN_PORT}",
        "otlp_addr": f"{bridge}:{OTLP_GRPC_PORT}",
        "query_url": f"http://{bridge}:{QUERY_PORT}",
        "health_addr": health_addr,
    }
