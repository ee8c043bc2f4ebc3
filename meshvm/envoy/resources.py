"""Build Envoy v3 resources from a :class:`Snapshot`: deterministic, pure data, no I/O.

Naming (names never contain '/', so each is also a safe file name):

* ``inbound.<svc>`` — listener on the VM address: mTLS with the mesh CA, RBAC on the caller's SPIFFE ID, local
  rate limit, then the local application (cluster ``local.<svc>``).
* ``outbound.<svc>.<upstream>`` — listener on 127.0.0.1 for the application, routes ``out.<svc>.<upstream>``,
  clusters ``out.<svc>.<upstream>`` (every healthy instance) and ``out.<svc>.<upstream>.<subset>``.
* secrets ``leaf.<svc>`` (certificate + key) and ``roots`` (the mesh CA).

With the cluster's Istio mesh configured (``istio:``) and the VM's Istio certificate in hand:

* each inbound listener gains a second filter chain, chosen by the ALPN Istio's sidecars send (``istio``…), that
  presents the VM's Istio certificate (``istio.leaf``) and verifies callers against Istio's root (``istio.roots``);
  both chains share the routes, so one authorization rule set covers Consul services and Kubernetes identities;
* an upstream ``k8s:<ns>/<svc>`` becomes a cluster whose endpoints come from istiod over ADS (the bootstrap's
  ``istiod`` cluster), dialled as an Istio sidecar does: SNI ``outbound_.<port>_._.<host>``, ALPN ``istio``, the
  VM's Istio certificate, and the callee's ServiceAccount identities checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshvm.config import HTTP_PROTOCOLS, AgentConfig, LocalitySpec, ServiceSpec, UpstreamSpec
from meshvm.envoy import types as t
from meshvm.envoy.snapshot import Instance, Snapshot
from meshvm.envoy.types import JSON
from meshvm.policy import (
    AuthorizationRule,
    CircuitBreaker,
    HeaderMatch,
    LocalityLb,
    MeshPolicy,
    Retries,
    Route,
    RouteMatch,
    ServicePolicy,
    Subset,
)
from meshvm.values import KubeRef, is_kubernetes

ROOTS = "roots"
ISTIO_LEAF = "istio.leaf"
ISTIO_ROOTS = "istio.roots"
ISTIOD_CLUSTER = "istiod"  # static, in the bootstrap: xDS (EDS only) and nothing else
TRACING_CLUSTER = "meshvm.tracing"  # the collector spans go to (a static cluster of the bootstrap)
# What an Istio sidecar offers when it dials another over ISTIO_MUTUAL (with or without metadata exchange).
ISTIO_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
# Without a retry policy, still retry what never reached the application on another host (a dead instance not yet
# known as dead, a stream refused by a draining peer, a 503 from a callee's sidecar whose app is gone), as Istio's
# sidecars do by default.
DEFAULT_RETRIES = Retries(attempts=2, retry_on=["connect-failure", "refused-stream", "retriable-status-codes"])
DENY_ALL: JSON = {"action": "ALLOW", "policies": {}}  # an ALLOW rule set with no policy lets nobody in
SPIFFE_ANY_SERVICE = r"[^/]+"


@dataclass
class Resources:
    """Envoy resources as dicts, or as :class:`Raw` text where a :class:`RenderCache` kept them."""

    listeners: list[Any] = field(default_factory=list)
    clusters: list[Any] = field(default_factory=list)
    routes: dict[str, Any] = field(default_factory=dict)
    endpoints: dict[str, Any] = field(default_factory=dict)
    # None: a secret Envoy's configuration names but that is not here yet (its file holds no resource)
    secrets: dict[str, JSON | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """Where each kind of resource lives under the Envoy config directory."""

    root: Path

    @property
    def lds(self) -> Path:
        return self.root / "lds.json"

    @property
    def cds(self) -> Path:
        return self.root / "cds.json"

    def rds(self, name: str) -> Path:
        return self.root / "rds" / f"{name}.json"

    def eds(self, cluster: str) -> Path:
        # One directory per cluster: a change wakes only that cluster's watcher.
        return self.root / "eds" / cluster / "cla.json"

    def sds(self, name: str) -> Path:
        return self.root / "sds" / f"{name}.json"


def spiffe_regex(trust_domain: str, service: str = SPIFFE_ANY_SERVICE) -> str:
    return f"^spiffe://{re.escape(trust_domain)}/ns/[^/]+/dc/[^/]+/svc/{service}$"


def leaf_name(service: str) -> str:
    return f"leaf.{service}"


def sds_ref(layout: Layout, name: str) -> JSON:
    return {"name": name, "sds_config": t.file_source(layout.sds(name))}


# --- authorization -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Who may call one destination: everyone-but (``others`` allow) or only-these (``others`` deny)."""

    others: str
    allowed: tuple[str, ...]
    denied: tuple[str, ...]


def _winner(rules: list[AuthorizationRule], default: str) -> str:
    if not rules:
        return default
    top = max(r.precedence for r in rules)
    actions = {r.action for r in rules if r.precedence == top}
    return "deny" if "deny" in actions else "allow"


def decide(destination: str, rules: list[AuthorizationRule], default: str) -> Decision:
    """Consul's intention semantics: the most specific rule wins; at equal precedence deny wins."""
    relevant = [r for r in rules if r.destination in {destination, "*"}]
    others = _winner([r for r in relevant if r.source == "*"], default)
    named = sorted({r.source for r in relevant if r.source != "*"})
    verdicts = {s: _winner([r for r in relevant if r.source in {s, "*"}], default) for s in named}
    return Decision(
        others=others,
        allowed=tuple(s for s, v in verdicts.items() if v == "allow" and others == "deny"),
        denied=tuple(s for s, v in verdicts.items() if v == "deny" and others == "allow"),
    )


@dataclass(frozen=True)
class TrustDomains:
    """Whose identities a VM's inbound listeners can authenticate: Consul's, and the cluster's Istio mesh's."""

    consul: str
    istio: str | None = None

    def principal(self, source: str) -> JSON:
        """The RBAC principal of one rule source (a Consul service, ``k8s:<ns>/<sa>``, or ``*``)."""
        if source == "*":
            ids = [_regex_principal(spiffe_regex(self.consul))]
            if self.istio is not None:
                ids.append(_regex_principal(f"^spiffe://{re.escape(self.istio)}/ns/[^/]+/sa/[^/]+$"))
            return ids[0] if len(ids) == 1 else {"or_ids": {"ids": ids}}
        if is_kubernetes(source):
            ref = KubeRef.parse(source)
            domain = self.istio or DEFAULT_ISTIO_TRUST_DOMAIN
            return {"authenticated": {"principal_name": {"exact": istio_identity(domain, ref.namespace, ref.name)}}}
        return _regex_principal(spiffe_regex(self.consul, re.escape(source)))


DEFAULT_ISTIO_TRUST_DOMAIN = "cluster.local"


def istio_identity(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _regex_principal(regex: str) -> JSON:
    return {"authenticated": {"principal_name": {"safe_regex": {"regex": regex}}}}


def rbac_rules(decision: Decision, domains: TrustDomains) -> JSON:
    """An ALLOW rule set; no policy at all means nobody is allowed."""
    if decision.others == "allow":
        principal = domains.principal("*")
        if decision.denied:
            principal = {
                "and_ids": {
                    "ids": [
                        principal,
                        {"not_id": {"or_ids": {"ids": [domains.principal(s) for s in decision.denied]}}},
                    ]
                }
            }
        return {"action": "ALLOW", "policies": {"mesh": {"permissions": [{"any": True}], "principals": [principal]}}}
    if not decision.allowed:
        return DENY_ALL
    return {
        "action": "ALLOW",
        "policies": {
            "intentions": {
                "permissions": [{"any": True}],
                "principals": [domains.principal(s) for s in decision.allowed],
            }
        },
    }


# --- inbound -------------------------------------------------------------------------------------------------


def _downstream_tls(layout: Layout, service: ServiceSpec, *, leaf: str, roots: str) -> JSON:
    common: JSON = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [sds_ref(layout, leaf)],
        "validation_context_sds_secret_config": sds_ref(layout, roots),
    }
    if service.protocol in HTTP_PROTOCOLS:
        common["alpn_protocols"] = ["h2", "http/1.1"]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": t.DOWNSTREAM_TLS, "require_client_certificate": True, "common_tls_context": common},
    }


def _local_cluster(snapshot: Snapshot, service: ServiceSpec) -> JSON:
    cluster: JSON = {
        "name": f"local.{service.name}",
        "type": "STATIC",
        "connect_timeout": t.duration(snapshot.config.envoy.connect_timeout),
        "load_assignment": {
            "cluster_name": f"local.{service.name}",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": t.socket_address(service.address, service.port)}}]}
            ],
        },
    }
    if service.protocol in {"http2", "grpc"}:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": t.HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _local_rate_limit(service: ServiceSpec, policy: ServicePolicy) -> JSON | None:
    """Per-route LocalRateLimit: a token bucket for the destination's inbound route; 429 beyond it."""
    if policy.rate_limit is None:
        return None
    limit = policy.rate_limit
    always = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "@type": t.LOCAL_RATELIMIT,
        "stat_prefix": f"inbound_{service.name}_ratelimit",
        "token_bucket": {
            "max_tokens": limit.burst or limit.requests_per_second,
            "tokens_per_fill": limit.requests_per_second,
            "fill_interval": "1s",
        },
        "filter_enabled": {"runtime_key": "meshvm_ratelimit_enabled", "default_value": always},
        "filter_enforced": {"runtime_key": "meshvm_ratelimit_enforced", "default_value": always},
        "response_headers_to_add": [
            {"append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "header": {"key": "x-meshvm-ratelimited", "value": "true"}}
        ],
    }


STREAM_IDLE_TIMEOUT = 3600.0  # Envoy's own default (5 min) would close a quiet WebSocket


def _http_streams(protocol: str, *, downstream_h2: bool) -> JSON:
    """HCM settings for long-lived streams: HTTP/1.1 WebSocket upgrades on ``http`` services, and the idle limit.

    Between sidecars the hop is HTTP/2, where a WebSocket travels as an extended CONNECT (RFC 8441): the inbound
    side accepts CONNECT and turns it back into an HTTP/1.1 upgrade for the app."""
    settings: JSON = {"stream_idle_timeout": t.duration(STREAM_IDLE_TIMEOUT)}
    if protocol == "http":
        settings["upgrade_configs"] = [{"upgrade_type": "websocket"}]
        if downstream_h2:
            settings["http2_protocol_options"] = {"allow_connect": True}
    return settings


def _tracing(config: AgentConfig, policy: ServicePolicy) -> JSON:
    """The HCM's tracing: Envoy's Zipkin tracer, reading B3 and W3C context and writing both, client and server
    spans of one hop as parent and child (not Zipkin's shared span), 128-bit trace ids as W3C needs."""
    if config.tracing is None:
        return {}
    sampling = policy.trace_sampling if policy.trace_sampling is not None else config.tracing.sampling
    return {
        "tracing": {
            "random_sampling": {"value": sampling},
            "provider": {
                "name": "envoy.tracers.zipkin",
                "typed_config": {
                    "@type": t.ZIPKIN,
                    "collector_cluster": TRACING_CLUSTER,
                    "collector_endpoint": config.tracing.zipkin_path,
                    "collector_endpoint_version": "HTTP_JSON",
                    "collector_hostname": config.tracing.host,
                    "trace_id_128bit": True,
                    "shared_span_context": False,
                    "trace_context_option": "USE_B3_WITH_W3C_PROPAGATION",
                },
            },
        }
    }


def _idle(action: JSON, policy: ServicePolicy) -> JSON:
    if policy.idle_timeout is not None:
        action["idle_timeout"] = t.duration(policy.idle_timeout)
    return action


# HTTP policy lives in routes (RDS), not in the listener: a route update applies to the next request on every
# existing connection, while a listener update only reaches new connections once the old ones drain.


def _inbound_routes(service: ServiceSpec, policy: ServicePolicy, rbac: JSON) -> JSON:
    per_filter: JSON = {"envoy.filters.http.rbac": {"@type": t.HTTP_RBAC_PER_ROUTE, "rbac": {"rules": rbac}}}
    limit = _local_rate_limit(service, policy)
    if limit is not None:
        per_filter["envoy.filters.http.local_ratelimit"] = limit
    return {
        "name": f"inbound.{service.name}",
        "virtual_hosts": [
            {
                "name": service.name,
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": _idle({"cluster": f"local.{service.name}", "timeout": "0s"}, policy),
                        "typed_per_filter_config": per_filter,
                    }
                ],
            }
        ],
    }


def _inbound_listener(
    snapshot: Snapshot, layout: Layout, service: ServiceSpec, rbac: JSON, resources: Resources
) -> JSON:
    config = snapshot.config
    policy = snapshot.policy.for_service(service.name)
    stat = f"inbound_{service.name}"
    if service.protocol in HTTP_PROTOCOLS:
        routes = _inbound_routes(service, policy, rbac)
        resources.routes[routes["name"]] = routes
        hcm: JSON = {
            "@type": t.HCM,
            "stat_prefix": stat,
            "codec_type": "AUTO",
            "rds": {"route_config_name": routes["name"], "config_source": t.file_source(layout.rds(routes["name"]))},
            "http_filters": [
                # Fails closed: the listener-level rules deny everyone; each route carries the real rules.
                {"name": "envoy.filters.http.rbac", "typed_config": {"@type": t.HTTP_RBAC, "rules": DENY_ALL}},
                # Without a token bucket here the filter is inert; routes with a rate limit configure it.
                {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": {"@type": t.LOCAL_RATELIMIT, "stat_prefix": f"{stat}_ratelimit"},
                },
                {"name": "envoy.filters.http.router", "typed_config": {"@type": t.ROUTER}},
            ],
            **_http_streams(service.protocol, downstream_h2=True),
            **_tracing(config, policy),
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"uri": True},
            "access_log": t.access_log(config.envoy.access_log_path),
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        }
        filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    else:
        filters = [
            {
                "name": "envoy.filters.network.rbac",
                "typed_config": {"@type": t.NETWORK_RBAC, "stat_prefix": stat, "rules": rbac},
            },
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": t.TCP_PROXY,
                    "stat_prefix": stat,
                    "cluster": f"local.{service.name}",
                    "access_log": t.access_log(config.envoy.access_log_path),
                },
            },
        ]
    consul_chain = {
        "filters": filters,
        "transport_socket": _downstream_tls(layout, service, leaf=leaf_name(service.name), roots=ROOTS),
    }
    listener: JSON = {
        "name": f"inbound.{service.name}",
        "address": t.socket_address(config.envoy.bind_address, service.mesh_port),
        "traffic_direction": "INBOUND",
        "filter_chains": [consul_chain],
    }
    if snapshot.istio_ready():
        # Istio's sidecars announce themselves by ALPN; everyone else (meshvm's sidecars) gets the Consul chain.
        listener["listener_filters"] = [
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": t.TLS_INSPECTOR}}
        ]
        listener["filter_chains"] = [
            {
                "name": "istio",
                "filter_chain_match": {"transport_protocol": "tls", "application_protocols": list(ISTIO_ALPNS)},
                "filters": filters,
                "transport_socket": _downstream_tls(layout, service, leaf=ISTIO_LEAF, roots=ISTIO_ROOTS),
            },
            # Same transport_protocol as the Istio chain: Envoy matches level by level and never falls back to a
            # less specific level, so a chain without it would be out of reach for every TLS connection.
            {"name": "consul", "filter_chain_match": {"transport_protocol": "tls"}, **consul_chain},
        ]
    return listener


# --- outbound ------------------------------------------------------------------------------------------------


def _subset_instances(instances: tuple[Instance, ...], subset: Subset) -> list[Instance]:
    return [
        i
        for i in instances
        if set(subset.tags) <= set(i.tags)
        and (subset.version is None or i.meta_dict().get("version") == subset.version)
    ]


def _upstream_tls(sni: str, common: JSON) -> JSON:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": t.UPSTREAM_TLS, "sni": sni, "common_tls_context": common},
    }


def _consul_upstream(
    snapshot: Snapshot, layout: Layout, source: ServiceSpec, name: str, destination: str, *, h2: bool
) -> JSON:
    """A Consul destination: endpoints from the agent's EDS file, its SPIFFE ID checked against Consul's roots."""
    if snapshot.roots is None:
        raise ValueError("CA roots are needed to verify upstream identities")
    validation = {
        "match_typed_subject_alt_names": [
            {
                "san_type": "URI",
                "matcher": {"safe_regex": {"regex": spiffe_regex(snapshot.roots.trust_domain, re.escape(destination))}},
            }
        ]
    }
    common: JSON = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [sds_ref(layout, leaf_name(source.name))],
        "combined_validation_context": {
            "default_validation_context": validation,
            "validation_context_sds_secret_config": sds_ref(layout, ROOTS),
        },
    }
    if h2:
        common["alpn_protocols"] = ["h2"]
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"service_name": name, "eds_config": t.file_source(layout.eds(name))},
        "transport_socket": _upstream_tls(destination, common),
    }


def kube_host(ref: KubeRef, cluster_domain: str) -> str:
    return f"{ref.name}.{ref.namespace}.svc.{cluster_domain}"


def istio_cluster_name(ref: KubeRef, port: int, cluster_domain: str) -> str:
    """The name istiod gives a Service port's endpoints (what the cluster asks istiod's EDS for)."""
    return f"outbound|{port}||{kube_host(ref, cluster_domain)}"


def _istio_upstream(snapshot: Snapshot, layout: Layout, name: str, upstream: UpstreamSpec, protocol: str) -> JSON:
    """A Service of the cluster's mesh, dialled as an Istio sidecar dials it: endpoints from istiod (EDS over ADS),
    SNI ``outbound_.<port>_._.<host>``, ALPN ``istio`` (and ``h2`` for HTTP/2), the VM's Istio certificate, and the
    callee checked to be one of the Service's ServiceAccounts under Istio's root."""
    istio = snapshot.config.istio
    ref = upstream.kubernetes
    if istio is None or ref is None or upstream.port is None:
        raise ValueError(f"{upstream.service} is not a Kubernetes upstream of a VM in the Istio mesh")
    host = kube_host(ref, istio.cluster_domain)
    names = [
        {"san_type": "URI", "matcher": {"exact": istio_identity(istio.trust_domain, ref.namespace, account)}}
        for account in upstream.callee_accounts()
    ]
    common: JSON = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
        "tls_certificate_sds_secret_configs": [sds_ref(layout, ISTIO_LEAF)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": names},
            "validation_context_sds_secret_config": sds_ref(layout, ISTIO_ROOTS),
        },
        "alpn_protocols": ["istio", "h2"] if protocol in {"http2", "grpc"} else ["istio"],
    }
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {
            "service_name": istio_cluster_name(ref, upstream.port, istio.cluster_domain),
            "eds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "transport_socket": _upstream_tls(f"outbound_.{upstream.port}_._.{host}", common),
    }


def _with_policy(cluster: JSON, snapshot: Snapshot, policy: ServicePolicy, h2: bool) -> JSON:
    """Connect timeout, load balancing, HTTP/2, circuit breakers and outlier detection: the same for any upstream."""
    cluster["connect_timeout"] = t.duration(policy.connect_timeout or snapshot.config.envoy.connect_timeout)
    cluster["lb_policy"] = "ROUND_ROBIN"
    if h2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": t.HTTP_PROTOCOL_OPTIONS,
                # allow_connect: a WebSocket to the peer sidecar rides an extended CONNECT over this HTTP/2
                "explicit_http_config": {"http2_protocol_options": {"allow_connect": True}},
            }
        }
    # Always explicit: Envoy's default of 3 concurrent retries would make any retry policy fail under load.
    breaker = policy.circuit_breaker or CircuitBreaker()
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": breaker.max_connections,
                "max_pending_requests": breaker.max_pending_requests,
                "max_requests": breaker.max_requests,
                "max_retries": breaker.max_retries,
                "track_remaining": True,
            }
        ]
    }
    if policy.outlier_detection is not None:
        outlier = policy.outlier_detection
        cluster["outlier_detection"] = {
            "consecutive_5xx": outlier.consecutive_5xx,
            "interval": t.duration(outlier.interval),
            "base_ejection_time": t.duration(outlier.base_ejection_time),
            "max_ejection_percent": outlier.max_ejection_percent,
            "enforcing_consecutive_5xx": 100,
            "enforcing_success_rate": 0,
        }
    return cluster


def locality_priorities(caller: LocalitySpec | None, lb: LocalityLb, instances: list[Instance]) -> dict[Instance, int]:
    """Envoy priority of each instance for a caller at ``caller``: its zone first, then its region, then the
    policy's failover regions in order, then everything else (instances without a locality too). Levels are dense
    (Envoy refuses a gap); without a caller locality, or with locality load balancing off, everyone is level 0."""
    if caller is None or not lb.enabled:
        return dict.fromkeys(instances, 0)
    failover = [f.to for f in lb.failover if f.from_ == caller.region]

    def rank(instance: Instance) -> int:
        meta = instance.meta_dict()
        region, zone = meta.get("region"), meta.get("zone", "")
        if region == caller.region:
            return 0 if zone == caller.zone else 1
        if region in failover:
            return 2 + failover.index(region)
        return 2 + len(failover)

    ranks = {i: rank(i) for i in instances}
    dense = {r: n for n, r in enumerate(sorted(set(ranks.values())))}
    return {i: dense[r] for i, r in ranks.items()}


def _load_assignment(name: str, instances: list[Instance], priorities: dict[Instance, int]) -> JSON:
    groups: dict[tuple[int, str, str], list[JSON]] = {}
    for i in sorted(instances, key=lambda i: (i.address, i.port)):
        meta = i.meta_dict()
        group = groups.setdefault((priorities[i], meta.get("region", ""), meta.get("zone", "")), [])
        group.append(
            {
                "endpoint": {"address": t.socket_address(i.address, i.port)},
                "health_status": "HEALTHY" if i.healthy else "UNHEALTHY",
            }
        )
    localities = []
    for (priority, region, zone), endpoints in sorted(groups.items()):
        locality: JSON = {"lb_endpoints": endpoints}
        if region:
            locality["locality"] = {"region": region, "zone": zone}
        if priority:
            locality["priority"] = priority
        localities.append(locality)
    return {"cluster_name": name, "endpoints": localities}


def _route_action(
    policy: ServicePolicy, targets: list[tuple[str, int]], protocol: str, *, failover: bool = False
) -> JSON:
    action: JSON
    if len(targets) == 1:
        action = {"cluster": targets[0][0]}
    else:
        action = {"weighted_clusters": {"clusters": [{"name": n, "weight": w} for n, w in targets if w > 0]}}
    action["timeout"] = (
        t.duration(policy.timeout) if policy.timeout is not None else ("0s" if protocol == "grpc" else "15s")
    )
    retries = policy.retries or DEFAULT_RETRIES
    retry: JSON = {
        "retry_on": ",".join(retries.retry_on),
        "num_retries": retries.attempts,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }
    if "retriable-status-codes" in retries.retry_on:
        retry["retriable_status_codes"] = retries.status_codes
    if retries.per_try_timeout is not None:
        retry["per_try_timeout"] = t.duration(retries.per_try_timeout)
    if failover:
        # A retry after two failed attempts at one level goes to the next: while the caller's zone dies, requests
        # already under way finish in the next zone instead of failing before health checks catch up.
        retry["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": t.PREVIOUS_PRIORITIES, "update_frequency": 2},
        }
    action["retry_policy"] = retry
    return _idle(action, policy)


def _header_matcher(header: HeaderMatch) -> JSON:
    if header.present is not None:
        return {"name": header.name, "present_match": header.present}
    if header.exact is not None:
        return {"name": header.name, "string_match": {"exact": header.exact}}
    return {"name": header.name, "string_match": {"prefix": header.prefix}}


def _route_match(match: RouteMatch) -> JSON:
    result: JSON = {"prefix": match.path_prefix}
    if match.headers:
        result["headers"] = [_header_matcher(h) for h in match.headers]
    return result


def _targets(base: str, route: Route | None) -> list[tuple[str, int]]:
    if route is None:
        return [(base, 100)]
    return [(base if tg.subset is None else f"{base}.{tg.subset}", tg.weight) for tg in route.targets()]


def _fault(policy: ServicePolicy) -> JSON | None:
    """Per-route HTTPFault for calls to the destination (client side, as Istio does)."""
    if policy.fault is None:
        return None
    fault: JSON = {"@type": t.FAULT}
    if policy.fault.delay is not None:
        fault["delay"] = {
            "fixed_delay": t.duration(policy.fault.delay.fixed),
            "percentage": t.percent(policy.fault.delay.percent),
        }
    if policy.fault.abort is not None:
        fault["abort"] = {
            "http_status": policy.fault.abort.status,
            "percentage": t.percent(policy.fault.abort.percent),
        }
    return fault


def destination_key(destination: str) -> str:
    """A destination as it appears in resource names: ``api``, or ``k8s.<ns>.<svc>`` (names never hold '/')."""
    ref = KubeRef.parse(destination) if is_kubernetes(destination) else None
    return f"k8s.{ref.namespace}.{ref.name}" if ref else destination


def _outbound(snapshot: Snapshot, layout: Layout, source: ServiceSpec, upstream: UpstreamSpec) -> Resources:
    """Listener, route, clusters and endpoints through which ``source`` calls one upstream."""
    config = snapshot.config
    resources = Resources()
    destination = upstream.service
    protocol = snapshot.upstream_protocol(source.name, destination)
    policy = snapshot.policy.for_service(destination)
    key = destination_key(destination)
    base = f"out.{source.name}.{key}"
    # Sidecar to sidecar over Consul's mesh is HTTP/2 whatever the app speaks; Istio's inbound expects HTTP/1.1 on
    # an HTTP port, as its own sidecars send.
    failover = False  # more than one locality level among the destination's instances
    if upstream.kubernetes is not None:
        cluster = _istio_upstream(snapshot, layout, base, upstream, protocol)
        resources.clusters.append(_with_policy(cluster, snapshot, policy, protocol in {"http2", "grpc"}))
    else:
        instances = snapshot.upstreams.get(destination, ())
        clusters = {base: list(instances)}
        for subset_name, subset in sorted(policy.subsets.items()):
            clusters[f"{base}.{subset_name}"] = _subset_instances(instances, subset)
        priorities = locality_priorities(config.locality, policy.locality, list(instances))
        failover = len(set(priorities.values())) > 1
        for name, members in clusters.items():
            cluster = _consul_upstream(snapshot, layout, source, name, destination, h2=protocol in HTTP_PROTOCOLS)
            resources.clusters.append(_with_policy(cluster, snapshot, policy, protocol in HTTP_PROTOCOLS))
            resources.endpoints[name] = _load_assignment(name, members, priorities)
    stat = f"outbound_{source.name}_{key}"
    if protocol in HTTP_PROTOCOLS:
        envoy_routes = [
            {
                "match": _route_match(r.match),
                "route": _route_action(policy, _targets(base, r), protocol, failover=failover),
            }
            for r in policy.routes
        ]
        if not any(r.match == RouteMatch() for r in policy.routes):
            envoy_routes.append(
                {
                    "match": {"prefix": "/"},
                    "route": _route_action(policy, _targets(base, None), protocol, failover=failover),
                }
            )
        virtual_host: JSON = {"name": key, "domains": ["*"], "routes": envoy_routes}
        fault = _fault(policy)
        if fault is not None:
            virtual_host["typed_per_filter_config"] = {"envoy.filters.http.fault": fault}
        resources.routes[base] = {"name": base, "virtual_hosts": [virtual_host]}
        hcm: JSON = {
            "@type": t.HCM,
            "stat_prefix": stat,
            "codec_type": "AUTO",
            "rds": {"route_config_name": base, "config_source": t.file_source(layout.rds(base))},
            "http_filters": [
                # Inert here; the routes carry the faults, so a policy change reaches open connections.
                {"name": "envoy.filters.http.fault", "typed_config": {"@type": t.FAULT}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": t.ROUTER}},
            ],
            **_http_streams(protocol, downstream_h2=False),
            **_tracing(config, policy),
            "access_log": t.access_log(config.envoy.access_log_path),
        }
        filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    else:
        targets = _targets(base, policy.routes[0] if policy.routes else None)
        proxy: JSON = {
            "@type": t.TCP_PROXY,
            "stat_prefix": stat,
            "access_log": t.access_log(config.envoy.access_log_path),
        }
        if len(targets) > 1:
            proxy["weighted_clusters"] = {"clusters": [{"name": n, "weight": w} for n, w in targets if w > 0]}
        else:
            proxy["cluster"] = targets[0][0]
        filters = [{"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy}]
    resources.listeners.append(
        {
            "name": f"outbound.{source.name}.{destination}",
            "address": t.socket_address("127.0.0.1", upstream.local_port),
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": filters}],
        }
    )
    return resources


@dataclass
class RenderCache:
    """What the last render built per upstream, kept as JSON text and reused while its inputs are unchanged.

    A health flip of one of 1000 upstreams then rebuilds one upstream's resources, not 1000. Keeping text rather
    than the dicts costs a fifth of the memory; the writer uses the text as it is.
    """

    outbound: dict[tuple[object, ...], Resources] = field(default_factory=dict)
    policy: MeshPolicy | None = None
    policy_text: dict[str, str] = field(default_factory=dict)

    def service_policy_text(self, policy: MeshPolicy, name: str) -> str:
        """A key for the policy of one destination (empty when the policy says nothing about it)."""
        if policy is not self.policy:
            self.policy = policy
            self.policy_text = {n: p.model_dump_json() for n, p in policy.services.items()}
        return self.policy_text.get(name, "")


class Raw(str):
    """A resource already serialised as JSON (with its "@type"): written as it is."""

    __slots__ = ()


def _raw(type_url: str, item: JSON) -> Raw:
    return Raw(json.dumps({"@type": type_url, **item}, separators=(",", ":")))


def _frozen(part: Resources) -> Resources:
    return Resources(
        listeners=[_raw(t.LISTENER, x) for x in part.listeners],
        clusters=[_raw(t.CLUSTER, x) for x in part.clusters],
        routes={n: _raw(t.ROUTE_CONFIGURATION, x) for n, x in part.routes.items()},
        endpoints={n: _raw(t.CLUSTER_LOAD_ASSIGNMENT, x) for n, x in part.endpoints.items()},
    )


def istio_secrets(snapshot: Snapshot) -> dict[str, JSON | None]:
    """The VM's Istio certificate and Istio's root, as SDS secrets; None for each while they are not here yet (the
    bootstrap's istiod cluster names their files, which must exist for Envoy to start)."""
    if snapshot.istio_leaf is None or snapshot.istio_roots is None:
        return {ISTIO_LEAF: None, ISTIO_ROOTS: None}
    return {
        ISTIO_LEAF: {
            "name": ISTIO_LEAF,
            "tls_certificate": {
                "certificate_chain": {"inline_string": snapshot.istio_leaf.cert_pem},
                "private_key": {"inline_string": snapshot.istio_leaf.key_pem},
            },
        },
        ISTIO_ROOTS: {
            "name": ISTIO_ROOTS,
            "validation_context": {"trusted_ca": {"inline_string": _pem_bundle(snapshot.istio_roots.pems)}},
        },
    }


def _pem_bundle(pems: tuple[str, ...]) -> str:
    return "".join(p if p.endswith("\n") else p + "\n" for p in pems)


# --- entry point ---------------------------------------------------------------------------------------------


def build(snapshot: Snapshot, layout: Layout, cache: RenderCache | None = None) -> Resources:
    """All resources for ``snapshot``; the snapshot must be :meth:`Snapshot.ready`.

    With a ``cache`` (the agent keeps one), upstreams whose inputs did not change reuse the previous result, and
    outbound resources come back as :class:`Raw` JSON text; without one, everything is plain dicts.
    """
    keep_text = cache is not None
    if snapshot.roots is None:
        raise ValueError("cannot render mTLS resources before the CA roots are known")
    cache = cache if cache is not None else RenderCache()
    resources = Resources()
    resources.secrets[ROOTS] = {
        "name": ROOTS,
        "validation_context": {"trusted_ca": {"inline_string": _pem_bundle(snapshot.roots.pems)}},
    }
    if snapshot.config.istio is not None:
        resources.secrets.update(istio_secrets(snapshot))
    rules = [*snapshot.intentions, *snapshot.policy.authorization.rules]
    config_istio = snapshot.config.istio
    domains = TrustDomains(snapshot.roots.trust_domain, config_istio.trust_domain if config_istio else None)
    reused: dict[tuple[object, ...], Resources] = {}
    for service in sorted(snapshot.config.services, key=lambda s: s.name):
        leaf = snapshot.leaves[service.name]
        resources.secrets[leaf_name(service.name)] = {
            "name": leaf_name(service.name),
            "tls_certificate": {
                "certificate_chain": {"inline_string": leaf.cert_pem},
                "private_key": {"inline_string": leaf.key_pem},
            },
        }
        decision = decide(service.name, rules, snapshot.policy.authorization.default_action)
        resources.listeners.append(
            _inbound_listener(snapshot, layout, service, rbac_rules(decision, domains), resources)
        )
        resources.clusters.append(_local_cluster(snapshot, service))
        for upstream in service.upstreams:
            if upstream.kubernetes is not None and not snapshot.istio_ready():
                continue  # its cluster needs the VM's Istio certificate (an SDS file Envoy must find)
            destination = upstream.service
            key = (
                service.name,
                upstream,
                snapshot.upstream_protocol(service.name, destination),
                snapshot.upstreams.get(destination, ()),
                cache.service_policy_text(snapshot.policy, destination),
                snapshot.roots.trust_domain,
                config_istio,
            )
            part = cache.outbound.get(key)
            if part is None:
                part = _outbound(snapshot, layout, service, upstream)
                if keep_text:
                    part = _frozen(part)
            reused[key] = part
            resources.listeners += part.listeners
            resources.clusters += part.clusters
            resources.routes.update(part.routes)
            resources.endpoints.update(part.endpoints)
    cache.outbound = reused
    # Order is deterministic by construction: services by name, each inbound first, upstreams in config order.
    return resources
