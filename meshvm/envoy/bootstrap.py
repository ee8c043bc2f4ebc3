"""Envoy's bootstrap for a meshvm VM: admin on loopback, filesystem xDS, Prometheus stats, sane limits."""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

from meshvm.config import AgentConfig
from meshvm.envoy import types as t
from meshvm.envoy.resources import (
    ISTIO_LEAF,
    ISTIO_ROOTS,
    ISTIOD_CLUSTER,
    TRACING_CLUSTER,
    Layout,
    Resources,
    sds_ref,
)
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


def _node(config: AgentConfig) -> JSON:
    """Envoy's node. In the cluster's Istio mesh, istiod knows it as a sidecar of the VM's workload: the id and
    metadata its xDS server reads (namespace and ServiceAccount must match the VM's Istio certificate)."""
    services = [s.name for s in config.services]
    istio = config.istio
    # istiod orders a Kubernetes Service's endpoints for the VM by this, as it does for its own sidecars.
    locality = {"locality": config.locality.model_dump()} if config.locality is not None else {}
    if istio is None:
        return {"id": config.node, "cluster": services[0], "metadata": {"meshvm_services": services}, **locality}
    return {
        **locality,
        "id": f"sidecar~{config.address}~{config.node}.{istio.namespace}~{istio.namespace}.svc.{istio.cluster_domain}",
        "cluster": f"{istio.service_account}.{istio.namespace}",
        "metadata": {
            "meshvm_services": services,
            "NAMESPACE": istio.namespace,
            "SERVICE_ACCOUNT": istio.service_account,
            "CLUSTER_ID": istio.cluster_id,
            "NETWORK": istio.network,
            "MESH_ID": istio.trust_domain,
            "INSTANCE_IPS": config.address,
            "WORKLOAD_NAME": config.node,
            "LABELS": {"app": services[0]},
            "ISTIO_VERSION": "meshvm",
        },
    }


def _istiod(config: AgentConfig, layout: Layout) -> tuple[list[JSON], JSON]:
    """The static ``istiod`` cluster (mTLS with the VM's Istio certificate, istiod verified by its name under
    Istio's root) and ADS through it: Envoy asks it only for the endpoints of the ``k8s:`` upstreams' clusters."""
    istio = config.istio
    if istio is None:
        return [], {}
    host, port = istio.istiod_address.rsplit(":", 1)
    try:
        ipaddress.ip_address(host)
        discovery = "STATIC"
    except ValueError:
        discovery = "STRICT_DNS"
    common: JSON = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [
            {"name": ISTIO_LEAF, "sds_config": t.file_source(layout.sds(ISTIO_LEAF))}
        ],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": istio.istiod_name}}]
            },
            "validation_context_sds_secret_config": sds_ref(layout, ISTIO_ROOTS),
        },
    }
    cluster = {
        "name": ISTIOD_CLUSTER,
        "type": discovery,
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": t.HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": ISTIOD_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": t.socket_address(host, int(port))}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": t.UPSTREAM_TLS, "sni": istio.istiod_name, "common_tls_context": common},
        },
    }
    ads = {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": ISTIOD_CLUSTER}}],
    }
    return [cluster], ads


def _tracing_clusters(config: AgentConfig) -> list[JSON]:
    """The trace collector, static: Envoy's Zipkin tracer needs its cluster when a listener is made."""
    if config.tracing is None:
        return []
    tracing = config.tracing
    return [
        {
            "name": TRACING_CLUSTER,
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": t.duration(config.envoy.connect_timeout),
            "load_assignment": {
                "cluster_name": TRACING_CLUSTER,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": t.socket_address(tracing.host, tracing.port)}}]}
                ],
            },
        }
    ]


def bootstrap(config: AgentConfig) -> JSON:
    layout = Layout(config.envoy.config_dir)
    listeners, clusters = _prometheus(config)
    istiod_clusters, ads = _istiod(config, layout)
    dynamic: JSON = {"lds_config": t.file_source(layout.lds), "cds_config": t.file_source(layout.cds)}
    if ads:
        dynamic["ads_config"] = ads
    return {
        "node": _node(config),
        "admin": {"address": t.socket_address(config.envoy.admin_address, config.envoy.admin_port)},
        "dynamic_resources": dynamic,
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters + istiod_clusters + _tracing_clusters(config),
        },
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
    """Empty listener and cluster files (and, in the Istio mesh, the Istio secrets' files the bootstrap names), so
    Envoy starts (and validates) before the agent's first render."""
    layout = Layout(config.envoy.config_dir)
    paths = [layout.lds, layout.cds]
    if config.istio is not None:
        paths += [layout.sds(ISTIO_LEAF), layout.sds(ISTIO_ROOTS)]
    for path in paths:
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
    boot["static_resources"]["clusters"] = _strip_sds(boot["static_resources"]["clusters"])
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
            # Endpoints of a k8s: upstream come from istiod at run time, not from a file.
            cluster["load_assignment"] = resources.endpoints.get(cluster["name"], {"cluster_name": cluster["name"]})
        clusters.append(cluster)
    boot["static_resources"]["listeners"] += listeners
    boot["static_resources"]["clusters"] += clusters
    boot["static_resources"]["secrets"] = [s for s in resources.secrets.values() if s is not None]
    return boot
