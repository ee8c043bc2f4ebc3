"""Envoy's bootstrap for a meshvm VM: admin on loopback, filesystem xDS, Prometheus stats, sane limits."""

from __future__ import annotations

import copy
import json
from typing import Any

from meshvm.config import AgentConfig
from meshvm.envoy import types as t
from meshvm.envoy.resources import Layout, Resources
from meshvm.envoy.types import JSON
from meshvm.fsutil import atomic_write

ADMIN_CLUSTER = "meshvm.admin"
PROMETHEUS_LISTENER = "meshvm.prometheus"
MAX_DOWNSTREAM_CONNECTIONS = 50_000


def _prometheus(config: AgentConfig) -> tuple[list[JSON], list[JSON]]:
    if config.envoy.prometheus_port is None:
        return [], []
    hcm = {
        "@type": t.HCM,
        "stat_prefix": "prometheus",
        "codec_type": "AUTO",
        "route_config": {
            "name": "prometheus",
            "virtual_hosts": [
                {
                    "name": "prometheus",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"path": "/stats/prometheus"}, "route": {"cluster": ADMIN_CLUSTER}},
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": t.ROUTER}}],
    }
    listener = {
        "name": PROMETHEUS_LISTENER,
        "address": t.socket_address(config.envoy.bind_address, config.envoy.prometheus_port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    cluster = {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": t.socket_address(config.envoy.admin_address, config.envoy.admin_port)}}
                    ]
                }
            ],
        },
    }
    return [listener], [cluster]


def bootstrap(config: AgentConfig) -> JSON:
    layout = Layout(config.envoy.config_dir)
    listeners, clusters = _prometheus(config)
    return {
        "node": {
            "id": config.node,
            "cluster": config.services[0].name,
            "metadata": {"meshvm_services": [s.name for s in config.services]},
        },
        "admin": {"address": t.socket_address(config.envoy.admin_address, config.envoy.admin_port)},
        "dynamic_resources": {"lds_config": t.file_source(layout.lds), "cds_config": t.file_source(layout.cds)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"overload.global_downstream_max_connections": MAX_DOWNSTREAM_CONNECTIONS},
                }
            ]
        },
        "stats_config": {"stats_matcher": {"reject_all": False}},
    }


def initial_files(config: AgentConfig) -> None:
    """Empty listener and cluster files, so Envoy starts (and validates) before the agent's first render."""
    layout = Layout(config.envoy.config_dir)
    for path in (layout.lds, layout.cds):
        if not path.exists():
            atomic_write(path, json.dumps({"version_info": "0", "resources": []}) + "\n", mode=0o640)


def _strip_sds(node: Any) -> Any:
    """Point SDS references at static secrets (same name, no config source)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in {"tls_certificate_sds_secret_configs"}:
                out[key] = [{"name": v["name"]} for v in value]
            elif key == "validation_context_sds_secret_config":
                out[key] = {"name": value["name"]}
            else:
                out[key] = _strip_sds(value)
        return out
    if isinstance(node, list):
        return [_strip_sds(v) for v in node]
    return node


def static_equivalent(config: AgentConfig, resources: Resources) -> JSON:
    """One self-contained bootstrap holding every rendered resource inline: what `envoy --mode validate` checks.

    Listeners, clusters, routes, endpoints and secrets are exactly those written to the watched files, with the
    file references (RDS, EDS, SDS) replaced by the content of those files.
    """
    boot = bootstrap(config)
    del boot["dynamic_resources"]
    listeners = []
    for listener in _strip_sds(copy.deepcopy(resources.listeners)):
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                typed = flt["typed_config"]
                if "rds" in typed:
                    typed["route_config"] = resources.routes[typed.pop("rds")["route_config_name"]]
        listeners.append(listener)
    clusters = []
    for cluster in _strip_sds(copy.deepcopy(resources.clusters)):
        if cluster.get("type") == "EDS":
            cluster["type"] = "STATIC"
            del cluster["eds_cluster_config"]
            cluster["load_assignment"] = resources.endpoints[cluster["name"]]
        clusters.append(cluster)
    boot["static_resources"]["listeners"] += listeners
    boot["static_resources"]["clusters"] += clusters
    boot["static_resources"]["secrets"] = list(resources.secrets.values())
    return boot
